"""One client interface for the TF Serving API, whatever the transport.

``GrpcClient`` and ``RestClient`` implement ``ModelClient``: the same methods, the same result types and
the same errors (the ``carclf.errors`` hierarchy, built from the server's status code name and message with
``error_for_code``), so code written against one runs unchanged against the other.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from carclf import contract
from carclf.errors import FailedPrecondition, InvalidInput, NotFound

DEFAULT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a signature as the server describes it (dtype: TF name such as DT_FLOAT)."""

    name: str
    dtype: str
    shape: tuple[int, ...] | None  # None: unknown rank; -1: unknown dimension


@dataclass(frozen=True)
class SignatureSpec:
    name: str
    method_name: str
    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]


@dataclass(frozen=True)
class ModelMetadata:
    model_name: str
    version: int | None
    signatures: Mapping[str, SignatureSpec]


@dataclass(frozen=True)
class VersionStatus:
    version: int
    state: str  # UNKNOWN, START, LOADING, AVAILABLE, UNLOADING, END
    error_code: str = "OK"
    error_message: str = ""


@dataclass(frozen=True)
class PredictResult:
    """A Predict answer: the outputs as numpy arrays (strings as ``str``) and the model spec that answered.

    ``version`` is the version the server reports having used; TF Serving's REST API does not report it,
    so over REST it is the requested version, or None when the request named none.
    """

    model_name: str
    version: int | None
    signature_name: str
    outputs: Mapping[str, np.ndarray]
    latency_ms: float = 0.0
    transport: str = field(default="", compare=False)

    @property
    def probabilities(self) -> np.ndarray:
        return np.asarray(self.outputs[contract.OUTPUT_PROBABILITIES], dtype=np.float32)

    @property
    def labels(self) -> list[str]:
        """The top-1 label of every row."""
        return [str(x) for x in np.asarray(self.outputs[contract.OUTPUT_LABEL]).reshape(-1)]

    @property
    def named_ranks(self) -> int:
        """How many ranks of every row the server names: the ensemble's ``top_k_labels`` width, 1 for a
        backbone's top-1 ``label``, 0 for probabilities alone."""
        if "top_k_labels" in self.outputs:
            return int(np.asarray(self.outputs["top_k_labels"]).shape[-1])
        return int(contract.OUTPUT_LABEL in self.outputs)

    def top_k(self, k: int, class_names: Sequence[str] | None = None) -> list[list[tuple[str, float]]]:
        """The k most likely (name, probability) of every row, best first (k is capped at the class count).

        The server's names always win: its ``top_k_labels`` (the ensemble), else its top-1 ``label``.
        ``class_names`` (in class index order) name only the ranks the server did not; the others read
        ``class <id>``.
        """
        probs = self.probabilities
        k = max(1, min(int(k), probs.shape[-1]))
        if class_names is not None and k > self.named_ranks and len(class_names) < probs.shape[-1]:
            raise InvalidInput(f"{len(class_names)} class names given, the model answers "
                               f"{probs.shape[-1]} classes")
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        server_top = self.outputs.get("top_k_labels")
        rows = []
        for i, ids in enumerate(order):
            row = []
            for rank, cid in enumerate(ids):
                if server_top is not None and rank < server_top.shape[-1]:
                    name = str(server_top[i][rank])
                elif server_top is None and rank == 0 and contract.OUTPUT_LABEL in self.outputs:
                    name = self.labels[i]
                elif class_names is not None:
                    name = class_names[cid]
                else:
                    name = f"class {int(cid)}"
                row.append((name, float(probs[i, cid])))
            rows.append(row)
        return rows


