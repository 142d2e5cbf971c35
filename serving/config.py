"""TF Serving's text-protobuf configuration files, parsed and validated into small dataclasses.

``models.config`` is a ``ModelServerConfig`` (the official ``model_server_config_pb2``); the batching
parameters file and the monitoring file use the messages mirrored in ``carclf.serving.protos``.
Every problem raises ``ConfigError`` naming the file, the field and the value received.

Base paths. Real TF Serving needs absolute base paths; the deployment files use ``/models/<name>``
(the official image's mount point). The embedded server resolves every base path through a
``BasePathResolver``: a path under ``/models/`` is read from the local model repository when
``/models`` does not exist on this machine, and every resolved path must lie inside the model
repository (no ``..``, no symlink escaping it), whether it comes from a file, a flag or a reload request.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path, PurePosixPath

from google.protobuf import text_format

from carclf.errors import ConfigError, InvalidInput
from carclf.serving import protos

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
LABEL_RE = re.compile(r"^[a-zA-Z0-9_]+$")
CONTAINER_MODELS_ROOT = "/models"
DEFAULT_PROMETHEUS_PATH = "/monitoring/prometheus/metrics"
PLATFORMS = ("", "tensorflow")


# ---------------------------------------------------------------------------------------------
# models.config
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VersionPolicy:
    """Which versions found on disk should be loaded (TF Serving's ServableVersionPolicy)."""

    kind: str = "latest"               # latest | all | specific
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: Iterable[int]) -> set[int]:
        found = sorted(set(available))
        if self.kind == "all":
            return set(found)
        if self.kind == "specific":
            return set(found) & set(self.versions)
        return set(found[-self.num_versions:]) if found else set()

    def describe(self) -> str:
        if self.kind == "latest":
            return f"latest {{ num_versions: {self.num_versions} }}"
        if self.kind == "specific":
            return f"specific {{ versions: {list(self.versions)} }}"
        return "all {}"


@dataclass(frozen=True)
class ModelConfig:
    name: str
    base_path: Path               # resolved, absolute, inside the model repository
    policy: VersionPolicy = field(default_factory=VersionPolicy)
    labels: Mapping[str, int] = field(default_factory=dict)
    configured_base_path: str = ""  # as written in the file (e.g. /models/mobilenet_v2)


@dataclass(frozen=True)
class ModelsConfig:
    models: tuple[ModelConfig, ...]
    source: str = ""
    # no model_config_list at all (an empty file, or one caught half-written): TF Serving takes no action for
    # such a config, so the models served stay as they are. ``model_config_list {}`` serves nothing.
    empty: bool = False

    def names(self) -> list[str]:
        return [m.name for m in self.models]


