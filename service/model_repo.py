"""Where the model store finds versions: a local directory, or any fsspec URL (s3://, gs://, ...).

A local repository is read in place. A URL repository is listed remotely with the same rule as
export.contract.bundle.latest_version (numeric directories with a manifest); the chosen version is
downloaded into `<cache>/<url digest>/<name>/<version>/` and then verified by load_bundle like a local one.
A download goes into a temp directory beside its place and is renamed there whole, so a half
download is never loaded; when several workers download the same version the first rename wins
and the others discard their copy. A cached copy that fails verification is removed, so the next
reload fetches the upload again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from export.contract.bundle import MANIFEST_FILE, BundleError, latest_version
from service.settings import Settings

INSTALL_HINT = "pip install 'psad[remote]' (s3fs, gcsfs) or the fsspec backend of that protocol"


class RepoUnavailable(OSError):
    """A download that failed on the way (the store unreachable, a file gone mid-copy): the version
    is not broken, so polling tries it again, unlike one that fails verification."""


class LocalRepo:
    """A repository directory: versions are served from where they are, with no copy."""

    def __init__(self, root: str):
        self.root = Path(root)

    def latest(self, name: str) -> int | None:
        return latest_version(self.root, name)

    def exists(self, name: str, version: int) -> bool:
        return self.local_path(name, version).is_dir()

    def describe(self, name: str, version: int) -> str:
        return str(self.local_path(name, version))

    def local_path(self, name: str, version: int) -> Path:
        return self.root / name / str(version)

    def fetch(self, name: str, version: int) -> Path:
        return self.local_path(name, version)

    def discard(self, name: str, version: int) -> None:
        """Nothing to do: a broken local bundle is the operator's to fix."""


class RemoteRepo:
    """A repository at an fsspec URL, downloaded into a local cache before loading."""

    def __init__(self, url: str, options: dict[str, Any], cache_dir: Path):
        try:
            import fsspec  # type: ignore[import-untyped]  # only URL repositories need it

            self.fs, root = fsspec.core.url_to_fs(url, **options)
        except (ImportError, ValueError) as exc:  # fsspec, the protocol or its backend missing
            raise BundleError(f"PSAD_MODEL_REPO={url}: cannot open ({exc}); {INSTALL_HINT}") from None
        self.url = url
        self.root = root.rstrip("/")
        # One cache directory per repository URL: two repositories' psad/3 are different bundles.
        self.cache = cache_dir / hashlib.sha256(url.encode()).hexdigest()[:16]

    def latest(self, name: str) -> int | None:
        try:
            entries = self.fs.ls(f"{self.root}/{name}", detail=False)
        except FileNotFoundError:
            if not self._root_exists():
                raise BundleError(
                    f"PSAD_MODEL_REPO={self.url}: not found (no such bucket or prefix); check the URL, the "
                    "credentials (AWS_*, GOOGLE_APPLICATION_CREDENTIALS) and PSAD_MODEL_REPO_OPTIONS"
                ) from None
            return None
        except Exception as exc:  # credentials refused, endpoint unreachable: the backend's own errors
            raise BundleError(
                f"PSAD_MODEL_REPO={self.url}: cannot list {name}/ ({exc!r}); check the credentials and "
                "PSAD_MODEL_REPO_OPTIONS"
            ) from None
        self.fs.invalidate_cache()  # the next poll must see new uploads, not the listing cache
        names = (p.rstrip("/").rsplit("/", 1)[-1] for p in entries)
        # Highest first, one request per version until a complete one: an upload in progress has no
        # manifest yet (upload it last).
        for version in sorted((int(v) for v in names if v.isdigit()), reverse=True):
            if self.exists(name, version):
                return version
        return None

    def _root_exists(self) -> bool:
        try:
            return bool(self.fs.exists(self.root))
        except Exception:  # noqa: BLE001 - an unlistable root is the same answer: nothing to serve
            return False

    def _remote(self, name: str, version: int, file: str = "") -> str:
        return f"{self.root}/{name}/{version}" + (f"/{file}" if file else "")

    def exists(self, name: str, version: int) -> bool:
        return bool(self.fs.exists(self._remote(name, version, MANIFEST_FILE)))

    def describe(self, name: str, version: int) -> str:
        return f"{self.url.rstrip('/')}/{name}/{version}"

    def local_path(self, name: str, version: int) -> Path:
        return self.cache / name / str(version)

    def fetch(self, name: str, version: int) -> Path:
        """The cached copy of a version, downloaded first when the cache has none or when the
        upload's manifest is not the cached one (a version deleted and uploaded again). A store that
        cannot be read leaves the cached copy in use (load_bundle verifies it all the same)."""
        dest = self.local_path(name, version)
        if dest.is_dir():
            try:
                uploaded = self.fs.cat_file(self._remote(name, version, MANIFEST_FILE))
            except Exception:  # noqa: BLE001 - unreachable, credentials, deleted: serve what was verified
                return dest
            if (dest / MANIFEST_FILE).read_bytes() == uploaded:
                return dest
            self.discard(name, version)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{version}.download."))
        try:
            for entry in self.fs.ls(self._remote(name, version), detail=True):
                if entry["type"] == "file":
                    self.fs.get_file(entry["name"], str(tmp / entry["name"].rsplit("/", 1)[-1]))
            os.rename(tmp, dest)
        except Exception as exc:
            if not dest.is_dir():  # not another worker's finished copy: a failed download
                raise RepoUnavailable(f"{self.describe(name, version)}: download failed ({exc!r})") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone after a rename; the loser's copy otherwise
        return dest

    def discard(self, name: str, version: int) -> None:
        """Drop a cached copy that failed verification, so the next reload downloads it again."""
        shutil.rmtree(self.local_path(name, version), ignore_errors=True)


ModelRepo = LocalRepo | RemoteRepo


def open_repo(settings: Settings) -> ModelRepo:
    """A local path stays on the direct path; anything with `://` goes through fsspec."""
    if "://" not in settings.model_repo or settings.model_repo.startswith("file://"):
        return LocalRepo(settings.model_repo.removeprefix("file://"))
    return RemoteRepo(settings.model_repo, settings.model_repo_options, settings.model_cache_dir)
