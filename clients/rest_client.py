"""TF Serving REST client: ``:predict`` (columnar ``inputs``, b64 photos), ``/metadata`` and model status.

One keep-alive HTTP session per client, a timeout on every call. Errors are TF Serving's
``{"error": message}`` bodies; the HTTP status maps back to the status code name (the inverse of TF
Serving's table), so the same bad request raises the same ``carclf.errors`` type as over gRPC.
"""

from __future__ import annotations

import base64
import tempfile
import time
from collections.abc import Mapping
from urllib.parse import quote

import numpy as np

from carclf import contract
from carclf.clients.base import (
    DEFAULT_TIMEOUT_S,
    ModelClient,
    ModelMetadata,
    PredictResult,
    SignatureSpec,
    TensorSpec,
    VersionStatus,
)
from carclf.errors import (
    CarClfError,
    DeadlineExceeded,
    Internal,
    InvalidInput,
    RequestTooLarge,
    Unavailable,
    error_for_code,
)

# The inverse of TF Serving's status -> HTTP table (several codes share 400; INVALID_ARGUMENT is the one
# a bad request gets).
CODE_FOR_HTTP = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED",
    503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
    # Not in TF Serving's table: the embedded server's body limit and body timeout, and a proxy's bad gateway
    # (gRPC's own HTTP mapping reads 502 as UNAVAILABLE).
    413: "RESOURCE_EXHAUSTED", 408: "DEADLINE_EXCEEDED", 502: "UNAVAILABLE",
}
MESSAGE_CHARS = 200  # of a body that is not TF Serving's JSON, quoted in an error
CHUNK_BYTES = 1 << 16


def error_from_response(status: int, body: bytes) -> CarClfError:
    """The product's error for a non-2xx answer: ``{"error": msg}`` and the code its HTTP status stands for."""
    import json

    message = body.decode("utf-8", "replace").strip()
    code = CODE_FOR_HTTP.get(status, "INTERNAL")
    try:
        data = json.loads(message)
        if isinstance(data, dict) and "error" in data:
            message = str(data["error"])
            code = str(data.get("code") or code)  # a server may add the exact code name
    except ValueError:  # a proxy's HTML page, or anything: one line, bounded
        flat = " ".join(message.split())
        message = flat if len(flat) <= MESSAGE_CHARS else flat[:MESSAGE_CHARS] + "..."
    if status == 413:
        return RequestTooLarge(message or "HTTP 413")
    return error_for_code(code, message or f"HTTP {status}")


def encode_value(array: np.ndarray, name: str):
    """A numpy input as TF Serving REST JSON: bytes as {"b64": ...}, numbers as nested lists."""
    array = np.asarray(array)
    if array.dtype.kind in ("O", "S", "U"):
        def one(x):
            if isinstance(x, bytes | bytearray | np.bytes_):
                return {"b64": base64.b64encode(bytes(x)).decode("ascii")}
            return str(x)
        return np.vectorize(one, otypes=[object])(array).tolist() if array.ndim else one(array.item())
    return array.tolist()


def decode_value(value, name: str) -> np.ndarray:
    """REST JSON output -> numpy (float32 / int64 / bool / str; b64 objects -> bytes)."""
    def walk(x):
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, dict) and "b64" in x:
            raw = base64.b64decode(x["b64"])
            return raw if name.endswith("_bytes") else raw.decode("utf-8", "replace")
        return x

    data = walk(value)
    flat = np.asarray(data, dtype=object).reshape(-1)
    if flat.size and all(isinstance(v, bool) for v in flat):
        return np.asarray(data, dtype=bool)
    if flat.size and all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        return np.asarray(data, dtype=np.int64)
    if flat.size and all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat):
        return np.asarray(data, dtype=np.float32)
    return np.asarray(data, dtype=object)