class BasePathResolver:
    """Maps configured base paths to local folders inside one model repository."""

    def __init__(self, model_repository: str | os.PathLike, container_root: str = CONTAINER_MODELS_ROOT):
        self.model_repository = Path(model_repository).expanduser().absolute()
        self.container_root = container_root

    def resolve(self, base_path: str, *, source: str, field_name: str) -> Path:
        if not base_path:
            raise ConfigError("base_path is empty; expected an absolute path", source=source, field=field_name)
        if "://" in base_path:
            raise ConfigError(f"received {base_path!r}; the embedded server reads local folders only "
                              "(no file systems by URI)", source=source, field=field_name)
        posix = PurePosixPath(base_path)
        if not posix.is_absolute():
            raise ConfigError(f"received {base_path!r}; TF Serving needs an absolute base_path "
                              "(use `carclf serving-config` to write one from a model repository)",
                              source=source, field=field_name)
        if ".." in posix.parts:
            raise ConfigError(f"received {base_path!r}; '..' is not allowed in a base_path",
                              source=source, field=field_name)
        root = PurePosixPath(self.container_root)
        local = Path(base_path)
        if posix.is_relative_to(root) and not Path(self.container_root).exists():
            local = self.model_repository.joinpath(*posix.relative_to(root).parts)
        real, real_root = self._resolved(local)
        if not real.is_relative_to(real_root):
            raise ConfigError(f"received {base_path!r} (resolved to {real}), which is outside the model repository "
                              f"{real_root}; set --model_repository to the folder holding the models",
                              source=source, field=field_name)
        return real

    def check_version_folder(self, folder: Path) -> None:
        """InvalidInput unless a version folder resolves inside the model repository (a version symlinked
        out of it is refused, as a base path is)."""
        real, real_root = self._resolved(folder)
        if not real.is_relative_to(real_root):
            raise InvalidInput(f"version folder {folder} resolves to {real}, outside the model repository "
                               f"{real_root}; copy the version into the repository instead of linking to it")

    def _resolved(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """(``path`` with every symlink resolved, the model repository likewise): the pair the rule compares."""
        return Path(path).resolve(), self.model_repository.resolve()


def _policy_from_proto(policy, *, source: str, field_name: str) -> VersionPolicy:
    choice = policy.WhichOneof("policy_choice")
    if choice is None or choice == "latest":
        # proto3 cannot tell 0 from unset; TF Serving documents the default as 1.
        return VersionPolicy("latest", num_versions=max(1, policy.latest.num_versions if choice else 1))
    if choice == "all":
        return VersionPolicy("all")
    versions = tuple(sorted(set(int(v) for v in policy.specific.versions)))
    if not versions:
        raise ConfigError("specific.versions is empty; list at least one version", source=source, field=field_name)
    if any(v < 0 for v in versions):
        raise ConfigError(f"specific.versions must be >= 0, received {list(versions)}", source=source,
                          field=field_name)
    return VersionPolicy("specific", versions=versions)


def models_config_from_proto(proto, resolver: BasePathResolver, *, source: str) -> ModelsConfig:
    """Validate a ``ModelServerConfig`` message (from a file or a HandleReloadConfigRequest)."""
    choice = proto.WhichOneof("config")
    if choice == "custom_model_config":
        raise ConfigError("custom_model_config is not supported; use model_config_list", source=source,
                          field="custom_model_config")
    models: list[ModelConfig] = []
    seen: set[str] = set()
    for index, entry in enumerate(proto.model_config_list.config):
        where = f"model_config_list.config[{index}]"
        if not MODEL_NAME_RE.match(entry.name or ""):
            raise ConfigError(f"received {entry.name!r}; a model name is 1-128 letters, digits, '_', '-' or '.', "
                              "starting with a letter or digit", source=source, field=f"{where}.name")
        if entry.name in seen:
            raise ConfigError(f"model {entry.name!r} is listed twice", source=source, field=f"{where}.name")
        seen.add(entry.name)
        if entry.model_platform not in PLATFORMS:
            raise ConfigError(f"received {entry.model_platform!r}; the embedded server serves model_platform "
                              "'tensorflow' only", source=source, field=f"{where}.model_platform")
        base = resolver.resolve(entry.base_path, source=source, field_name=f"{where}.base_path")
        policy = _policy_from_proto(entry.model_version_policy, source=source,
                                    field_name=f"{where}.model_version_policy")
        labels = {}
        for label, version in entry.version_labels.items():
            if not LABEL_RE.match(label):
                raise ConfigError(f"received label {label!r}; labels are letters, digits and '_'", source=source,
                                  field=f"{where}.version_labels")
            if version < 0:
                raise ConfigError(f"label {label!r} points at version {version}; versions are >= 0",
                                  source=source, field=f"{where}.version_labels")
            labels[label] = int(version)
        models.append(ModelConfig(entry.name, base, policy, labels, configured_base_path=entry.base_path))
    return ModelsConfig(tuple(models), source=source, empty=choice is None)


def parse_text_proto(text: str, proto, what: str, source: str) -> None:
    """Parse ``text`` into ``proto``, or raise a ConfigError naming ``source`` and the message type ``what``.

    A leading UTF-8 byte order mark is refused by name: protobuf's text parser (TF Serving's and Triton's too)
    refuses it, and its own message points at a character nobody can see."""
    if text.startswith("\ufeff"):
        raise ConfigError(f"starts with a UTF-8 byte order mark, which {what} parsers (TF Serving's and Triton's "
                          "too) refuse; save the file without it", source=source)
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError as exc:
        raise ConfigError(f"not a valid {what}: {exc}", source=source) from None


def parse_models_config(text: str, resolver: BasePathResolver, *, source: str = "<models.config>") -> ModelsConfig:
    from carclf.tfprotos import model_server_config_pb2

    proto = model_server_config_pb2.ModelServerConfig()
    parse_text_proto(text, proto, "ModelServerConfig text proto", source)
    return models_config_from_proto(proto, resolver, source=source)


def load_models_config(path: str | os.PathLike, resolver: BasePathResolver) -> ModelsConfig:
    return parse_models_config(_read(path), resolver, source=str(path))


def single_model_config(name: str, base_path: str, resolver: BasePathResolver) -> ModelsConfig:
    """``--model_name`` / ``--model_base_path``: one model, latest version."""
    source = "--model_base_path"
    if not MODEL_NAME_RE.match(name or ""):
        raise ConfigError(f"received {name!r}; a model name is letters, digits, '_', '-' or '.'",
                          source="--model_name")
    absolute = str(Path(base_path).expanduser().absolute())
    return ModelsConfig((ModelConfig(name, resolver.resolve(absolute, source=source, field_name="base_path"),
                                     configured_base_path=base_path),), source=source)


def models_config_to_text(models: Iterable[tuple[str, str, VersionPolicy, Mapping[str, int]]]) -> str:
    """Write a ModelServerConfig text proto (name, base_path, policy, labels per model)."""
    from carclf.tfprotos import model_server_config_pb2

    proto = model_server_config_pb2.ModelServerConfig()
    proto.model_config_list.SetInParent()  # no models is "model_config_list {}", which serves nothing
    for name, base_path, policy, labels in models:
        entry = proto.model_config_list.config.add(name=name, base_path=base_path, model_platform="tensorflow")
        if policy.kind == "latest":
            entry.model_version_policy.latest.num_versions = policy.num_versions
        elif policy.kind == "all":
            entry.model_version_policy.all.SetInParent()
        else:
            entry.model_version_policy.specific.versions.extend(policy.versions)
        for label, version in sorted(labels.items()):
            entry.version_labels[label] = version
    return text_format.MessageToString(proto)


# ---------------------------------------------------------------------------------------------
# batching parameters
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BatchingConfig:
    """TF Serving's batching parameters, with the scheduler's defaults for omitted fields."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    thread_pool_name: str = "batch_threads"
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False


# More batch threads than this only exhausts the process's thread limit (a million took 50 s to fail).
MAX_BATCH_THREADS = 1024


def batching_config_from_proto(proto, *, source: str) -> BatchingConfig:
    values = {}
    for name in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"):
        if proto.HasField(name):
            values[name] = int(getattr(proto, name).value)
    if proto.HasField("thread_pool_name"):
        values["thread_pool_name"] = proto.thread_pool_name.value or "batch_threads"
    values["allowed_batch_sizes"] = tuple(int(v) for v in proto.allowed_batch_sizes)
    values["pad_variable_length_inputs"] = bool(proto.pad_variable_length_inputs)
    config = BatchingConfig(**values)
    for name in ("max_batch_size", "max_enqueued_batches", "num_batch_threads"):
        if getattr(config, name) < 1:
            raise ConfigError(f"must be >= 1, received {getattr(config, name)}", source=source, field=name)
    if config.num_batch_threads > MAX_BATCH_THREADS:
        raise ConfigError(f"must be <= {MAX_BATCH_THREADS}, received {config.num_batch_threads} (each is an OS "
                          "thread running one batch at a time; a few per core fill the machine)", source=source,
                          field="num_batch_threads")
    if config.batch_timeout_micros < 0:
        raise ConfigError(f"must be >= 0, received {config.batch_timeout_micros}", source=source,
                          field="batch_timeout_micros")
    sizes = config.allowed_batch_sizes
    if sizes:
        if any(b <= a for a, b in pairwise(sizes)) or sizes[0] < 1:
            raise ConfigError(f"must be positive and strictly increasing, received {list(sizes)}", source=source,
                              field="allowed_batch_sizes")
        if sizes[-1] != config.max_batch_size:
            raise ConfigError(f"the last entry must equal max_batch_size ({config.max_batch_size}), received "
                              f"{list(sizes)}", source=source, field="allowed_batch_sizes")
    if config.pad_variable_length_inputs:
        raise ConfigError("pad_variable_length_inputs is not supported by the embedded server; requests whose "
                          "non-batch dimensions differ are batched separately instead", source=source,
                          field="pad_variable_length_inputs")
    return config


def parse_batching_config(text: str, *, source: str = "<batching.config>") -> BatchingConfig:
    proto = protos.BatchingParameters()
    parse_text_proto(text, proto, "BatchingParameters text proto", source)
    return batching_config_from_proto(proto, source=source)


def load_batching_config(path: str | os.PathLike) -> BatchingConfig:
    return parse_batching_config(_read(path), source=str(path))


# ---------------------------------------------------------------------------------------------
# monitoring
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MonitoringConfig:
    prometheus_enabled: bool = False
    prometheus_path: str = DEFAULT_PROMETHEUS_PATH


def parse_monitoring_config(text: str, *, source: str = "<monitoring.config>") -> MonitoringConfig:
    proto = protos.MonitoringConfig()
    parse_text_proto(text, proto, "MonitoringConfig text proto", source)
    prometheus = proto.prometheus_config
    path = prometheus.path or DEFAULT_PROMETHEUS_PATH
    if not path.startswith("/") or any(c.isspace() for c in path) or path.lower().startswith("/v1/"):
        raise ConfigError(f"received {path!r}; expected an absolute URL path outside /v1/", source=source,
                          field="prometheus_config.path")
    return MonitoringConfig(prometheus_enabled=bool(prometheus.enable), prometheus_path=path)


def load_monitoring_config(path: str | os.PathLike) -> MonitoringConfig:
    return parse_monitoring_config(_read(path), source=str(path))


# ---------------------------------------------------------------------------------------------
# TLS for the gRPC port (--ssl_config_file)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SslConfig:
    """PEM texts for the gRPC port's TLS, as TF Serving's SSLConfig holds them (not file paths)."""

    server_key: bytes
    server_cert: bytes
    custom_ca: bytes | None = None
    client_verify: bool = False

    def __repr__(self) -> str:  # never print the private key
        return f"SslConfig(client_verify={self.client_verify}, custom_ca={self.custom_ca is not None})"


def parse_ssl_config(text: str, *, source: str = "<ssl.config>") -> SslConfig:
    """An SSLConfig text proto, checked as TLS would use it: the key and certificate present, PEM, and a pair;
    the custom CA readable; ``client_verify`` needs a ``custom_ca`` to verify client certificates against."""
    proto = protos.SSLConfig()
    parse_text_proto(text, proto, "SSLConfig text proto", source)
    for name in ("server_key", "server_cert"):
        value = getattr(proto, name)
        if not value.strip():
            raise ConfigError("is empty; it holds the PEM text itself (-----BEGIN ...), not a path",
                              source=source, field=name)
        if "-----BEGIN" not in value:
            shown = "" if name == "server_key" else f", received {value[:40]!r}"  # never echo key material
            raise ConfigError(f"is not PEM text (expected -----BEGIN ...{shown}); it holds the key or certificate "
                              "itself, not a path", source=source, field=name)
    if proto.client_verify and not proto.custom_ca.strip():
        raise ConfigError("client_verify: true needs custom_ca, the PEM certificates that client certificates "
                          "are verified against", source=source, field="custom_ca")
    _check_tls_material(proto.server_key, proto.server_cert, proto.custom_ca, source)
    return SslConfig(proto.server_key.encode(), proto.server_cert.encode(),
                     proto.custom_ca.encode() if proto.custom_ca.strip() else None, bool(proto.client_verify))


def _check_tls_material(key: str, cert: str, custom_ca: str, source: str) -> None:
    """Load the pair and the CA with Python's ssl, whose errors say what is wrong (gRPC's bind only fails)."""
    import ssl
    import tempfile

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory(prefix="carclf-tls-") as folder:  # mode 0700; removed at once
        key_path, cert_path = Path(folder, "key.pem"), Path(folder, "cert.pem")
        key_path.write_text(key)
        cert_path.write_text(cert)
        try:
            context.load_cert_chain(str(cert_path), str(key_path))
        except ssl.SSLError as exc:
            raise ConfigError(f"server_key and server_cert are not a usable key and certificate pair: {exc}",
                              source=source, field="server_cert") from None
    if custom_ca.strip():
        try:
            context.load_verify_locations(cadata=custom_ca)
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"holds no usable PEM certificate: {exc}", source=source, field="custom_ca") from None


def load_ssl_config(path: str | os.PathLike) -> SslConfig:
    return parse_ssl_config(_read(path), source=str(path))


def _read(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such file", source=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot be read: {exc}", source=str(path)) from None
