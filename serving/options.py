"""The embedded server's settings: tensorflow_model_server's flags plus a few documented extensions.

``add_arguments`` declares the flags (TF Serving's names and defaults; booleans accept ``--flag``,
``--flag=true`` and ``--flag=false`` as gflags does); ``ServerOptions.from_args`` turns them into a
validated dataclass, which is also the in-process API (``ModelServer(ServerOptions(...))``).

Ports: ``--port 0`` binds any free gRPC port; ``--rest_api_port 0`` disables REST, as in TF Serving,
and ``--rest_api_port -1`` binds any free REST port (extension). Bound ports are logged and exposed as
``ModelServer.grpc_port`` / ``ModelServer.rest_port``.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from carclf import contract
from carclf.errors import ConfigError

ANY_PORT = -1          # REST: bind any free port (extension); gRPC uses 0 for that
REST_DISABLED = 0
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
DEFAULT_MODEL_REPOSITORY = "model_repository"
DEFAULT_MODEL_NAME = "default"  # --model_name when only --model_base_path is given, as in TF Serving
DEFAULT_GRPC_THREADS = max(16, 4 * (os.cpu_count() or 1))  # --grpc_max_threads 0: gRPC handler threads

log = logging.getLogger("carclf.serving")


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, received {text!r}")


@dataclass
class ServerOptions:
    """Every setting of ``carclf serve``; field names are the flag names."""

    # --- TF Serving flags ---
    port: int = 8500
    rest_api_port: int = 8501
    model_name: str = ""
    model_base_path: str = ""
    model_config_file: str = ""
    model_config_file_poll_wait_seconds: int = 0
    file_system_poll_wait_seconds: int = 1
    enable_batching: bool = False
    batching_parameters_file: str = ""
    monitoring_config_file: str = ""
    enable_model_warmup: bool = True
    num_request_iterations_for_warmup: int = 1
    rest_api_timeout_in_ms: int = 30000
    rest_api_num_threads: int = 0
    grpc_max_threads: int = 0
    tensorflow_intra_op_parallelism: int = 0
    tensorflow_inter_op_parallelism: int = 0
    allow_version_labels_for_unavailable_models: bool = False
    enable_grpc_healthcheck_service: bool = False
    grpc_channel_arguments: str = ""
    ssl_config_file: str = ""
    # --- extensions ---
    host: str = "127.0.0.1"
    model_repository: str = ""
    ensemble_config_file: list[str] = field(default_factory=list)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    batching_early_dispatch: bool = False
    drain_timeout_seconds: float = 25.0
    rest_api_idle_timeout_seconds: float = 75.0
    web_ui_model: str = "car_ensemble"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerOptions:
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        values["ensemble_config_file"] = list(values.get("ensemble_config_file") or [])
        return cls(**values).validated()

    def validated(self) -> ServerOptions:
        """Check combinations and ranges; raises ConfigError naming the flag."""
        def need(ok: bool, flag: str, message: str) -> None:
            if not ok:
                raise ConfigError(message, source=f"--{flag}")

        need(0 <= self.port <= 65535, "port", f"must be 0..65535 (0: any free port), received {self.port}")
        need(-1 <= self.rest_api_port <= 65535, "rest_api_port",
             f"must be 0 (off), -1 (any free port) or a port, received {self.rest_api_port}")
        if self.model_config_file and (self.model_name or self.model_base_path):
            # As tensorflow_model_server, whose image's entrypoint always passes both: the file wins.
            log.warning("--model_name/--model_base_path are ignored: --model_config_file %s says what is served",
                        self.model_config_file)
            self.model_name, self.model_base_path = "", ""
        elif self.model_base_path and not self.model_name:
            self.model_name = DEFAULT_MODEL_NAME  # TF Serving's default name
        need(not self.model_name or bool(self.model_base_path) or bool(self.model_config_file), "model_base_path",
             f"--model_name {self.model_name!r} needs --model_base_path, the folder of its versions")
        need(bool(self.model_config_file or self.model_base_path or self.ensemble_config_file), "model_config_file",
             "nothing to serve: give --model_config_file, or --model_name and --model_base_path")
        need(not self.batching_parameters_file or self.enable_batching, "batching_parameters_file",
             "a batching parameters file needs --enable_batching")
        need(not self.batching_early_dispatch or self.enable_batching, "batching_early_dispatch",
             "early dispatch changes how batches form, so it needs --enable_batching")
        need(self.num_request_iterations_for_warmup >= 1, "num_request_iterations_for_warmup",
             f"must be >= 1, received {self.num_request_iterations_for_warmup}")
        need(self.rest_api_timeout_in_ms > 0, "rest_api_timeout_in_ms",
             f"must be > 0, received {self.rest_api_timeout_in_ms}")
        need(self.max_request_bytes >= 1024, "max_request_bytes",
             f"must be >= 1024, received {self.max_request_bytes}")
        need(self.drain_timeout_seconds >= 0, "drain_timeout_seconds",
             f"must be >= 0, received {self.drain_timeout_seconds}")
        need(0 < self.rest_api_idle_timeout_seconds <= 86400, "rest_api_idle_timeout_seconds",
             f"must be > 0 and at most 86400 (a day), received {self.rest_api_idle_timeout_seconds}")
        self.channel_arguments()  # refuses a malformed item
        for flag in ("tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism", "grpc_max_threads",
                     "rest_api_num_threads"):
            need(getattr(self, flag) >= 0, flag, f"must be >= 0, received {getattr(self, flag)}")
        for path_flag in ("model_config_file", "batching_parameters_file", "monitoring_config_file", "ssl_config_file"):
            path = getattr(self, path_flag)
            need(not path or Path(path).is_file(), path_flag, _not_a_file(path))
        for path in self.ensemble_config_file:
            need(Path(path).is_file(), "ensemble_config_file", _not_a_file(path))
        resolved = [Path(p).resolve() for p in self.ensemble_config_file]
        need(len(set(resolved)) == len(resolved), "ensemble_config_file",
             f"the same file is given twice: {sorted({str(p) for p in resolved if resolved.count(p) > 1})}")
        return self

    def repository_root(self) -> Path:
        """The folder every model base path must lie in (``--model_repository``; by default the parent of
        ``--model_base_path``, else ./model_repository)."""
        if self.model_repository:
            return Path(self.model_repository)
        if self.model_base_path:
            return Path(self.model_base_path).expanduser().absolute().parent
        return Path(DEFAULT_MODEL_REPOSITORY)

    def worker_threads(self) -> int:
        """Threads that run unbatched REST predictions (and other blocking work off the REST loop)."""
        return self.rest_api_num_threads or max(8, 2 * (os.cpu_count() or 1))

    def channel_arguments(self) -> list[tuple[str, int | str]]:
        """``--grpc_channel_arguments`` as gRPC server options, read as TF Serving reads them: ``NAME=VALUE``
        items separated by commas, a value that is a 32-bit integer passed as one and any other as a string
        (gRPC ignores names it does not know). They are applied after the server's own settings."""
        arguments = []
        for item in filter(None, (part.strip() for part in self.grpc_channel_arguments.split(","))):
            name, equals, value = item.partition("=")
            if not equals or not name.strip():
                raise ConfigError(f"expected NAME=VALUE items separated by commas, such as "
                                  f"grpc.max_connection_age_ms=300000; received {item!r}",
                                  source="--grpc_channel_arguments")
            value = value.strip()
            number = _int32(value)
            arguments.append((name.strip(), value if number is None else number))
        return arguments

    def grpc_threads(self) -> int:
        """gRPC handler threads: requests in flight over gRPC beyond this wait in grpc's queue."""
        return self.grpc_max_threads or DEFAULT_GRPC_THREADS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """tensorflow_model_server's flags (same names and defaults) plus the extensions."""
    d = ServerOptions()
    tf = parser.add_argument_group("TensorFlow Serving flags")
    flag = tf.add_argument

    def boolean(name: str, default: bool, help_text: str) -> None:
        flag(f"--{name}", type=parse_bool, nargs="?", const=True, default=default, metavar="BOOL", help=help_text)

    flag("--port", type=int, default=d.port, help="gRPC port (0: any free port)")
    flag("--rest_api_port", type=int, default=d.rest_api_port,
         help="REST port (0: REST off, as in TF Serving; -1: any free port)")
    flag("--model_name", default=d.model_name, help="name of the single model to serve")
    flag("--model_base_path", default=d.model_base_path, help="folder of the single model's versions")
    flag("--model_config_file", default=d.model_config_file, help="ModelServerConfig text proto (models.config)")
    flag("--model_config_file_poll_wait_seconds", type=int, default=d.model_config_file_poll_wait_seconds,
         help="re-read --model_config_file every N seconds (0: read once)")
    flag("--file_system_poll_wait_seconds", type=int, default=d.file_system_poll_wait_seconds,
         help="look for new or removed versions every N seconds (0: only at startup)")
    boolean("enable_batching", d.enable_batching, "batch concurrent requests (one shared scheduler)")
    flag("--batching_parameters_file", default=d.batching_parameters_file, help="BatchingParameters text proto")
    flag("--monitoring_config_file", default=d.monitoring_config_file,
         help="MonitoringConfig text proto (Prometheus on the REST port)")
    boolean("enable_model_warmup", d.enable_model_warmup,
            "replay assets.extra/tf_serving_warmup_requests before a version is AVAILABLE")
    flag("--num_request_iterations_for_warmup", type=int, default=d.num_request_iterations_for_warmup,
         help="how many times each warmup record is replayed")
    flag("--rest_api_timeout_in_ms", type=int, default=d.rest_api_timeout_in_ms, help="REST request deadline")
    flag("--rest_api_num_threads", type=int, default=d.rest_api_num_threads,
         help="worker threads for unbatched REST requests (0: max(8, 2 x cores))")
    flag("--grpc_max_threads", type=int, default=d.grpc_max_threads,
         help="gRPC handler threads, the gRPC requests served at once (0: max(16, 4 x cores))")
    flag("--tensorflow_intra_op_parallelism", type=int, default=d.tensorflow_intra_op_parallelism,
         help="TF intra-op threads (0: TF's default)")
    flag("--tensorflow_inter_op_parallelism", type=int, default=d.tensorflow_inter_op_parallelism,
         help="TF inter-op threads (0: TF's default)")
    boolean("allow_version_labels_for_unavailable_models", d.allow_version_labels_for_unavailable_models,
            "let a label point at a version that is not loaded yet")
    boolean("enable_grpc_healthcheck_service", d.enable_grpc_healthcheck_service,
            "serve grpc.health.v1.Health")
    flag("--ssl_config_file", default=d.ssl_config_file,
         help="SSLConfig text proto (server_key, server_cert, custom_ca, client_verify): TLS on the gRPC port "
              "(REST stays plain HTTP, as in TF Serving)")
    flag("--grpc_channel_arguments", default=d.grpc_channel_arguments,
         help="gRPC server arguments, NAME=VALUE separated by commas (e.g. grpc.max_connection_age_ms=300000, "
              "which makes clients reconnect, and so spread over new replicas, every 5 minutes)")

    ext = parser.add_argument_group("extensions of the embedded server")
    flag = ext.add_argument
    flag("--host", default=d.host, help="bind address of both ports (default 127.0.0.1; 0.0.0.0 for all)")
    flag("--model_repository", default=d.model_repository,
         help="folder every base path must lie in; base paths under /models/ (the container mount) are read "
              "from it when /models does not exist here (default: ./model_repository, or the parent of "
              "--model_base_path)")
    flag("--ensemble_config_file", action="append", default=[], metavar="PATH",
         help="serve an ensemble declared in a Triton config.pbtxt (repeatable)")
    flag("--max_request_bytes", type=int, default=d.max_request_bytes,
         help="largest request body accepted on either transport")
    flag("--batching_early_dispatch", type=parse_bool, nargs="?", const=True, default=d.batching_early_dispatch,
         metavar="BOOL", help="let a batch go before batch_timeout_micros when no batch is running or when it is "
                              "as large as the smallest running batch (default false: TF Serving's rule)")
    flag("--web_ui_model", default=d.web_ui_model,
         help="model that the upload page at GET /ui asks (empty: no page)")
    flag("--drain_timeout_seconds", type=float, default=d.drain_timeout_seconds,
         help="on SIGTERM, how long in-flight requests may take to finish")
    flag("--rest_api_idle_timeout_seconds", type=float, default=d.rest_api_idle_timeout_seconds,
         help="close a REST connection with no request running for this long: idle keep-alive connections and "
              "ones whose request line and headers have not all arrived (aiohttp's default is an hour)")


def _int32(text: str) -> int | None:
    """``text`` as a signed 32-bit integer, or None when it is not one (as TF Serving's safe_strto32)."""
    if not contract.ascii_digits(text[1:] if text[:1] in "+-" else text):
        return None
    value = int(text)
    return value if -2**31 <= value < 2**31 else None


def _not_a_file(path: str) -> str:
    return f"{path} is a folder, not a file" if Path(path).is_dir() else f"no such file: {path}"