class RestClient(ModelClient):
    transport = "rest"

    def __init__(self, base_url: str, *, timeout: float = DEFAULT_TIMEOUT_S,
                 root_certificates: bytes | None = None, pool_size: int = 16):
        import requests
        from requests.adapters import HTTPAdapter

        super().__init__(base_url.rstrip("/"), timeout=timeout)
        if root_certificates is not None and not self.target.startswith("https://"):
            raise InvalidInput(f"root certificates were given for {self.target}, which is plain HTTP: give an "
                               "https:// address to use them (with grpc:// they turn TLS on)")
        self._session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._ca_file = None
        self._verify: bool | str = True
        if root_certificates is not None:
            self._ca_file = tempfile.NamedTemporaryFile(suffix=".pem")  # requests wants a path
            self._ca_file.write(root_certificates)
            self._ca_file.flush()
            # Passed on every request: requests lets REQUESTS_CA_BUNDLE override a session's own setting.
            self._verify = self._ca_file.name

    def _model_path(self, model: str, version, version_label) -> str:
        self._check_spec(version, version_label)
        path = f"{self.target}/v1/models/{quote(model, safe='')}"
        if version is not None:
            path += f"/versions/{int(version)}"
        elif version_label is not None:
            path += f"/labels/{quote(version_label, safe='')}"
        return path

    def _request(self, method: str, url: str, timeout: float | None, json_body=None) -> dict:
        """One call, answered within ``timeout`` as a whole (requests' own timeout bounds each socket read
        only, so a peer dribbling its answer could hold a call for ever): the answer's JSON object."""
        import json

        import requests

        self._check_open()
        seconds = self._timeout(timeout)
        late = DeadlineExceeded(f"no answer from {self.target} within {seconds:.3g} s")
        deadline = time.monotonic() + seconds
        try:
            with self._session.request(method, url, json=json_body, timeout=seconds, verify=self._verify,
                                       stream=True) as response:
                content = self._read_within(response, deadline, late)
        except requests.Timeout:
            raise late from None
        except requests.ConnectionError as exc:
            raise Unavailable(f"cannot reach {self.target}: {_reason(exc)}") from None
        except requests.RequestException as exc:
            raise Internal(f"HTTP request to {url} failed: {exc}") from None
        if response.status_code // 100 != 2:
            raise error_from_response(response.status_code, content)
        try:
            data = json.loads(content)
        except ValueError:
            raise Internal(f"server answered {response.status_code} with a body that is not JSON: "
                           f"{content[:MESSAGE_CHARS].decode('utf-8', 'replace')!r}") from None
        if not isinstance(data, dict):
            raise Internal(f"answer of {url} is not a TF Serving answer: a JSON {type(data).__name__}, not an object")
        return data

    def _read_within(self, response, deadline: float, late: DeadlineExceeded) -> bytes:
        """The answer's body as it arrives (each read returns what is there), until ``deadline``."""
        from urllib3.exceptions import HTTPError, ReadTimeoutError

        chunks = []
        while True:
            try:
                chunk = response.raw.read1(CHUNK_BYTES, decode_content=True)
            except ReadTimeoutError:  # the server answered, then stalled: as gRPC reports it
                raise late from None
            except HTTPError as exc:  # cut short: the connection closed mid-answer
                raise Unavailable(f"the answer of {self.target} broke off: {_reason(exc)}") from None
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise late

    def predict(self, model, inputs=None, *, images=None, signature_name=contract.SIGNATURE_BYTES,
                version=None, version_label=None, output_filter=(), timeout=None) -> PredictResult:
        arrays = self._inputs(inputs, images)
        body = {"signature_name": signature_name,
                "inputs": {name: encode_value(a, name) for name, a in arrays.items()}}
        url = self._model_path(model, version, version_label) + ":predict"
        start = time.perf_counter()
        data = self._request("POST", url, timeout, body)
        latency = (time.perf_counter() - start) * 1000.0
        if "outputs" not in data:
            raise Internal(f"answer of {url} has no 'outputs': keys {sorted(data)}")
        outputs = data["outputs"]
        if not isinstance(outputs, dict):  # a single output is returned bare; find its name
            outputs = {self._single_output_name(model, signature_name, version, version_label, timeout): outputs}
        try:
            decoded = {name: decode_value(value, name) for name, value in outputs.items()}
        except (TypeError, ValueError) as exc:  # b64 that is not base64, ragged lists
            raise _wrong_shape(url, exc) from None
        if output_filter:  # TF Serving's REST API has no output_filter: applied here, checked as the server does
            contract.check_output_filter(decoded, output_filter)
            decoded = {name: decoded[name] for name in output_filter}
        return PredictResult(model_name=model, version=version, signature_name=signature_name,
                             outputs=decoded, latency_ms=latency, transport=self.transport)

    def _single_output_name(self, model, signature_name, version, version_label, timeout) -> str:
        """The name of a signature's only output, which TF Serving's answer leaves out: from the model's metadata
        (not from an ``output_filter``, which may name an output the signature does not have)."""
        sig = self.metadata(model, version=version, version_label=version_label, timeout=timeout)
        if signature_name not in sig.signatures:
            raise Internal(f"the answer of {self.target} for {model} has one output without its name, and the "
                           f"model's metadata has no signature {signature_name!r} to name it")
        outputs = list(sig.signatures[signature_name].outputs)
        return outputs[0] if len(outputs) == 1 else contract.OUTPUT_PROBABILITIES

    def metadata(self, model, *, version=None, version_label=None, timeout=None) -> ModelMetadata:
        url = self._model_path(model, version, version_label) + "/metadata"
        data = self._request("GET", url, timeout)
        try:
            spec = data.get("model_spec", {})
            sigs = data.get("metadata", {}).get("signature_def", {}).get("signature_def", {})
            version_value = spec.get("version")
            return ModelMetadata(
                model_name=spec.get("name", model),
                version=int(version_value) if version_value not in (None, "") else version,
                signatures={name: _signature_spec(name, sig) for name, sig in sigs.items()},
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise _wrong_shape(url, exc) from None

    def status(self, model, *, version=None, version_label=None, timeout=None) -> list[VersionStatus]:
        url = self._model_path(model, version, version_label)
        data = self._request("GET", url, timeout)
        try:
            return [
                VersionStatus(version=int(s["version"]), state=s.get("state", "UNKNOWN"),
                              error_code=s.get("status", {}).get("error_code", "OK"),
                              error_message=s.get("status", {}).get("error_message", ""))
                for s in data.get("model_version_status", [])
            ]
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise _wrong_shape(url, exc) from None

    def _release(self) -> None:
        self._session.close()
        if self._ca_file is not None:
            self._ca_file.close()


def _wrong_shape(url: str, exc: Exception) -> Internal:
    return Internal(f"answer of {url} is not a TF Serving answer ({type(exc).__name__}: {str(exc)[:MESSAGE_CHARS]})")


def _reason(exc) -> str:
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "TLS certificate verification failed (pass the server's root certificates)"
    if "WRONG_VERSION_NUMBER" in text:  # https:// to a port that does not speak TLS (TF Serving's REST never does)
        return "it does not answer TLS, as a plain HTTP port does: give http://host:port for it"
    if "BadStatusLine('\\x00\\x00" in text or "BadStatusLine(b'\\x00\\x00" in text:
        return "it answers in HTTP/2 frames, as a gRPC port does: give grpc://host:port for it"
    for marker in ("Connection refused", "Name or service not known", "timed out", "Connection reset"):
        if marker in text:
            return marker.lower()
    return text[:200]


def _tensor_spec(name: str, info: Mapping) -> TensorSpec:
    shape_info = info.get("tensor_shape", {})
    if shape_info.get("unknown_rank"):
        shape = None
    else:
        shape = tuple(int(d.get("size", -1)) for d in shape_info.get("dim", []))
    return TensorSpec(name=name, dtype=info.get("dtype", "DT_INVALID"), shape=shape)


def _signature_spec(name: str, sig: Mapping) -> SignatureSpec:
    return SignatureSpec(
        name=name,
        method_name=sig.get("method_name", ""),
        inputs={k: _tensor_spec(k, v) for k, v in sig.get("inputs", {}).items()},
        outputs={k: _tensor_spec(k, v) for k, v in sig.get("outputs", {}).items()},
    )
