"""The bundle format: the files of a model version directory, its manifest, and the checks that
need no ONNX Runtime session (the exporter writes this format, export.runtime and the service read it).

Item encoders (manifest "item_encoder"): an "id" bundle's graph gathers each item's row of a table
baked into model.onnx (n_items x dim float32). A "sid" bundle's graph reads one token per item
(export.contract.content.sid_tokens) and holds only the codebooks (the initializer CODEBOOKS,
[levels, codebook_size, dim] float32); item_codes.npy (uint8 [n_items, levels]) holds each known
item's codes and assign.onnx assigns a new item's codes from its content.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from export.contract.content import MAX_CODEBOOK_SIZE, sid_tokens
from export.contract.schema import N_RESERVED, SCHEMA_VERSION, FeatureSchema, SchemaError, Vocabularies, model_inputs

FORMAT_VERSION = 1
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # a model name: one path component, no leading dot
MODEL_FILE = "model.onnx"
FP16_FILE = "model_fp16.onnx"
INT8_FILE = "model_int8.onnx"
MANIFEST_FILE = "manifest.json"
ITEM_CODES_FILE = "item_codes.npy"  # sid: uint8 [n_items, levels], each known item's codes
ASSIGN_FILE = "assign.onnx"  # sid: content -> codes for new items
REQUIRED_FILES = (MODEL_FILE, "schema.json", "vocab.json")
ID, SID = "id", "sid"
ITEM_ENCODERS = (ID, SID)
SID_FILES = (ITEM_CODES_FILE, ASSIGN_FILE)
# code combinations (K^L) up to which a fused sid graph gathers from the sum of every combination
# (export/fusion.py TokenTable), folded by ONNX Runtime from the codebooks when it loads the graph
MAX_TABLE_ROWS = 2**18
CODEBOOKS = "item_codebooks"  # the sid graph's codebook initializer, [levels, codebook_size, dim] float32
ASSIGN_INPUTS = ("content_cat", "content_num")  # int64 [batch, content categoricals], float32 [batch, numerics]
ASSIGN_OUTPUT = "codes"  # int64 [batch, levels]
ONNX_FLOAT = 1  # onnx.TensorProto.FLOAT
Device = Literal["auto", "cpu", "cuda"]  # where a model runs: CUDA when it works (auto), or as named
DEVICES: tuple[str, ...] = get_args(Device)


class BundleError(ValueError):
    """A bundle cannot be served; the message names the file and the problem."""


@dataclass(frozen=True)
class ItemEncoder:
    """The manifest's "item_encoder" entry: how the graph reads items."""

    kind: str  # ID or SID
    dim: int  # width of an item vector
    levels: int = 0  # sid: codes per item
    codebook_size: int = 0  # sid: codes per level

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"kind": self.kind, "dim": self.dim}
        if self.kind == SID:
            entry |= {"levels": self.levels, "codebook_size": self.codebook_size}
        return entry

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> ItemEncoder:
        """Parse and check an entry; `where` names it in errors (a file)."""
        fix = "re-export the bundle with this release (`psad export`)"
        if not isinstance(raw, Mapping):
            raise BundleError(f"{where}: no 'item_encoder' object (kind 'id' or 'sid'); {fix}")
        kind = raw.get("kind")
        if kind not in ITEM_ENCODERS:
            raise BundleError(f"{where}: item_encoder.kind {kind!r} is not one of {list(ITEM_ENCODERS)}; {fix}")
        keys = ("dim", "levels", "codebook_size") if kind == SID else ("dim",)
        for key in keys:
            value = raw.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BundleError(f"{where}: item_encoder.{key} must be a positive integer, got {value!r}; {fix}")
        if kind == ID:
            return cls(ID, raw["dim"])
        if raw["codebook_size"] > MAX_CODEBOOK_SIZE:
            raise BundleError(
                f"{where}: item_encoder.codebook_size {raw['codebook_size']} exceeds {MAX_CODEBOOK_SIZE} "
                f"(a code is one byte in {ITEM_CODES_FILE}); {fix}"
            )
        return cls(SID, raw["dim"], raw["levels"], raw["codebook_size"])


