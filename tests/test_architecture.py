"""The layering of docs/architecture.md as a user of the serving image meets it: the request path
starts with none of the offline code or its libraries installed."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

# opentelemetry's SDK and exporter: the `tracing` extra, needed only with tracing on (the API comes with FastAPI).
OFFLINE = (
    *("training", "psad", "loadtest", "torch", "pandas", "pyarrow", "tqdm", "onnx", "safetensors", "matplotlib"),
    *("opentelemetry.sdk", "opentelemetry.exporter"),
)

# A None entry in sys.modules makes `import name` (and any submodule) raise ImportError, as if the
# package were not installed: the serving image's situation.
IMPORT_SERVICE = f"""
import importlib, pkgutil, sys
sys.modules.update(dict.fromkeys({OFFLINE!r}))
import service
names = sorted(m.name for m in pkgutil.walk_packages(service.__path__, "service."))
for name in names:
    importlib.import_module(name)
from service.app import create_app
from service.settings import Settings
create_app(Settings())
print(len(names))
"""


def test_the_service_imports_and_builds_its_app_without_the_offline_code() -> None:
    done = subprocess.run([sys.executable, "-c", IMPORT_SERVICE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) >= 10  # every module of service/ was imported


def test_blocking_a_package_does_block_it() -> None:
    """The check above could pass vacuously if blocking did nothing: importing a blocked package fails."""
    code = f"""
import sys
sys.modules.update(dict.fromkeys({OFFLINE!r}))
try:
    import export.exporter  # needs torch and training
except ImportError:
    print("blocked")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "blocked", done.stderr


TRAIN_EXTRA = ("torch", "onnx", "onnxscript", "safetensors", "matplotlib", "sklearn", "duckdb")


def test_the_psad_command_starts_without_the_train_extra() -> None:
    """The tools image (`docker build --target tools`) has none of the `train` extra: `psad profiles
    load` must still start, so no command module may import those before its command runs."""
    code = f"import sys; sys.modules.update(dict.fromkeys({TRAIN_EXTRA!r})); from psad.cli import app; "
    code += "print(len(app.registered_commands))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) >= 5
