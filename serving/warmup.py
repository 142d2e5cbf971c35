"""TF Serving warmup records: ``<version>/assets.extra/tf_serving_warmup_requests``.

A TFRecord file of ``PredictionLog`` messages (at most 1000). The embedded server replays their
``predict_log`` requests through the version's own signatures before the version is marked AVAILABLE,
so the first real request does not pay for graph optimisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from carclf import contract
from carclf.errors import InvalidInput
from carclf.tensors import to_ndarray

MAX_WARMUP_RECORDS = 1000


@dataclass(frozen=True)
class WarmupRequest:
    signature_name: str
    inputs: dict[str, np.ndarray]


def warmup_file(version_path: Path) -> Path:
    return version_path / "assets.extra" / contract.WARMUP_FILE


def read_warmup_requests(path: Path) -> list[WarmupRequest]:
    """Parse the records; a malformed or unsupported record fails the load, as in TF Serving."""
    import tensorflow as tf
    from google.protobuf.message import DecodeError
    from tensorflow_serving.apis import prediction_log_pb2

    requests: list[WarmupRequest] = []
    try:
        for index, record in enumerate(tf.data.TFRecordDataset(str(path)).as_numpy_iterator()):
            if index >= MAX_WARMUP_RECORDS:
                raise InvalidInput(f"{path}: more than {MAX_WARMUP_RECORDS} warmup records")
            log = prediction_log_pb2.PredictionLog.FromString(record)
            kind = log.WhichOneof("log_type")
            if kind != "predict_log":
                raise InvalidInput(f"{path}: record {index} is a {kind}; the embedded server replays predict_log "
                                   "records only")
            request = log.predict_log.request
            inputs = {name: to_ndarray(proto, name) for name, proto in request.inputs.items()}
            requests.append(WarmupRequest(request.model_spec.signature_name or "serving_default", inputs))
    except tf.errors.OpError as exc:
        raise InvalidInput(f"{path}: not a readable TFRecord file: {exc.message}") from None
    except DecodeError as exc:
        raise InvalidInput(f"{path}: a record is not a PredictionLog: {exc}") from None
    return requests