def served_item_bytes(encoder: ItemEncoder) -> dict[str, int]:
    """Served item state computed from the format: bytes per catalogue item and fixed bytes.

    id: the item table of model.onnx, dim float32 per item (side features are folded into it).
    sid: one uint8 code per level per item (item_codes.npy), plus the codebooks; the runtime holds
    each item's token as one int64 (runtime_per_item) and, where the fused graph gathers from the sum
    of every code combination (export/fusion.py TokenTable), that table (runtime_fixed). The
    vocabulary (item id -> index) is the same for both and not counted."""
    if encoder.kind == ID:
        return {"per_item": 4 * encoder.dim, "runtime_per_item": 4 * encoder.dim, "fixed": 0, "runtime_fixed": 0}
    codebooks = 4 * encoder.levels * encoder.codebook_size * encoder.dim
    combinations = encoder.codebook_size**encoder.levels
    table = 4 * (N_RESERVED + combinations) * encoder.dim if combinations <= MAX_TABLE_ROWS else 0
    return {"per_item": encoder.levels, "runtime_per_item": 8, "fixed": codebooks, "runtime_fixed": codebooks + table}


def item_tokens(encoder: ItemEncoder, codes: np.ndarray | None, n_items: int) -> np.ndarray:
    """int64 [n_items]: what the graph reads for each vocabulary index. id: the index; sid: the
    token of the item's codes, padding and OOV keeping 0 and 1 (the graph reads OOV as the codes
    of missing content)."""
    index = np.arange(n_items, dtype=np.int64)
    if encoder.kind == ID:
        return index
    if codes is None:
        raise ValueError("a sid bundle's item tokens need its item codes")
    return np.where(index < N_RESERVED, index, sid_tokens(codes, encoder.codebook_size))


def verify_bundle(path: Path) -> tuple[dict[str, Any], FeatureSchema, Vocabularies]:
    """Every check that needs no session: manifest, its name/version against the directory, sha256 of
    each file, schema version, input specs."""
    if not path.is_dir():
        raise BundleError(f"{path}: bundle directory not found; export one with `psad export`")
    manifest = _read_manifest(path / MANIFEST_FILE)
    # The service finds versions by directory name and knows what it serves by the manifest: a copy
    # into another version directory would be reloaded forever.
    place = path.absolute()
    if [place.parent.name, place.name] != [manifest["name"], str(manifest["version"])]:
        raise BundleError(
            f"{path / MANIFEST_FILE}: says {manifest['name']}/{manifest['version']} but the bundle is in "
            f"{place.parent.name}/{place.name} (a copied bundle keeps its manifest): serve it from "
            f"<repo>/{manifest['name']}/{manifest['version']}, or re-export the run as this version "
            "with `psad export --name NAME --version N`"
        )
    files = manifest["files"]
    for name in REQUIRED_FILES:
        if name not in files:
            raise BundleError(f"{path / MANIFEST_FILE}: lists no {name}; re-export the bundle")
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            raise BundleError(f"{file}: missing (the manifest lists it); copy the whole bundle directory")
        actual = sha256(file)
        if actual != entry["sha256"]:
            raise BundleError(
                f"{file}: sha256 mismatch ({actual[:12]}... on disk, {entry['sha256'][:12]}... in the manifest; "
                f"{file.stat().st_size} bytes, manifest says {entry.get('bytes')}): "
                "corrupt or altered, re-copy or re-export"
            )
    try:
        schema = FeatureSchema.load(path / "schema.json")
        vocabs = Vocabularies.load(path / "vocab.json", schema)
    except SchemaError as exc:
        raise BundleError(f"{path}: {exc}") from None
    if manifest.get("schema") != json.loads(json.dumps(schema.to_dict())):
        raise BundleError(f"{path / MANIFEST_FILE}: embedded schema differs from schema.json; re-export the bundle")
    expected = [{"name": s.name, "dtype": s.dtype, "dims": list(s.dims)} for s in model_inputs(schema)]
    if manifest.get("inputs") != expected:
        raise BundleError(
            f"{path / MANIFEST_FILE}: inputs {manifest.get('inputs')} differ from the schema's model inputs {expected}"
        )
    encoder = ItemEncoder.from_dict(manifest.get("item_encoder"), str(path / MANIFEST_FILE))
    if encoder.kind == SID:
        for name in SID_FILES:
            if name not in files:
                raise BundleError(f"{path / MANIFEST_FILE}: a sid bundle lists no {name}; re-export the bundle")
        read_item_codes(path / ITEM_CODES_FILE, encoder, schema.n_items)
        _check_codebooks(path / MODEL_FILE, encoder)
    return manifest, schema, vocabs


