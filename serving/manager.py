"""Which model versions are loaded, which one answers a request, and how versions come and go.

Per model, the configured version policy picks versions from the folders on disk. A new version is
loaded (warmup included) before an old one is unloaded; if the new one fails, the old one keeps
serving and the failure is shown in the model status with its error. A version being unloaded takes no
new requests and is closed only when its in-flight requests have finished (``Lease``). Servables that
do not come from a model folder (ensembles) are registered once with ``add_static`` and survive
config reloads. States follow TF Serving: START, LOADING, AVAILABLE, UNLOADING, END.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from carclf.errors import (
    CarClfError,
    ConfigError,
    FailedPrecondition,
    Internal,
    InvalidInput,
    NotFound,
    Unavailable,
)
from carclf.serving.config import ModelConfig, ModelsConfig
from carclf.serving.repository import fingerprint, list_versions, misplaced_base_path, scan_versions
from carclf.serving.servable import Dependencies, Servable

log = logging.getLogger(__name__)


class State(enum.IntEnum):
    """tensorflow.serving.ModelVersionStatus.State."""

    UNKNOWN = 0
    START = 10
    LOADING = 20
    AVAILABLE = 30
    UNLOADING = 40
    END = 50


@dataclass
class VersionEntry:
    model: str
    version: int
    path: Path | None
    state: State = State.START
    error: CarClfError | None = None
    servable: Servable | None = None
    inflight: int = 0
    fingerprint: tuple | None = None


@dataclass(frozen=True)
class VersionStatus:
    version: int
    state: State
    error_code: str = "OK"
    error_message: str = ""


@dataclass
class _Model:
    name: str
    config: ModelConfig | None = None          # None for static servables
    versions: dict[int, VersionEntry] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    active: bool = True                        # in the current config (or static)
    retired: list[VersionEntry] = field(default_factory=list)  # from a previous base_path, unloading
    # from a previous base_path, still loaded: they answer until a version of the new one is AVAILABLE
    standby: list[VersionEntry] = field(default_factory=list)
    warned_missing: bool = False               # "no version folder" was logged already
    warned_unlisted: bool = False              # "base path cannot be listed, versions keep serving" was logged
    dependencies: Dependencies | None = None   # static servables only: models of this server it calls
    degraded: dict[str, str] = field(default_factory=dict)  # its members that cannot answer, its quorum met

    @property
    def static(self) -> bool:
        return self.config is None

    def answering(self) -> list[VersionEntry]:
        """The AVAILABLE versions a request without a version goes to: the current base_path's, else, while a
        moved model's new versions load, the previous base_path's (availability-preserving, as a new version
        of the same folder is loaded before the old one goes)."""
        current = [e for e in self.versions.values() if e.state == State.AVAILABLE]
        return current or [e for e in self.standby if e.state == State.AVAILABLE]

    def answering_version(self, version: int) -> VersionEntry | None:
        """The AVAILABLE entry of a version number: the current base_path's, else a standby one."""
        entry = self.versions.get(version)
        if entry is not None and entry.state == State.AVAILABLE:
            return entry
        if any(e.state == State.AVAILABLE for e in self.versions.values()):
            return None  # the new base_path serves: the old files do not answer any more
        return next((e for e in self.standby if e.version == version and e.state == State.AVAILABLE), None)


class Lease:
    """One request's hold on a version; the version is not closed before every lease is released."""

    __slots__ = ("_manager", "_entry", "_released")

    def __init__(self, manager: ModelManager, entry: VersionEntry):
        self._manager, self._entry, self._released = manager, entry, False

    @property
    def servable(self) -> Servable:
        assert self._entry.servable is not None
        return self._entry.servable

    @property
    def model_name(self) -> str:
        return self._entry.model

    @property
    def version(self) -> int:
        return self._entry.version

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._manager._release(self._entry)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


Loader = Callable[[str, int, Path], Servable]


def _labels_unavailable(problems: list[str], outcome: str) -> FailedPrecondition:
    """TF Serving's refusal of labels on versions that cannot serve, with what became of the config."""
    return FailedPrecondition(
        "Request to assign labels to versions which are not currently available for inference: "
        + ", ".join(problems) + f". {outcome}; load those versions first or use "
        "--allow_version_labels_for_unavailable_models")


