"""The exported config.pbtxt, parsed by Triton's own ModelConfig protobuf and checked against the ONNX graph."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export.contract.bundle import verify_bundle

# ONNX element type -> Triton data type, written out here so the test does not share the exporter's table.
ONNX_TO_TRITON = {
    onnx.TensorProto.INT64: model_config_pb2.TYPE_INT64,
    onnx.TensorProto.FLOAT: model_config_pb2.TYPE_FP32,
    onnx.TensorProto.BOOL: model_config_pb2.TYPE_BOOL,
}


@pytest.fixture(scope="module")
def config(tiny_bundle: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse((tiny_bundle / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def _expected(value: onnx.ValueInfoProto) -> tuple[str, int, list[int]]:
    """(name, Triton type, dims after the batch axis) as the ONNX graph declares them."""
    tensor = value.type.tensor_type
    dims = [-1 if d.dim_param else d.dim_value for d in tensor.shape.dim]
    assert tensor.shape.dim[0].dim_param == "batch", f"{value.name}: axis 0 is not the batch axis"
    return value.name, ONNX_TO_TRITON[tensor.elem_type], dims[1:]


def test_config_parses_as_triton_model_config(config: model_config_pb2.ModelConfig, tiny_bundle: Path) -> None:
    assert config.name == tiny_bundle.parent.name
    assert config.platform == "onnxruntime_onnx"
    assert config.default_model_filename == "model.onnx" and (tiny_bundle / "model.onnx").is_file()
    assert config.max_batch_size > 0
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert config.HasField("dynamic_batching")


def test_config_tensors_match_the_onnx_graph(config: model_config_pb2.ModelConfig, tiny_bundle: Path) -> None:
    graph = onnx.load(str(tiny_bundle / "model.onnx")).graph
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [_expected(v) for v in graph.input]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [_expected(v) for v in graph.output]
    assert any(-1 in t.dims for t in config.input), "list and history axes must stay dynamic"


def test_config_is_hashed_in_the_manifest(tiny_bundle: Path) -> None:
    manifest, _, _ = verify_bundle(tiny_bundle)
    assert "config.pbtxt" in manifest["files"]


def test_unknown_fields_fail_the_parse() -> None:
    with pytest.raises(text_format.ParseError):
        text_format.Parse('name: "psad"\nmax_batch: 4\n', model_config_pb2.ModelConfig())
