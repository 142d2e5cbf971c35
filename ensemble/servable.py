"""The ensemble served as a model of its own: a ``carclf.serving.servable.Servable`` named by its config.

The embedded server calls ``load(config_path, predictor)`` for each ``--ensemble_config_file``; the gateway
builds the same servable over gRPC members. Its ``serving_default`` signature takes ``image_bytes``
(tf.string [batch]) and answers the outputs the config declares: ``probabilities`` [batch, C],
``class_id``, ``label``, top-k, per-member probabilities/labels/versions/latencies and ``degraded``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from carclf import contract
from carclf.cancel import CancelToken
from carclf.ensemble import aggregate as agg
from carclf.ensemble.config import (
    AGGREGATE_OUTPUTS,
    NUMPY_DTYPES,
    EnsembleConfig,
    check_output_dims,
    load_config,
)
from carclf.ensemble.members import PredictorMemberCaller
from carclf.ensemble.runtime import EnsembleResult, EnsembleRuntime, LabelMismatch
from carclf.errors import ConfigError, InvalidInput
from carclf.serving.servable import Dependencies, Servable, Signature, TensorInfo

METHOD_PREDICT = "tensorflow/serving/predict"


class EnsembleServable(Servable):
    """An ``EnsembleRuntime`` behind the Servable interface the server's transports and batching use."""

    def __init__(self, runtime: EnsembleRuntime):
        self.runtime = runtime
        self.config: EnsembleConfig = runtime.config
        self.name = self.config.name
        self.version = self.config.version

    # Description ------------------------------------------------------------------------------

    def _dims(self, key: str) -> tuple[int, ...]:
        classes = len(self.runtime._labels) if self.runtime._labels is not None else -1
        members = len(self.config.members)
        k = min(self.config.top_k, classes) if classes > 0 else -1
        return {
            contract.OUTPUT_PROBABILITIES: (-1, classes),
            "top_k_labels": (-1, k),
            "top_k_probabilities": (-1, k),
            "member_probabilities": (-1, members, classes),
        }.get(key, (-1,) + tuple(members for _ in AGGREGATE_OUTPUTS[key][1]))

    def signatures(self) -> Mapping[str, Signature]:
        inputs = {self.config.input_name: TensorInfo(self.config.input_name, "object", (-1,))}
        outputs = {
            name: TensorInfo(name, NUMPY_DTYPES[AGGREGATE_OUTPUTS[key][0]], self._dims(key))
            for key, name in self.config.outputs.items()
        }
        return {contract.SIGNATURE_BYTES: Signature(contract.SIGNATURE_BYTES, METHOD_PREDICT, inputs, outputs)}

    # Serving ------------------------------------------------------------------------------------

    def predict(self, signature_name: str, inputs: Mapping[str, np.ndarray], *, output_filter: Sequence[str] = (),
                deadline: float | None = None, cancel: CancelToken | None = None) -> dict[str, np.ndarray]:
        signature = self.validate(signature_name, inputs, output_filter)  # the server's checks, once
        images = [_as_bytes(x, i) for i, x in enumerate(np.asarray(inputs[self.config.input_name]).reshape(-1))]
        result = self.runtime.predict(images, deadline=deadline, cancel=cancel)
        outputs = result_tensors(result, self.config.top_k)
        wanted = set(output_filter) if output_filter else set(signature.outputs)
        return {tensor: outputs[key] for key, tensor in self.config.outputs.items() if tensor in wanted}

    def warmup(self) -> int:
        """Learn the members' input sizes and labels, trace the image graphs and send one synthetic photo
        through the members that are up (members that are not are described again by the first request
        that needs them). Returns the number of warmup requests that succeeded (0 or 1)."""
        return int(self.runtime.warm(call_members=True))

    def dependencies(self) -> Dependencies | None:
        """Members run by this same server (in-process) must be served by it: at least the quorum of them
        (all of them with failure_policy 'fail'). Members behind a remote server (the gateway) are not
        checked here; a call finds out."""
        if not isinstance(self.runtime.caller, PredictorMemberCaller):
            return None
        versions = {m.name: m.version_label or m.version for m in self.config.members
                    if m.version_label or m.version is not None}
        return Dependencies(self.config.member_names, self.config.members_needed, versions)

    def close(self) -> None:
        self.runtime.close()


def result_tensors(result: EnsembleResult, top_k: int) -> dict[str, np.ndarray]:
    """Every aggregate output of a result as batch-major numpy arrays (strings as bytes objects)."""
    n = result.probabilities.shape[0]
    members = result.members
    ids, top_p = agg.top_k(result.probabilities, top_k)
    labels = np.array([s.encode("utf-8") for s in result.labels], dtype=object)
    member_probs = result.member_probabilities()
    member_labels = [
        (result.labels[int(np.argmax(member_probs[i, j]))].encode("utf-8") if m.answered else b"")
        for i in range(n) for j, m in enumerate(members)
    ]

    def per_photo(values, dtype):
        return np.tile(np.asarray(values, dtype=dtype)[None, :], (n, 1))

    return {
        contract.OUTPUT_PROBABILITIES: result.probabilities.astype(np.float32),
        contract.OUTPUT_CLASS_ID: result.class_ids,
        contract.OUTPUT_LABEL: labels[result.class_ids],
        "top_k_labels": labels[ids],
        "top_k_probabilities": top_p.astype(np.float32),
        "member_names": per_photo([m.name.encode("utf-8") for m in members], object),
        "member_versions": per_photo([m.version or 0 for m in members], np.int64),
        "member_probabilities": member_probs,
        "member_labels": np.array(member_labels, dtype=object).reshape(n, len(members)),
        "member_answered": per_photo([m.answered for m in members], bool),
        "member_latency_ms": per_photo([m.latency_ms for m in members], np.float32),
        "degraded": np.full((n,), result.degraded, dtype=bool),
    }


def _as_bytes(value, index: int) -> bytes:
    if isinstance(value, bytes | bytearray | np.bytes_):
        return bytes(value)
    raise InvalidInput(f"image_bytes[{index}] must be encoded photo bytes, received {type(value).__name__}")


def check(config_path: str | os.PathLike) -> str:
    """The embedded server's check before it loads any model: the config file parses and validates; the name
    of the model it declares."""
    return load_config(config_path).name


def load(config_path: str | os.PathLike, predictor, *, model_repository: str | os.PathLike | None = None) -> EnsembleServable:
    """The embedded server's entry point: the ensemble of ``config_path`` over the in-process ``predictor``."""
    config = load_config(config_path)
    caller = PredictorMemberCaller(predictor, model_repository=model_repository)
    servable = EnsembleServable(EnsembleRuntime(config, caller))
    servable.warmup()  # the server marks it AVAILABLE at once: be ready before that
    mismatched = [exc.message for exc in servable.runtime.prepare(strict=False).values()
                  if isinstance(exc, LabelMismatch)]
    if mismatched:  # the files disagree: no request could be answered, so the server does not start
        raise ConfigError("; ".join(mismatched), source=str(config_path),
                          field="output.label_filename" if config.labels is not None else "ensemble_scheduling.step")
    if servable.runtime._labels is not None:  # the classes are known now: fixed output dims must agree
        check_output_dims(config, len(servable.runtime._labels))
    return servable
