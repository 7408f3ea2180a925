"""The serving model and its hot swap.

A new version is loaded, verified and warmed (export.runtime.load_bundle does all three) in a
worker thread while the current one keeps serving; only then is the reference swapped, in one
assignment. A request takes the reference once at its start, so in-flight requests finish on the
bundle they started with. A bundle that fails to load is refused and remembered (polling does
not retry it), and the current one keeps serving. A version whose directory does not exist yet is
refused but not remembered: it is missing, not broken, so polling loads it once it appears.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from export.runtime import Bundle, BundleError, latest_version, load_bundle
from service import metrics
from service.settings import Settings

log = logging.getLogger("psad.service")


@dataclass(frozen=True)
class ReloadResult:
    result: str  # "loaded", "unchanged" or "refused"
    version: int  # the version serving after the attempt
    detail: str = ""


class ModelStore:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.repo = Path(settings.model_repo)
        self.current: Bundle | None = None
        self._lock = asyncio.Lock()
        self._refused: set[int] = set()

    def target_version(self, requested: int | None = None) -> int:
        """The version to serve: the requested one, the pinned PSAD_MODEL_VERSION, or the latest."""
        if requested is not None:
            return requested
        if self.settings.model_version != "latest":
            return int(self.settings.model_version)
        version = latest_version(self.repo, self.settings.model_name)
        if version is None:
            raise BundleError(
                f"{self.repo / self.settings.model_name}: no model version found; export one with `psad export` "
                "or set PSAD_MODEL_REPO / PSAD_MODEL_NAME"
            )
        return version

    def path(self, version: int) -> Path:
        return self.repo / self.settings.model_name / str(version)

    def _load(self, version: int) -> Bundle:
        return load_bundle(self.path(version), device=self.settings.device, threads=self.settings.threads)

    async def start(self) -> Bundle:
        """Load the first model; a failure here stops startup (nothing to serve)."""
        bundle = await asyncio.to_thread(self._load, self.target_version())
        self._swap(bundle)
        return bundle

    async def reload(self, requested: int | None = None) -> ReloadResult:
        async with self._lock:
            current = self.current.version if self.current else 0
            try:
                version = self.target_version(requested)
            except BundleError as exc:
                return self._refuse(current, str(exc))
            if version == current:
                metrics.RELOADS.labels("unchanged").inc()
                return ReloadResult("unchanged", current)
            if not self.path(version).is_dir():
                return self._refuse(
                    current, f"{self.path(version)}: no such bundle directory (yet); export it with `psad export`"
                )
            try:
                bundle = await asyncio.to_thread(self._load, version)
            except Exception as exc:  # whatever the cause, refuse it once: polling must not retry it forever
                self._refused.add(version)
                return self._refuse(current, str(exc) if isinstance(exc, BundleError) else repr(exc))
            self._swap(bundle)
            metrics.RELOADS.labels("loaded").inc()
            log.info("model loaded", extra={"model": bundle.name, "version": bundle.version, "previous": current})
            return ReloadResult("loaded", bundle.version)

    def _refuse(self, current: int, reason: str) -> ReloadResult:
        metrics.RELOADS.labels("refused").inc()
        log.warning("model reload refused", extra={"reason": reason, "serving": current})
        return ReloadResult("refused", current, reason)

    def _swap(self, bundle: Bundle) -> None:
        old, self.current = self.current, bundle
        if old is not None:
            metrics.MODEL_INFO.labels(old.name, str(old.version), old.provider).set(0)
        metrics.MODEL_INFO.labels(bundle.name, str(bundle.version), bundle.provider).set(1)

    async def poll(self, interval_s: float) -> None:
        """Follow the repository: load each new latest version once (refused ones are skipped)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                latest = latest_version(self.repo, self.settings.model_name)
                if latest is not None and latest not in self._refused and latest != self.current.version:
                    await self.reload(latest)
            except Exception:  # keep polling whatever a repository scan throws
                log.warning("model repository poll failed", exc_info=True)
