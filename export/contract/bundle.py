"""The bundle format: the files of a model version directory, its manifest, and the checks that
need no ONNX Runtime session (the exporter writes this format, export.runtime and the service read it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, get_args

from export.contract.schema import SCHEMA_VERSION, FeatureSchema, SchemaError, Vocabularies, model_inputs

FORMAT_VERSION = 1
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # a model name: one path component, no leading dot
MODEL_FILE = "model.onnx"
FP16_FILE = "model_fp16.onnx"
INT8_FILE = "model_int8.onnx"
MANIFEST_FILE = "manifest.json"
REQUIRED_FILES = (MODEL_FILE, "schema.json", "vocab.json")
Device = Literal["auto", "cpu", "cuda"]  # where a model runs: CUDA when it works (auto), or as named
DEVICES: tuple[str, ...] = get_args(Device)


class BundleError(ValueError):
    """A bundle cannot be served; the message names the file and the problem."""


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
    return manifest, schema, vocabs


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
