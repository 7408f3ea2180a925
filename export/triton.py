"""config.pbtxt for Triton's ONNX Runtime backend, derived from the bundle's model signature.

Every input and the output start with the batch axis, so Triton owns it (max_batch_size > 0) and
the dims listed here leave it out; list and history lengths stay dynamic (-1), feature counts fixed.
"""

from __future__ import annotations

from export.contract.bundle import MODEL_FILE
from export.contract.schema import MODEL_OUTPUT, FeatureSchema, TensorSpec, model_inputs

CONFIG_FILE = "config.pbtxt"
PLATFORM = "onnxruntime_onnx"
TRITON_DTYPES = {"int64": "TYPE_INT64", "float32": "TYPE_FP32", "bool": "TYPE_BOOL"}
MAX_BATCH_SIZE = 64  # lists per model call; the service's own /rerank/batch default


def _dims(spec: TensorSpec) -> list[int]:
    """Dims after the batch axis: a fixed feature count as is, a named (dynamic) axis as -1."""
    if spec.dims[0] != "batch":
        raise ValueError(f"{spec.name}: axis 0 is {spec.dims[0]!r}, Triton's batching needs 'batch' first")
    return [int(d) if d.isdigit() else -1 for d in spec.dims[1:]]


def _tensor(spec: TensorSpec) -> str:
    dims = ", ".join(str(d) for d in _dims(spec))
    return f'  {{\n    name: "{spec.name}"\n    data_type: {TRITON_DTYPES[spec.dtype]}\n    dims: [ {dims} ]\n  }}'


def triton_config(name: str, schema: FeatureSchema) -> str:
    """The model's config.pbtxt text: CPU instances by default (docs/export.md shows KIND_GPU)."""
    inputs = ",\n".join(_tensor(s) for s in model_inputs(schema))
    return (
        f'name: "{name}"\n'
        f'platform: "{PLATFORM}"\n'
        f'default_model_filename: "{MODEL_FILE}"\n'
        f"max_batch_size: {MAX_BATCH_SIZE}\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{_tensor(MODEL_OUTPUT)}\n]\n"
        "instance_group [ { kind: KIND_CPU, count: 1 } ]\n"
        "dynamic_batching { }\n"
    )