def read_item_codes(file: Path, encoder: ItemEncoder, n_items: int) -> np.ndarray:
    """item_codes.npy, checked against the manifest's levels and codebook size and the schema's n_items."""
    fix = "re-export the bundle (its codes do not match its manifest)"
    try:
        codes = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{file}: not a numpy array file ({exc}); {fix}") from None
    if codes.dtype != np.uint8:
        raise BundleError(f"{file}: dtype {codes.dtype}, expected uint8 (one byte per code); {fix}")
    if codes.shape != (n_items, encoder.levels):
        raise BundleError(f"{file}: shape {codes.shape}, expected (n_items={n_items}, levels={encoder.levels}); {fix}")
    if codes.size and int(codes.max()) >= encoder.codebook_size:
        raise BundleError(
            f"{file}: code {int(codes.max())} is outside the codebook (codebook_size={encoder.codebook_size}); {fix}"
        )
    return codes


def _check_codebooks(file: Path, encoder: ItemEncoder) -> None:
    want = [encoder.levels, encoder.codebook_size, encoder.dim]
    found = onnx_initializers(file).get(CODEBOOKS)
    fix = "the graph does not match its manifest: re-export the bundle"
    if found is None:
        raise BundleError(f"{file}: no codebook initializer {CODEBOOKS!r} (a sid graph holds one); {fix}")
    dims, dtype = found
    if dims != want or dtype != ONNX_FLOAT:
        raise BundleError(
            f"{file}: codebook initializer {CODEBOOKS!r} is {dims} (ONNX type {dtype}), the manifest says float32 "
            f"[levels, codebook_size, dim] = {want}; {fix}"
        )


def onnx_initializers(file: Path) -> dict[str, tuple[list[int], int]]:
    """name -> (dims, ONNX element type) of an ONNX graph's initializers, read from the protobuf wire
    format: the serving image has ONNX Runtime, which does not expose them, and not the onnx package."""
    try:
        model = memoryview(file.read_bytes())
        graph = next((v for f, v in _fields(model) if f == 7), None)  # ModelProto.graph
        out: dict[str, tuple[list[int], int]] = {}
        for field, value in _fields(graph) if isinstance(graph, memoryview) else ():
            if field == 5 and isinstance(value, memoryview):  # GraphProto.initializer: a TensorProto
                dims: list[int] = []
                name, dtype = "", 0
                for tf, tv in _fields(value):
                    if tf == 1:  # dims: packed or one varint each
                        dims += list(_varints(tv)) if isinstance(tv, memoryview) else [tv]
                    elif tf == 2 and isinstance(tv, int):
                        dtype = tv
                    elif tf == 8 and isinstance(tv, memoryview):
                        name = bytes(tv).decode()
                out[name] = (dims, dtype)
    except (IndexError, ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{file}: not a readable ONNX model ({exc}); re-copy or re-export the bundle") from None
    return out


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _varints(buf: memoryview) -> Iterator[int]:
    pos = 0
    while pos < len(buf):
        value, pos = _varint(buf, pos)
        yield value


def _fields(buf: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of one protobuf message: varints as ints, length-delimited as views."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield key >> 3, value
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise ValueError("truncated message")
            yield key >> 3, buf[pos : pos + size]
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _read_manifest(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise BundleError(f"{file}: missing; is {file.parent} a version directory written by `psad export`?")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{file}: not valid JSON ({exc}); re-copy or re-export the bundle") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{file}: expected a JSON object with a 'files' table; re-export the bundle")
    for name, entry in manifest["files"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or "/" in name:
            raise BundleError(f"{file}: files.{name} must be {{'sha256': hex, 'bytes': n}} for a file in the bundle")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{file}: format_version {manifest.get('format_version')!r}, this release reads {FORMAT_VERSION}; "
            "re-export the bundle with this release"
        )
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(
            f"{file}: schema_version {manifest.get('schema_version')!r}, this release reads {SCHEMA_VERSION}; "
            "re-export the model with this release"
        )
    for key, kind in (("name", str), ("version", int)):
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise BundleError(f"{file}: '{key}' must be a {kind.__name__}; re-export the bundle")
    return manifest


def sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def latest_version(repo: Path, name: str) -> int | None:
    """The highest complete version of model `name` in a repository (None when there is none).

    A version directory is complete once it has a manifest (export renames it into place whole);
    the service polls this to pick up new versions.
    """
    model_dir = Path(repo) / name
    if not model_dir.is_dir():
        return None
    versions = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / MANIFEST_FILE).is_file()]
    return max(versions, default=None)
