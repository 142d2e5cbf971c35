"""What the model server serves: anything that can describe its signatures and answer a prediction.

A SavedModel version is one kind of servable; an ensemble declared in a Triton ``config.pbtxt`` is
another. The server's transports (gRPC, REST) and its batching only ever talk to this interface.

How a request reaches a servable (``carclf.serving.predictor.Predictor``)::

    lease = manager.acquire(name, version | label)      # version resolution, in-flight accounting
    servable.validate(signature, inputs, output_filter)  # refuse bad input before anything runs
    batchable servable + --enable_batching -> shared batch scheduler -> servable.run(merged batch)
    otherwise                                  -> servable.predict(signature, inputs, ...)

An ensemble servable receives the server's in-process ``Predictor`` when it is loaded
(``carclf.ensemble.servable.load(path, predictor)``) and calls its members through
``predictor.predict(model_name, inputs, signature_name=..., version=..., version_label=...,
output_filter=..., deadline=...) -> PredictResult``, which takes the same path as a gRPC Predict
(version resolution, batching, metrics, typed errors) without any serialization.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from carclf.cancel import CancelToken


@dataclass(frozen=True)
class TensorInfo:
    """One named input or output of a signature (``dtype`` is a numpy dtype name; -1 is an unknown dim).

    ``dtype`` is ``"object"`` for strings (numpy holds them as ``bytes`` objects). ``shape`` is None
    for an unknown rank. ``tensor_name`` is the graph tensor (e.g. ``serving_default_image_bytes:0``),
    shown in model metadata; servables without a graph may leave it empty.
    """

    name: str
    dtype: str
    shape: tuple[int, ...] | None
    tensor_name: str = ""


@dataclass(frozen=True)
class Signature:
    name: str
    method_name: str  # "tensorflow/serving/predict"
    inputs: Mapping[str, TensorInfo]
    outputs: Mapping[str, TensorInfo]


@dataclass(frozen=True)
class Dependencies:
    """Models of the same server that a servable calls (an ensemble's members), and how many of them must
    be able to answer for it to answer. ``versions`` names, per model, the version number or the version
    label it is called with (absent: the latest AVAILABLE version)."""

    models: tuple[str, ...]
    needed: int
    versions: Mapping[str, int | str] = field(default_factory=dict)


class Servable(abc.ABC):
    """A loaded, callable model version."""

    name: str
    version: int
    #: True when requests may be merged by the shared batch scheduler: every input and output has
    #: the batch as its first dimension and ``run`` accepts any batch size.
    batchable: bool = False

    @abc.abstractmethod
    def signatures(self) -> Mapping[str, Signature]:
        """Signature name -> description; used for metadata and for input validation."""

    @abc.abstractmethod
    def predict(
        self,
        signature_name: str,
        inputs: Mapping[str, np.ndarray],
        *,
        output_filter: Sequence[str] = (),
        deadline: float | None = None,
        cancel: CancelToken | None = None,
    ) -> dict[str, np.ndarray]:
        """Run one request. ``deadline`` is an absolute ``time.monotonic()`` value or None; ``cancel`` is
        cancelled when the request ends (its client gave up, or it was answered): a servable that does work
        of its own for the request (an ensemble calling its members) stops it then.

        Raises errors of ``carclf.errors`` (InvalidInput, NotFound, DeadlineExceeded, ...), never bare ones.
        """

    def validate(
        self, signature_name: str, inputs: Mapping[str, np.ndarray], output_filter: Sequence[str] = ()
    ) -> Signature:
        """Check a request against the signature before it is queued or run; returns the signature.

        The default checks names, dtypes, shapes, a shared non-empty batch dimension and probes every
        ``image_bytes`` element's header (``carclf.serving.validation``); servables may add their own checks.
        """
        from carclf.serving.validation import check_request

        return check_request(self.signatures(), signature_name, inputs, output_filter)

    def run(self, signature_name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run inputs that ``validate`` already accepted (the batch scheduler calls this on merged
        batches) and return every output of the signature. The default calls ``predict``."""
        return self.predict(signature_name, inputs)

    def warmup(self) -> int:
        """Replay warmup requests before the version is marked AVAILABLE; returns how many ran."""
        return 0

    def dependencies(self) -> Dependencies | None:
        """Models of this server it cannot answer without (None: it needs none). The model manager keeps
        it AVAILABLE only while enough of them are."""
        return None

    def close(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Release resources once the version is unloaded and its in-flight requests have finished."""
