"""The serving model and its hot swap.

A new version is loaded, verified and warmed (export.runtime.load_bundle does all three) in a
worker thread while the current one keeps serving; only then is the reference swapped, in one
assignment. A request takes the reference once at its start, so in-flight requests finish on the
bundle they started with. A bundle that fails to load is refused and remembered (polling does
not retry it), and the current one keeps serving. A version whose directory does not exist yet is
refused but not remembered: it is missing, not broken, so polling loads it once it appears.

With several workers (service.fleet) a version loaded here becomes the server's target, which
the other workers follow; the reload's answer says what each worker then serves.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from export.contract.bundle import BundleError
from export.runtime import Bundle, load_bundle
from service import metrics
from service.api import ReloadResult, WorkerVersion
from service.fleet import FOLLOW_S, Fleet
from service.model_repo import RepoUnavailable, open_repo
from service.settings import Settings

log = logging.getLogger("psad.service")
FLEET_WAIT_S = 60.0  # how long a reload waits for the other workers to load the version


class ModelStore:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.repo = open_repo(settings)  # a directory, or an fsspec URL downloaded into a cache
        self._current: Bundle | None = None  # set by start(), before the app takes requests
        self._lock = asyncio.Lock()
        self._refused: dict[int, str] = {}
        self.fleet = Fleet(settings.fleet_dir) if settings.fleet_dir is not None else None

    @property
    def current(self) -> Bundle:
        """The bundle being served."""
        if self._current is None:
            raise RuntimeError("no model loaded yet: ModelStore.start() runs in the app's lifespan")
        return self._current

    def target_version(self, requested: int | None = None) -> int:
        """The version to serve: the requested one, the pinned PSAD_MODEL_VERSION, or the latest."""
        if requested is not None:
            return requested
        if self.settings.model_version != "latest":
            return int(self.settings.model_version)
        version = self.repo.latest(self.settings.model_name)
        if version is None:
            raise BundleError(
                f"{self.settings.model_repo}/{self.settings.model_name}: no model version found; "
                "export one with `psad export` or set PSAD_MODEL_REPO / PSAD_MODEL_NAME"
            )
        return version

    def _resolve(self, requested: int | None, current: int) -> tuple[int, bool]:
        """The version to load, and whether the repository lacks it."""
        version = self.target_version(requested)
        return version, version != current and not self.repo.exists(self.settings.model_name, version)

    def path(self, version: int) -> Path:
        """The version's local directory (a URL repository's is downloaded into the cache first)."""
        return self.repo.fetch(self.settings.model_name, version)

    def _load(self, version: int) -> Bundle:
        name = self.settings.model_name
        try:
            return load_bundle(self.path(version), device=self.settings.device, threads=self.settings.threads)
        except BundleError:
            self.repo.discard(name, version)  # a corrupt download: fetch the upload again next time
            raise

    async def start(self) -> Bundle:
        """Load the first model, the server's target when other workers already serve one; a
        failure here stops startup (nothing to serve)."""
        joined = self.fleet.target() if self.fleet is not None else None
        try:
            bundle = await asyncio.to_thread(self._load, joined or self.target_version())
        except Exception:
            if joined is None:
                raise
            # the others serve it from memory, but its files are gone: this worker must still start
            log.warning("cannot load the server's version; starting on the repository's", exc_info=True)
            joined = None
            bundle = await asyncio.to_thread(self._load, self.target_version())
        self._swap(bundle)
        if self.fleet is not None:
            if joined is None:  # the first workers: the last to start decides, the others follow
                self.fleet.set_target(bundle.version)
            self.fleet.report(bundle.version, self._refused)
        return bundle

    async def reload(self, requested: int | None = None) -> ReloadResult:
        """Load here; with several workers, make it the server's version and wait for the others."""
        result = await self._reload_here(requested)
        if self.fleet is None or result.result == "refused":
            return result
        self.fleet.set_target(result.version)
        states = await self.fleet.settle(result.version, FLEET_WAIT_S)
        workers = [WorkerVersion(pid=s.pid, version=s.version) for s in states]
        behind = [s for s in states if s.version != result.version]
        if not behind:
            return result.model_copy(update={"workers": workers})
        why = "; ".join(f"worker {s.pid}: {s.refused.get(result.version, 'still loading')}" for s in behind)
        detail = f"{len(behind)} of {len(states)} workers do not serve version {result.version} ({why})"
        log.warning("model reload partial", extra={"version": result.version, "detail": detail})
        return ReloadResult(result="partial", version=result.version, detail=detail, workers=workers)

    async def follow(self) -> None:
        """Serve the server's target: load it when another worker has set a new one."""
        assert self.fleet is not None
        while True:
            await asyncio.sleep(FOLLOW_S)
            try:
                target = self.fleet.target()
                if (
                    target is not None
                    and target != self.current.version
                    and target not in self._refused
                    # a missing version waits here, unretried and unlogged
                    and await asyncio.to_thread(self.repo.exists, self.settings.model_name, target)
                ):
                    await self._reload_here(target)
            except Exception:  # keep following whatever the shared directory throws
                log.warning("following the server's model version failed", exc_info=True)

    async def _reload_here(self, requested: int | None) -> ReloadResult:
        result = await self._reload_locked(requested)
        if self.fleet is not None:
            self.fleet.report(self.current.version, self._refused)
        return result

    async def _reload_locked(self, requested: int | None) -> ReloadResult:
        async with self._lock:
            current = self._current.version if self._current else 0
            try:  # in a thread: a URL repository answers over the network
                version, missing = await asyncio.to_thread(self._resolve, requested, current)
            except (BundleError, OSError) as exc:  # OSError: the repository unreadable, a name too long
                return self._refuse(current, str(exc))
            if version == current:
                metrics.RELOADS.labels("unchanged").inc()
                return ReloadResult(result="unchanged", version=current, detail="")
            if missing:
                where = self.repo.describe(self.settings.model_name, version)
                return self._refuse(current, f"{where}: no such bundle directory (yet); export it with `psad export`")
            try:
                bundle = await asyncio.to_thread(self._load, version)
            except RepoUnavailable as exc:  # not broken, not here yet: polling tries again
                return self._refuse(current, str(exc))
            except Exception as exc:  # whatever the cause, refuse it once: polling must not retry it forever
                self._refused[version] = str(exc) if isinstance(exc, BundleError) else repr(exc)
                return self._refuse(current, self._refused[version])
            self._swap(bundle)
            self._refused.pop(version, None)  # refused once (say, while being copied), loaded now
            metrics.RELOADS.labels("loaded").inc()
            log.info("model loaded", extra={"model": bundle.name, "version": bundle.version, "previous": current})
            return ReloadResult(result="loaded", version=bundle.version, detail="")

    def _refuse(self, current: int, reason: str) -> ReloadResult:
        metrics.RELOADS.labels("refused").inc()
        log.warning("model reload refused", extra={"reason": reason, "serving": current})
        return ReloadResult(result="refused", version=current, detail=reason)

    def _swap(self, bundle: Bundle) -> None:
        old, self._current = self._current, bundle
        if old is not None:
            metrics.MODEL_INFO.labels(old.name, str(old.version), old.provider).set(0)
        metrics.MODEL_INFO.labels(bundle.name, str(bundle.version), bundle.provider).set(1)

    async def poll(self, interval_s: float) -> None:
        """Follow the repository: load each new latest version once (refused ones are skipped).

        A repository that cannot be listed (a bucket unreachable) is logged when that starts and
        when it ends, not at every poll."""
        failing: str | None = None
        while True:
            await asyncio.sleep(interval_s)
            try:
                latest = await asyncio.to_thread(self.repo.latest, self.settings.model_name)
            except Exception as exc:  # keep polling whatever a repository scan throws
                if failing != repr(exc):
                    log.warning("model repository poll failed", extra={"reason": repr(exc)}, exc_info=True)
                failing = repr(exc)
                continue
            if failing is not None:
                log.info("model repository readable again", extra={"repo": self.settings.model_repo})
                failing = None
            try:
                if latest is not None and latest not in self._refused and latest != self.current.version:
                    await self.reload(latest)
            except Exception:  # a reload refuses instead of raising; this is the unforeseen
                log.warning("model reload from polling failed", exc_info=True)