class ModelClient(abc.ABC):
    """The TF Serving API as a Python object: Predict, model metadata and model status."""

    transport = ""

    def __init__(self, target: str, *, timeout: float = DEFAULT_TIMEOUT_S):
        self.target = target
        self.timeout = checked_timeout(timeout)
        self._closed = False

    @abc.abstractmethod
    def predict(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray] | None = None,
        *,
        images: Sequence[bytes] | None = None,
        signature_name: str = contract.SIGNATURE_BYTES,
        version: int | None = None,
        version_label: str | None = None,
        output_filter: Sequence[str] = (),
        timeout: float | None = None,
    ) -> PredictResult:
        """Run Predict. Give either named ``inputs`` or ``images`` (encoded photos for ``image_bytes``)."""

    @abc.abstractmethod
    def metadata(self, model: str, *, version: int | None = None, version_label: str | None = None,
                 timeout: float | None = None) -> ModelMetadata:
        """The model's signatures (GetModelMetadata / GET .../metadata)."""

    @abc.abstractmethod
    def status(self, model: str, *, version: int | None = None, version_label: str | None = None,
               timeout: float | None = None) -> list[VersionStatus]:
        """The state of the model's versions (GetModelStatus / GET /v1/models/{name})."""

    def close(self) -> None:
        """Release the channel or HTTP session; any call afterwards raises FailedPrecondition."""
        if not self._closed:
            self._closed = True
            self._release()

    @abc.abstractmethod
    def _release(self) -> None:
        """Close the transport's channel or session."""

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"this {self.transport} client of {self.target} is closed")

    def __enter__(self) -> ModelClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"

    # Shared request checks -------------------------------------------------------------------

    def _timeout(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else checked_timeout(timeout)

    @staticmethod
    def _inputs(inputs, images) -> dict[str, np.ndarray]:
        if (inputs is None) == (images is None):
            raise InvalidInput("give either inputs or images, not both and not neither")
        if images is not None:
            images = list(images)
            if not images:
                raise InvalidInput("images is empty: send at least one photo")
            if not all(isinstance(x, bytes | bytearray) for x in images):
                raise InvalidInput("images must be encoded photos (bytes)")
            return {contract.INPUT_IMAGE_BYTES: np.array([bytes(x) for x in images], dtype=object)}
        if not isinstance(inputs, Mapping) or not inputs:
            raise InvalidInput("inputs must be a non-empty mapping of input name to array")
        return {str(k): as_input_array(v) for k, v in inputs.items()}

    @staticmethod
    def _check_spec(version: int | None, version_label: str | None) -> None:
        if version is not None and version_label is not None:
            raise InvalidInput(f"give a version or a version label, not both (received {version} and "
                               f"{version_label!r})")


def as_input_array(values) -> np.ndarray:
    """``values`` as a numpy array; bytes stay exact (numpy's fixed-width bytes dtype drops trailing NULs)."""
    array = np.asarray(values)
    if array.dtype.kind == "S" and not isinstance(values, np.ndarray):
        array = np.array(values, dtype=object)  # an object array keeps the given bytes objects themselves
    return array


PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"


def read_root_cert(path: Path | None, flag: str) -> bytes | None:
    """The PEM root certificates in ``path`` (given as ``flag``), refused up front when the file holds none
    (gRPC would only say "Failed to create security handshaker" at the first call)."""
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{flag} {str(path)!r} does not exist") from None
    except OSError as exc:
        raise InvalidInput(f"{flag} {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    if PEM_BEGIN not in data:
        raise InvalidInput(f"{flag} {str(path)!r} holds no PEM certificate (no {PEM_BEGIN.decode()!r} line)")
    return data


MAX_TIMEOUT_S = 86_400.0  # a day: beyond it a deadline overflows some clocks (REST's socket timeout did)


def checked_timeout(timeout: float, source: str = "timeout") -> float:
    """``timeout`` as seconds, refused unless finite, > 0 and at most a day."""
    seconds = float(timeout)
    if not 0 < seconds <= MAX_TIMEOUT_S:  # also refuses NaN and inf
        raise InvalidInput(f"{source} must be > 0 seconds and at most {MAX_TIMEOUT_S:g}, received {timeout}")
    return seconds


def parse_server_url(url: str) -> tuple[str, str, bool]:
    """``grpc://host:8500`` / ``grpcs://`` / ``http(s)://host:8501`` -> (transport, target, tls)."""
    parts = urlsplit(url if "://" in url else f"//{url}")
    scheme = parts.scheme.lower()
    if scheme not in ("grpc", "grpcs", "http", "https"):
        raise InvalidInput(f"server address must start with grpc://, grpcs://, http:// or https://, received {url!r}")
    if not parts.hostname:
        raise InvalidInput(f"server address has no host: {url!r}")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:  # no server listens on port 0; never read it as "no port" (the default)
        raise InvalidInput(f"server address has an invalid port: {url!r}")
    tls = scheme in ("grpcs", "https")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if scheme.startswith("grpc"):
        if parts.path.strip("/") or parts.query:  # gRPC has no URL path: the model is named by --model
            raise InvalidInput(f"a gRPC address is host:port only, received {url!r}")
        return "grpc", f"{host}:{port if port is not None else 8500}", tls
    default = 443 if tls else 8501
    return "rest", f"{scheme}://{host}:{port if port is not None else default}{parts.path.rstrip('/')}", tls


def connect(url: str, *, timeout: float = DEFAULT_TIMEOUT_S, root_certificates: bytes | None = None,
            **options) -> ModelClient:
    """A client for ``grpc://host:8500`` (``grpcs://`` for TLS) or ``http(s)://host:8501``."""
    transport, target, tls = parse_server_url(url)
    if transport == "grpc":
        from carclf.clients.grpc_client import GrpcClient

        return GrpcClient(target, tls=tls, root_certificates=root_certificates, timeout=timeout, **options)
    from carclf.clients.rest_client import RestClient

    return RestClient(target, timeout=timeout, root_certificates=root_certificates, **options)
