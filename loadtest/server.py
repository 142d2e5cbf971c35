"""Start, probe and stop a TF-Serving-compatible server for load tests and benchmarks.

The embedded server is started as a subprocess with ``tensorflow_model_server``'s own flags
(``carclf serve --port --rest_api_port --model_config_file ...``) and probed through the public REST
status URL, so this module treats it exactly as it would treat a real TF Serving.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from carclf import exits
from carclf.errors import ConfigError, DeadlineExceeded, Unavailable
from carclf.serving.repository import list_versions

LOOPBACK = "127.0.0.1"
PROBE_TIMEOUT_S = 2.0  # a status GET; a server too busy to answer in this time is reported, not taken as absent


TETHER = Path(__file__).with_name("tether.py")


def tethered(command: Sequence[str]) -> list[str]:
    """``command`` started through ``tether.py`` so that the kernel sends it SIGTERM when the thread that
    starts it dies, even by SIGKILL or the OOM killer (Linux's ``PR_SET_PDEATHSIG``): a killed load test or
    benchmark leaves no server holding its ports and no locust running. Unchanged on other systems. Never a
    ``preexec_fn`` instead: that makes subprocess fork() rather than vfork(), and gRPC's fork handlers then
    abort or hang the child (docs/RELIABILITY.md).

    Start children from the main thread: the kernel ties them to the starting thread, not the process.
    """
    if not sys.platform.startswith("linux"):
        return list(command)
    return [sys.executable, "-S", str(TETHER), str(os.getpid()), *command]


def call_child(command: Sequence[str], stop_timeout_s: float = 30.0) -> int:
    """Run a child that must not outlive this process (locust under run and soak); its exit status.

    The child runs in its own process group with no terminal input, so that a terminal's Ctrl-C reaches this
    process only (a SIGINT landing in locust mid-call prints greenlet tracebacks); this process then stops it
    with SIGTERM, locust's clean stop that still writes the reports, and gives it ``stop_timeout_s`` before
    SIGKILL. The interrupt (or SystemExit, from SIGTERM) is raised again once the child has gone."""
    child = subprocess.Popen(tethered(command), stdin=subprocess.DEVNULL, process_group=0)
    try:
        return child.wait()
    except BaseException:
        exits.terminate(child, stop_timeout_s)
        raise


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free right now on ``host`` (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class ServerAddress:
    """Where a TF-Serving-compatible server listens."""

    host: str = LOOPBACK
    grpc_port: int = 8500
    rest_port: int = 8501

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def rest_url(self) -> str:
        return f"http://{self.host}:{self.rest_port}"


def _get_json(url: str, timeout: float) -> tuple[int | None, object]:
    """(HTTP status, JSON body) of a GET; an error status keeps its body; (None, None) when nothing answers
    (the connection is refused or never made), and the body is None when it is not JSON.

    Raises DeadlineExceeded when the server takes the connection but no answer comes within ``timeout``: a
    server that is there but busy must not be taken for no server (and another started on its ports)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            code, raw = reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        code, raw = exc.code, exc.read()
    except OSError as exc:  # urllib wraps what happens while connecting in URLError; a bare timeout came later
        if isinstance(exc, TimeoutError):
            base, _, path = url.partition("/v1/")
            raise DeadlineExceeded(f"{base} took the connection but did not answer GET /v1/{path} within "
                                   f"{timeout:g} s (a server too busy to answer, or not an HTTP server)") from None
        return None, None
    except http.client.HTTPException as exc:  # something answers, but not HTTP/1.x: a gRPC port's HTTP/2 frames
        raise Unavailable(f"{url.split('/v1/', 1)[0]} does not answer HTTP/1.x ({type(exc).__name__}), as a gRPC "
                          f"port does: give the REST port (http://host:port) there") from None
    try:
        return code, json.loads(raw or b"{}")
    except ValueError:
        return code, None


def model_status(rest_url: str, model: str, timeout: float = PROBE_TIMEOUT_S) -> tuple[str | None, str]:
    """(best version state, its error message) of ``model`` from ``GET /v1/models/<model>``, e.g.
    ("AVAILABLE", "") or ("END", "model car_ensemble needs 2 of its 3 members ...").

    State None when nothing answers on ``rest_url``; "NOT_FOUND" when the server does not know the model;
    DeadlineExceeded when the server takes the connection but does not answer within ``timeout``.
    """
    code, body = _get_json(f"{rest_url}/v1/models/{model}", timeout)
    if code is None or (code == 200 and body is None):  # nothing, or not a model server, answers
        return None, ""
    if code != 200:
        message = body.get("error", "") if isinstance(body, dict) else ""
        return ("NOT_FOUND" if code == 404 else f"HTTP_{code}"), message
    versions = body.get("model_version_status", []) if isinstance(body, dict) else []
    return best_state([(v.get("state", "UNKNOWN"), v.get("status", {}).get("error_message", "")) for v in versions])


def best_state(versions: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """(state, error message) of a model from its versions' (newest first): AVAILABLE when any version is,
    else the newest one's; UNKNOWN when it lists none."""
    if any(state == "AVAILABLE" for state, _ in versions):
        return "AVAILABLE", ""
    return versions[0] if versions else ("UNKNOWN", "")


def model_state(rest_url: str, model: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """The best version state of ``model`` (``model_status`` without the message)."""
    return model_status(rest_url, model, timeout)[0]


def served_models(rest_url: str, timeout: float = PROBE_TIMEOUT_S) -> list[str]:
    """The models with an AVAILABLE version that a server lists in the embedded server's ``/v1/ready`` (an
    extension; [] when the server has no such path, as real TF Serving)."""
    _, body = _get_json(f"{rest_url}/v1/ready", timeout)  # 503 (not ready) lists the models too
    models = body.get("models") if isinstance(body, dict) else None
    return sorted(name for name, available in models.items() if available) if isinstance(models, dict) else []


def grpc_model_status(target: str, model: str, timeout: float = 5.0) -> tuple[str, str]:
    """(best version state, its error message) of ``model`` from ModelService.GetModelStatus at ``target``
    (host:port), as ``model_status`` reads it over REST; raises the product's error when the call fails
    (Unavailable when nothing answers gRPC there, NotFound for an unknown model)."""
    from carclf.clients.grpc_client import GrpcClient

    with GrpcClient(target, timeout=timeout) as client:
        versions = client.status(model)
    return best_state([(v.state, v.error_message) for v in versions])


def is_serving(address: ServerAddress, models: Sequence[str], timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when the server at ``address`` answers and every one of ``models`` is AVAILABLE."""
    return all(model_state(address.rest_url, m, timeout) == "AVAILABLE" for m in models)


def models_config(models: dict[str, str | os.PathLike]):
    """A TF Serving ``ModelServerConfig`` serving the latest version of each ``name -> base_path``."""
    from carclf.tfprotos import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    for name, base_path in models.items():
        if not Path(base_path).is_dir():
            raise ConfigError(f"model {name!r}: base path {str(base_path)!r} is not a folder", field="base_path")
        entry = config.model_config_list.config.add()
        entry.name, entry.base_path, entry.model_platform = name, str(Path(base_path).resolve()), "tensorflow"
    return config


def write_models_config(path: str | os.PathLike, repository: str | os.PathLike, models: Sequence[str]) -> Path:
    """Write a TF Serving models.config serving the latest version of each of ``models`` in ``repository``."""
    from google.protobuf import text_format

    config = models_config({name: Path(repository) / name for name in models})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text_format.MessageToString(config), encoding="utf-8")
    return path


def config_model_names(path: str | os.PathLike) -> list[str]:
    """Names of the models a TF Serving models.config file lists."""
    from google.protobuf import text_format

    from carclf.tfprotos import model_server_config_pb2

    path = Path(path)
    try:
        config = text_format.Parse(path.read_text(encoding="utf-8"), model_server_config_pb2.ModelServerConfig())
    except text_format.ParseError as exc:
        raise ConfigError(f"not a ModelServerConfig text proto: {exc}", source=str(path)) from None
    return [entry.name for entry in config.model_config_list.config]


def reload_config(address: ServerAddress, config, timeout: float = 300.0) -> None:
    """Replace the server's whole model config (ModelService.HandleReloadConfigRequest)."""
    import grpc

    from carclf.tfprotos import model_management_pb2, model_service_pb2_grpc

    with grpc.insecure_channel(address.grpc_target) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        reply = stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=config),
                                               timeout=timeout)
    if reply.status.error_code != 0:
        raise Unavailable(f"config reload failed: {reply.status.error_message}")


def repository_models(repository: str | os.PathLike) -> list[str]:
    """Names of the models in a repository: folders holding at least one integer version."""
    repo = Path(repository)
    if not repo.is_dir():
        return []
    return sorted(p.name for p in repo.iterdir()
                  if p.is_dir() and list_versions(p))


def batching_flags(batching_config: str | os.PathLike, *, early_dispatch: bool = True) -> list[str]:
    """The embedded server's batching flags as ``make serve`` gives them: the parameters file and, unless
    ``early_dispatch`` is False, the early-dispatch extension (serving/README.md)."""
    flags = ["--enable_batching", "--batching_parameters_file", str(batching_config)]
    return flags + ["--batching_early_dispatch"] if early_dispatch else flags


class EmbeddedServer:
    """``carclf serve`` in a subprocess, started with TF Serving's flags; a context manager.

    ``flags`` are extra ``--flag value`` pairs (``--enable_batching`` etc.); ``model_repository`` is the
    embedded server's ``--model_repository`` (the folder every base path must lie in); the log goes to
    ``log_path``.
    """

    def __init__(self, address: ServerAddress, *, model_config_file: str | os.PathLike,
                 model_repository: str | os.PathLike | None = None, flags: Sequence[str] = (),
                 log_path: str | os.PathLike | None = None, command: Sequence[str] | None = None):
        self.address = address
        repository = ["--model_repository", str(Path(model_repository).resolve())] if model_repository else []
        self.args = [*(command or (sys.executable, "-m", "carclf", "serve")),
                     "--host", address.host, "--port", str(address.grpc_port),
                     "--rest_api_port", str(address.rest_port),
                     "--model_config_file", str(model_config_file), *repository, *flags]
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen | None = None
        self._log = None

    def start(self) -> EmbeddedServer:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        # Same session as the caller on purpose: with the kernel's autogroup scheduling, a server in a
        # session of its own would get a CPU share of its own on a busy machine, and served figures would
        # be compared with in-process ones measured on half the share.
        self.process = subprocess.Popen(tethered(self.args), stdout=self._log or subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT, env=env)
        return self

    def wait_ready(self, models: Sequence[str], timeout: float = 120.0) -> None:
        """Block until every one of ``models`` is AVAILABLE (with none: until the server answers); raise
        Unavailable if the process dies or the time runs out. A status probe that times out (the server busy
        loading) is waited through."""
        deadline = time.monotonic() + timeout
        late = ""
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise Unavailable(f"server ended ({exits.describe(self.process.returncode)}) before its models were "
                                  f"AVAILABLE; {self.log_tail()}")
            try:
                if self._ready(models):
                    return
            except DeadlineExceeded as exc:
                late = f" (the last status probe: {exc.message})"
            time.sleep(0.25)
        raise Unavailable(f"models {list(models)} not AVAILABLE after {timeout:.0f} s{late}; {self.log_tail()}")

    def _ready(self, models: Sequence[str]) -> bool:
        """One probe of ``wait_ready``: True when it may return; Unavailable for a model that ended in error."""
        if not models:
            return model_state(self.address.rest_url, "_") is not None  # nothing to wait for but an answer
        statuses = {model: model_status(self.address.rest_url, model) for model in models}
        for model, (state, message) in statuses.items():  # an error ended that version: waiting will not help
            if state == "END" and message:
                raise Unavailable(f"model {model} is not served: {message}")
        return all(state == "AVAILABLE" for state, _ in statuses.values())

    def log_tail(self, lines: int = 15) -> str:
        if not self.log_path or not self.log_path.exists():
            return "no server log"
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"last lines of {self.log_path}:\n" + "\n".join(tail)

    @property
    def pid(self) -> int:
        if self.process is None:
            raise Unavailable("server not started")
        return self.process.pid

    def rss_bytes(self) -> int:
        """Resident memory of the server process now."""
        import psutil

        return psutil.Process(self.pid).memory_info().rss

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (the server drains), then SIGKILL after ``timeout``; returns the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self._log:
            self._log.close()
            self._log = None
        return self.process.returncode

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