class ModelManager:
    """Thread-safe registry of models and their versions."""

    def __init__(self, loader: Loader, *, allow_labels_for_unavailable: bool = False,
                 on_state: Callable[[str, int, State], None] | None = None):
        self._loader = loader
        self._allow_unavailable_labels = allow_labels_for_unavailable
        self._on_state = on_state
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._reconcile = threading.Lock()   # one apply_config / poll at a time
        self._models: dict[str, _Model] = {}
        self._config = ModelsConfig(models=(), source="<no config yet>")  # the last config applied whole
        self._closed = False

    # -- configuration -----------------------------------------------------------------------------

    def add_static(self, servable: Servable) -> None:
        """Register a servable that is not read from a model folder (an ensemble). It is AVAILABLE at once,
        or, when it depends on models of this server (``Servable.dependencies``), while enough of them are
        AVAILABLE; otherwise its version reads END with an UNAVAILABLE status that says which are missing."""
        with self._lock:
            existing = self._models.get(servable.name)
            if existing is not None and (existing.active or existing.static):
                raise ConfigError(f"a model named {servable.name!r} is already served", field="name")
            model = self._models[servable.name] = _Model(servable.name, dependencies=servable.dependencies())
            entry = VersionEntry(servable.name, int(servable.version), None, servable=servable)
            model.versions[entry.version] = entry
            self._update_dependent(model)

    def apply_config(self, config: ModelsConfig) -> None:
        """Serve exactly the models of ``config`` (others are unloaded); returns once new versions are
        loaded.

        All or nothing: a label on a version that the version policy will not serve from the folders as
        they are refuses the config before anything changes; a labelled version that then fails to load
        puts the previous config back (its models and labels) before the FailedPrecondition is raised.
        A config without ``model_config_list`` (``config.empty``) changes nothing, as in TF Serving; so a
        config file caught between truncation and writing never unloads the models.
        """
        if config.empty:
            log.info("%s holds no model_config_list: taking no action, the served models stay as they are",
                     config.source or "the new model config")
            return
        with self._reconcile:
            if not self._allow_unavailable_labels:
                self._check_labels_reachable(config)
            previous = self._config
            try:
                self._apply(config)
            except FailedPrecondition:
                log.warning("%s was not applied: putting back the previous model config (%s)",
                            config.source or "the new model config", previous.source or "as given")
                try:
                    self._apply(previous)
                except CarClfError as exc:
                    log.error("putting back the previous model config failed too: %s", exc.message)
                raise
            self._config = config

    def _check_labels_reachable(self, config: ModelsConfig) -> None:
        """Refuse labels on versions the policy will not pick from what is on disk now (nothing changed).

        As when serving, versions that failed to load and whose files have not changed since are passed over:
        the policy picks among the others."""
        problems = []
        for model in config.models:
            if not model.labels:
                continue
            on_disk = list_versions(model.base_path)
            broken: set[int] = set()
            with self._lock:
                known = self._models.get(model.name)
                if known is not None and known.config is not None and known.config.base_path == model.base_path:
                    broken = {v for v, path in on_disk.items() if self._failed_unchanged(known, v, path)}
            served = model.policy.select(set(on_disk) - broken)
            bad = [f"{label}->{version}" for label, version in sorted(model.labels.items()) if version not in served]
            if bad:
                skipped = f", passing over {sorted(broken)} that failed to load" if broken else ""
                problems.append(f"{model.name} ({', '.join(bad)}; versions {model.policy.describe()} serves from "
                                f"{model.base_path}: {sorted(served) or 'none'}{skipped})")
        if problems:
            raise _labels_unavailable(problems, "Nothing of this config was applied")

    def _apply(self, config: ModelsConfig) -> None:
        """Change the served models to ``config`` (the caller holds ``_reconcile``)."""
        with self._lock:
            wanted = {m.name: m for m in config.models}
            for name, model in self._models.items():
                if model.static and name in wanted:
                    raise ConfigError(f"model {name!r} is already served by --ensemble_config_file",
                                      source=config.source, field="model_config_list.config.name")
            for name, model in self._models.items():
                if not model.static and model.active and name not in wanted:
                    log.info("model %s left the config: unloading it", name)
                    model.active = False
                    model.labels = {}
                    for entry in model.versions.values():
                        if entry.state == State.AVAILABLE:
                            self._begin_unload(entry)
                    self._drop_standby(model)
            for name, model_config in wanted.items():
                model = self._models.setdefault(name, _Model(name))
                if model.config is not None and model.config.base_path != model_config.base_path:
                    self._retire_versions(model, model_config.base_path)
                model.config, model.active = model_config, True
        for name in wanted:
            self._reconcile_model(name)
        self._apply_labels(config)
        with self._lock:  # models that left the config with no version loaded changed no state on the way
            for model in self._models.values():
                if model.dependencies is not None:
                    self._update_dependent(model)

    def poll(self) -> None:
        """Look at every model's folder once: load new versions, unload those the policy dropped."""
        with self._reconcile:
            with self._lock:
                names = [n for n, m in self._models.items() if m.active and not m.static]
            for name in names:
                self._reconcile_model(name)

    def _reconcile_model(self, name: str) -> None:
        with self._lock:
            model = self._models[name]
            config = model.config
        if config is None or self._closed:
            return
        on_disk = scan_versions(config.base_path)
        if on_disk is None and self._keeps_serving_unlisted(model, config.base_path):
            return
        if on_disk is not None and model.warned_unlisted:
            log.info("model %s: %s can be listed again", name, config.base_path)
            model.warned_unlisted = False
        on_disk = on_disk or {}
        if not on_disk and not model.versions and not model.warned_missing:
            hint = misplaced_base_path(config.base_path)
            log.warning("model %s: no version folder under %s yet%s", name, config.base_path,
                        f" ({hint})" if hint else "")
        model.warned_missing = not on_disk
        # The policy picks among versions that have not failed (unless their files changed since): a broken
        # newest version leaves the next one serving. Loading may reveal new failures, hence the loop.
        for _attempt in range(len(on_disk) + 1):
            broken = {v for v, path in on_disk.items() if self._failed_unchanged(model, v, path)}
            desired = config.policy.select(set(on_disk) - broken)
            failed_now = False
            for version in sorted(desired):
                if self._closed:  # shutting down: load nothing more
                    return
                with self._lock:
                    entry = model.versions.get(version)
                    if entry is not None and entry.state == State.UNLOADING and not self._closed:
                        self._keep_loaded(entry)
                    if entry is not None and entry.state in (State.LOADING, State.AVAILABLE):
                        continue
                failed_now |= not self._load(model, version, on_disk[version], fingerprint(on_disk[version]))
            if not failed_now:
                break
        with self._lock:
            if self._closed:  # close() unloads everything itself
                return
            if model.standby and any(e.state == State.AVAILABLE for e in model.versions.values()):
                self._drop_standby(model)
            serving_desired = any(model.versions[v].state == State.AVAILABLE for v in desired if v in model.versions)
            for version, entry in model.versions.items():
                if entry.state == State.AVAILABLE and version not in desired:
                    if serving_desired or version not in on_disk:
                        log.info("unloading %s version %d (policy %s)", name, version, config.policy.describe())
                        labelled = sorted(label for label, v in model.labels.items() if v == version)
                        if labelled:  # as in TF Serving the label stays, pointing at nothing: say so once
                            log.warning("%s version %d is unloaded while label(s) %s point at it: requests by "
                                        "label fail (NOT_FOUND) until the model config moves them", name, version,
                                        ", ".join(labelled))
                        self._begin_unload(entry)

    @staticmethod
    def _keeps_serving_unlisted(model: _Model, base_path: Path) -> bool:
        """Whether a model whose base path cannot be listed (gone, unreadable) keeps its loaded versions as they
        are: it does while any is loaded or loading, as TF Serving skips such a path rather than unloading on a
        rename, an unmount or a network filesystem's hiccup (a model leaves by the model config). Said once."""
        loaded = sorted(v for v, e in model.versions.items() if e.state in (State.LOADING, State.AVAILABLE))
        if loaded and not model.warned_unlisted:
            log.warning("model %s: %s cannot be listed; versions %s keep serving until it can", model.name,
                        base_path, loaded)
            model.warned_unlisted = True
        return bool(loaded)

    def _keep_loaded(self, entry: VersionEntry) -> None:
        """A version being unloaded is wanted again (its model back in the config, or the policy's choice again)
        while its last requests run: it is still loaded, so it answers again at once instead of being closed and
        loaded anew (lock held)."""
        log.info("%s version %d is wanted again while it was unloading: it stays loaded", entry.model, entry.version)
        self._set_state(entry, State.AVAILABLE)

    @staticmethod
    def _failed_unchanged(model: _Model, version: int, path: Path) -> bool:
        """True for a version that failed to load and whose files have not changed since."""
        entry = model.versions.get(version)
        return entry is not None and entry.error is not None and entry.fingerprint == fingerprint(path)

    def _load(self, model: _Model, version: int, path: Path, print_: tuple) -> bool:
        """Load one version (warmup included); True when it became AVAILABLE, or was loaded after the shutdown
        began and dropped (no failure to retry)."""
        entry = VersionEntry(model.name, version, path, fingerprint=print_)
        with self._lock:
            model.versions[version] = entry
            self._set_state(entry, State.START)
            self._set_state(entry, State.LOADING)
        log.info("loading %s version %d from %s", model.name, version, path)
        start = time.perf_counter()
        try:
            servable = self._loader(model.name, version, path)
        except CarClfError as exc:
            error: CarClfError | None = exc
        except Exception as exc:  # noqa: BLE001 - a broken folder must never take the server down
            error = Internal(f"{type(exc).__name__}: {exc}")
        else:
            error = None
        with self._lock:
            if error is not None:
                entry.error = error
                self._set_state(entry, State.END)
                log.error("%s version %d failed to load: %s", model.name, version, error.message)
                return False
            if not self._closed:
                entry.servable = servable
                self._set_state(entry, State.AVAILABLE)
                log.info("%s version %d AVAILABLE after %.1f s", model.name, version, time.perf_counter() - start)
                return True
            self._set_state(entry, State.END)  # the shutdown began during the load: nothing more is served
        log.info("%s version %d loaded after the shutdown began: not served", model.name, version)
        servable.close()
        return True

    def _apply_labels(self, config: ModelsConfig) -> None:
        problems = []
        with self._lock:
            for model_config in config.models:
                model = self._models[model_config.name]
                bad = [f"{label}->{version}" for label, version in sorted(model_config.labels.items())
                       if not self._allow_unavailable_labels
                       and getattr(model.versions.get(version), "state", None) != State.AVAILABLE]
                if not bad:
                    model.labels = dict(model_config.labels)
                    continue
                detail = f"{model.name} ({', '.join(bad)}"
                if not list_versions(model_config.base_path):
                    detail += f"; no version folder under {model_config.base_path}"
                failed = sorted({v: model.versions[v].error.message for v in model_config.labels.values()
                                 if v in model.versions and model.versions[v].error is not None}.items())
                for version, message in failed:  # the rollback takes these entries away: say why here
                    detail += f"; version {version} failed to load: {message}"
                problems.append(detail + ")")
        if problems:
            raise _labels_unavailable(problems, "Nothing of this config stays applied")

    # -- unloading ---------------------------------------------------------------------------------

    def _retire_versions(self, model: _Model, new_base_path: Path) -> None:
        """The model's base_path changed: its versions are other files now. Those loaded stand by, answering
        until a version of the new base_path is AVAILABLE, then they are unloaded (``_drop_standby``)."""
        loaded = [e for e in model.versions.values() if e.state == State.AVAILABLE]
        model.retired = [e for e in model.retired if e.state != State.END]
        if loaded:
            log.info("model %s moved to another base_path: versions %s keep answering until one from %s is "
                     "AVAILABLE", model.name, sorted(e.version for e in loaded), new_base_path)
        model.standby = [*(e for e in model.standby if e.state == State.AVAILABLE), *loaded]
        model.versions = {}
        model.labels = {}

    def _drop_standby(self, model: _Model) -> None:
        """Unload the previous base_path's versions (each once its in-flight requests are done) (lock held)."""
        for entry in model.standby:
            if entry.state == State.AVAILABLE:
                log.info("unloading %s version %d of its previous base_path", model.name, entry.version)
                self._begin_unload(entry)
                if entry.state == State.UNLOADING:
                    model.retired.append(entry)
        model.standby = []

    def _begin_unload(self, entry: VersionEntry) -> None:
        self._set_state(entry, State.UNLOADING)
        if entry.inflight == 0:
            self._finish_unload(entry)

    def _finish_unload(self, entry: VersionEntry) -> None:
        servable, entry.servable = entry.servable, None
        entry.error = None
        self._set_state(entry, State.END)
        if servable is not None:
            try:
                servable.close()
            except Exception:  # noqa: BLE001
                log.exception("closing %s version %d failed", entry.model, entry.version)

    def _release(self, entry: VersionEntry) -> None:
        with self._lock:
            entry.inflight -= 1
            if entry.inflight == 0 and entry.state == State.UNLOADING:
                self._finish_unload(entry)

    def _set_state(self, entry: VersionEntry, state: State) -> None:
        entry.state = state
        self._changed.notify_all()
        if self._on_state:
            self._on_state(entry.model, entry.version, state)
        model = self._models.get(entry.model)
        if model is not None and not model.static and not self._closed:  # (closing: members unload, no news)
            for other in self._models.values():
                if other.dependencies is not None:
                    self._update_dependent(other)

    def _why_not_callable(self, name: str, version: int | str | None = None) -> str | None:
        """Why a request to ``name`` (at a version number or label, or the latest) would fail for want of a
        loaded version, or None when it would be served (lock held)."""
        model = self._models.get(name)
        if model is None or not model.active or model.static:
            return "not in the model config"
        if isinstance(version, str):
            if version not in model.labels:
                return f"no version label {version!r} (labels: {', '.join(sorted(model.labels)) or 'none'})"
            version = model.labels[version]
        if version is None:
            return None if model.answering() else "no AVAILABLE version"
        return None if model.answering_version(version) is not None else f"version {version} not AVAILABLE"

    def _update_dependent(self, model: _Model) -> None:
        """A static servable's state from its dependencies: AVAILABLE, or END with the reason (lock held)."""
        down = self._unavailable_members(model.dependencies)
        reason = self._missing_dependencies(model.name, model.dependencies, down)
        if reason is not None:
            down = {}  # not answering at all: the END status says why
        if down != model.degraded:  # answering without some members (its quorum met): said once per change
            if down:
                log.warning("model %s answers without %s (%d of %d members needed)", model.name,
                            ", ".join(f"{m} ({why})" for m, why in down.items()), model.dependencies.needed,
                            len(model.dependencies.models))
            model.degraded = down
        for entry in model.versions.values():
            if reason is None and entry.state != State.AVAILABLE:
                if entry.error is not None:
                    log.info("model %s: its members are served again; AVAILABLE", model.name)
                entry.error = None
                self._set_state(entry, State.AVAILABLE)
            elif reason is not None and (entry.error is None or entry.error.message != reason):
                log.warning("%s", reason)
                entry.error = Unavailable(reason)
                self._set_state(entry, State.END)

    def _unavailable_members(self, deps: Dependencies | None) -> dict[str, str]:
        """The models a servable calls that could not answer now, with why (lock held)."""
        if deps is None:
            return {}
        return {m: why for m in deps.models if (why := self._why_not_callable(m, deps.versions.get(m)))}

    def _missing_dependencies(self, name: str, deps: Dependencies | None, down: dict[str, str]) -> str | None:
        """Why ``name`` cannot answer for lack of the models it calls (``down``: those that cannot answer),
        or None (lock held)."""
        if deps is None:
            return None
        if len(deps.models) - len(down) >= deps.needed:
            return None
        served = sorted(n for n, m in self._models.items() if m.active and not m.static) or ["none"]
        return (f"model {name} needs {deps.needed} of its {len(deps.models)} members AVAILABLE on this server; "
                f"not available: {', '.join(f'{m} ({why})' for m, why in down.items())}; this server's models: "
                f"{', '.join(served)}")

    # -- requests ----------------------------------------------------------------------------------

    def acquire(self, name: str, version: int | None = None, label: str | None = None) -> Lease:
        """The version that answers a request: ``version``, ``label`` or the newest AVAILABLE one."""
        with self._lock:
            model = self._models.get(name)
            if model is None or not model.active:
                spec = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
                raise NotFound(f"Servable not found for request: {spec}")
            if label:
                if label not in model.labels:
                    raise InvalidInput(f"Unrecognized servable version label: {label}")
                version = model.labels[label]
            if version is not None:
                entry = model.answering_version(version)
                if entry is None:
                    raise NotFound(f"Servable not found for request: Specific({name}, {version})")
            else:
                available = model.answering()
                if not available:
                    states = ", ".join(f"{v} {e.state.name}" + (f": {e.error.message}" if e.error else "")
                                       for v, e in sorted(model.versions.items())) or "none"
                    yet = "" if any(e.error for e in model.versions.values()) else " yet"
                    raise Unavailable(f"Servable not found for request: Latest({name}): no version of model {name} "
                                      f"is AVAILABLE{yet} (versions: {states})")
                entry = max(available, key=lambda e: e.version)
            entry.inflight += 1
            return Lease(self, entry)

    def status(self, name: str, version: int | None = None, label: str | None = None) -> list[VersionStatus]:
        """Version states of a model, newest first (all versions unless one is named)."""
        with self._lock:
            model = self._models.get(name)
            listed = dict(model.versions) if model is not None else {}
            if model is not None:  # a moved model whose new versions load: its previous ones answer, so are listed
                listed.update({e.version: e for e in model.answering()})
            if not listed:
                raise NotFound(f"Could not find any versions of model {name}")
            if label:
                if label not in model.labels or not model.active:
                    raise InvalidInput(f"Unrecognized servable version label: {label}")
                version = model.labels[label]
            if version is not None:
                if version not in listed:
                    raise NotFound(f"Could not find version {version} of model {name}")
                entries = [listed[version]]
            else:
                entries = sorted(listed.values(), key=lambda e: -e.version)
            return [VersionStatus(e.version, e.state, e.error.code if e.error else "OK",
                                  e.error.message if e.error else "") for e in entries]

    def model_names(self, *, active_only: bool = True) -> list[str]:
        with self._lock:
            return sorted(n for n, m in self._models.items() if m.active or not active_only)

    def labels(self, name: str) -> dict[str, int]:
        with self._lock:
            model = self._models.get(name)
            return dict(model.labels) if model else {}

    def readiness(self) -> dict[str, bool]:
        """Model -> whether it has an AVAILABLE version (every active model)."""
        with self._lock:
            return {name: bool(m.answering())
                    for name, m in sorted(self._models.items()) if m.active}

    def wait_for(self, name: str, version: int, state: State, timeout: float) -> bool:
        """Block until a version reaches ``state`` (tests and tooling)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                model = self._models.get(name)
                entry = model.versions.get(version) if model else None
                if entry is not None and entry.state == state:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)

    # -- shutdown ----------------------------------------------------------------------------------

    def close(self, timeout: float = 30.0) -> None:
        """Unload everything once in-flight requests are done (waiting at most ``timeout``).

        A poll or config reload still loading a version is not waited for (a large model's load and warmup
        take minutes): it stops at its next step, and the version it was loading is dropped when loaded."""
        with self._lock:
            self._closed = True
        reconciling = not self._reconcile.acquire(timeout=min(timeout, 1.0))
        if reconciling:
            log.info("a version is still loading; the shutdown goes on without it")
        try:
            self._unload_all(timeout)
        finally:
            if not reconciling:
                self._reconcile.release()

    def _unload_all(self, timeout: float) -> None:
        with self._lock:
            for model in self._models.values():
                for entry in model.versions.values():
                    if entry.state == State.AVAILABLE:
                        self._begin_unload(entry)
                self._drop_standby(model)
            deadline = time.monotonic() + timeout
            while any(e.state == State.UNLOADING for m in self._models.values()
                      for e in [*m.versions.values(), *m.retired]):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning("closing with requests still in flight")
                    break
                self._changed.wait(remaining)
