"""The model this serving process runs, following the registry's 'current' pointer (hot swap)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from service.inference.ensemble import Ensemble, ModelError, check_outputs_finite, load_ensemble
from service.loop.registry import Registry

log = logging.getLogger("uga.registry")


class ModelHolder:
    """The ensemble this process serves. ``current()`` is what a new job pins for its whole run.

    A watcher thread polls the store's pointer; a new version is loaded and warmed *before* the
    reference is switched (between requests: in-flight work keeps its own reference). A version that
    this process has failed to load on every poll for ``load_retry_s`` (a failure may be this replica's
    passing trouble: memory, a volume hiccup) is marked failed for the deployment and the pointer is
    moved back.
    """

    def __init__(
        self,
        registry: Registry,
        *,
        providers: str = "auto",
        threads: int = 0,
        on_swap: Callable[[str | None, str], None] | None = None,
        load_retry_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.registry, self.providers, self.threads = registry, providers, threads
        self.load_retry_s, self.clock = load_retry_s, clock
        self._failing: tuple[str, float] | None = None  # (version, monotonic time of its first failure in a row)
        self._ensemble: Ensemble | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_swap = on_swap

    def _load(self, version: str) -> Ensemble:
        """Read the version whole, check it against the registry's hash, warm it up (then it may serve)."""
        record = self.registry.versions.get(version)
        ens = load_ensemble(
            self.registry.path(version),
            providers=self.providers,
            threads=self.threads,
            expect_sha256=record.sha256 if record else None,
        )
        check_outputs_finite(ens)
        return ens

    def load(self) -> Ensemble:
        version = self.registry.versions.current() or self.registry.ensure_baseline()
        self._ensemble = self._load(version)
        return self._ensemble

    @property
    def loaded(self) -> bool:
        return self._ensemble is not None

    @property
    def version(self) -> str | None:
        return self._ensemble.version if self._ensemble else None

    def current(self) -> Ensemble:
        ens = self._ensemble
        if ens is None:
            raise ModelError("no model loaded")
        return ens

    def sync(self) -> bool:
        """Follow the pointer once. True when this process switched versions."""
        target = self.registry.versions.current()
        with self._lock:
            served = self.version
            if target is None or target == served:
                self._failing = None  # a later promotion of a version that failed here starts afresh
                return False
            try:
                ens = self._load(target)
            except Exception as exc:  # noqa: BLE001 - any load failure keeps the old model
                reason = f"failed to load: {exc}".splitlines()[0][:300]
                if self._failing is None or self._failing[0] != target:
                    self._failing = (target, self.clock())
                failing_s = self.clock() - self._failing[1]
                if failing_s < self.load_retry_s:
                    log.warning("model %s %s (failing for %.0f of %.0f s); staying on %s", target, reason,
                                failing_s, self.load_retry_s, served)  # fmt: skip
                    return False
                self._failing = None
                # back to the version ``target`` replaced (this worker may lag behind it, serving an older one)
                back = self.registry.versions.rollback_target() or served
                log.error("model %s %s; staying on %s and moving the pointer back to %s", target, reason, served, back)
                self.registry.versions.fail_and_roll_back(target, reason, back)
                return False
            self._ensemble = ens
            self._failing = None
        log.info("hot swap: %s -> %s", served, target)
        if self.on_swap:
            self.on_swap(served, target)
        return True

    def start_watch(self, interval_s: float = 1.0) -> None:
        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.sync()
                except Exception:  # noqa: BLE001 - keep watching
                    log.exception("model watcher")

        self._thread = threading.Thread(target=loop, name="uga-model-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
