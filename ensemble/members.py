"""How the ensemble runtime reaches its members: a small interface with one implementation per route.

* ``GrpcMemberCaller``: members served by TF Serving (or the embedded server) over gRPC, through the
  product's ``GrpcClient``; used by ``carclf gateway``.
* ``PredictorMemberCaller``: members hosted in the same process by the embedded server's predictor;
  used when the server loads the ensemble from ``--ensemble_config_file``.
* ``SavedModelMemberCaller``: members loaded straight from a model repository with TensorFlow; used by
  the evaluation and the benchmark (no server at all).

Every caller sends ONE ``serving_pixels`` Predict per member with all views stacked, and describes a
member (input size, resize mode, labels) from its model card (``assets.extra/model_card.json``) or the config.
"""

from __future__ import annotations

import abc
import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from carclf import contract, imaging
from carclf.cancel import CancelToken
from carclf.ensemble.config import Member
from carclf.errors import DeadlineExceeded, FailedPrecondition, InvalidInput, NotFound, Unavailable
from carclf.serving.repository import list_versions, model_versions


class InputSpec(NamedTuple):
    """How photos become a member's input: its size (one side, or (height, width)) and the resize mode
    (``imaging.RESIZE_MODES``). Members with equal specs share their TTA views."""

    size: contract.Size  # one side, or (height, width)
    resize: str = "squash"


@dataclass(frozen=True)
class MemberInfo:
    """What the runtime must know about a member before calling it."""

    input_size: contract.Size
    labels: tuple[str, ...] | None = None
    resize: str = "squash"
    version: int | None = None  # the version whose model card this is (None: not read from a version)

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(self.input_size, self.resize)


@dataclass(frozen=True)
class MemberReply:
    probabilities: np.ndarray | None  # float32 [rows, classes], one row per view sent; None: no such output
    version: int | None


class MemberCaller(abc.ABC):
    """Calls one member model on a stack of prepared views."""

    @abc.abstractmethod
    def describe(self, member: Member, version: int | None = None) -> MemberInfo:
        """Input size and labels of the member: of the version a call would use now, or of ``version`` (one
        that answered a call). Raises NotFound/Unavailable when it cannot be reached."""

    def current_version(self, member: Member) -> int | None:
        """The version a call would use now, found cheaply (no model card read); None when this caller cannot
        tell before calling (the reply names the version that answered)."""
        return None

    @abc.abstractmethod
    def call(self, member: Member, pixels: np.ndarray, *, deadline: float,
             cancel: CancelToken | None = None) -> MemberReply:
        """ONE Predict on the member's ``serving_pixels`` signature with all ``pixels`` [rows, S, S, 3] uint8.

        ``deadline`` is an absolute ``time.monotonic()`` value; cancelling ``cancel`` (the ensemble request
        ended) ends a call still waiting or in flight with ``Cancelled``. Raises ``carclf.errors`` types.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release channels or models."""


def remaining(deadline: float) -> float:
    """Seconds left before ``deadline``; raises DeadlineExceeded when none is."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("the ensemble deadline passed before the member was called")
    return left


# ---------------------------------------------------------------------------------------------
# Model cards on disk
# ---------------------------------------------------------------------------------------------

def version_folders(base: str | os.PathLike) -> list[Path]:
    """Integer version folders of a model, oldest first (non-numeric folders are ignored as TF Serving does)."""
    return [path for _, path in sorted(list_versions(Path(base)).items())]


def read_model_card(version_dir: str | os.PathLike) -> dict:
    """The model card of a version folder. A missing or unreadable card is UNAVAILABLE, as a member that is
    down: a version copied in place may load before its ``assets.extra/`` arrives, and the ensemble leaves
    the member out (degrade) until it can be described, instead of refusing every request."""
    path = Path(version_dir) / "assets.extra" / contract.MODEL_CARD
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Unavailable(f"model card {str(path)!r} is missing") from None
    except (OSError, ValueError) as exc:
        raise Unavailable(f"model card {str(path)!r} is unreadable: {exc}") from None


def info_from_card(card: Mapping, member: Member, where: str, version: int | None = None) -> MemberInfo:
    size = member.input_size or contract.card_input_size(card)
    if size is None:
        raise FailedPrecondition(f"member {member.name!r}: no usable input_size in {where} (received "
                                 f"{card.get('input_size')!r}); "
                                 f"declare parameter 'input_size.{member.name}' in the ensemble config")
    resize = member.resize or contract.card_resize(card)
    if resize not in imaging.RESIZE_MODES:
        raise FailedPrecondition(f"member {member.name!r}: unknown resize mode {resize!r} in {where}; expected "
                                 f"one of {list(imaging.RESIZE_MODES)}")
    labels = card.get("labels")
    return MemberInfo(input_size=size, labels=tuple(str(x) for x in labels) if labels else None, resize=resize,
                      version=version)


def info_from_repository(repository: str | os.PathLike, member: Member, version: int | None = None) -> MemberInfo:
    """The member's model card in ``<repository>/<name>/<version>/``: of ``version``, else of the member's
    pinned version, else of the newest."""
    versions = version_folders(Path(repository) / member.name)
    wanted = version if version is not None else member.version
    if wanted is not None:
        versions = [v for v in versions if int(v.name) == wanted]
    if not versions:
        which = f"version {wanted}" if wanted is not None else "version folder"
        hint = ""
        if inside := model_versions(Path(repository)):
            hint = (f" ({str(repository)!r} is itself a model, of versions {inside}: the model repository is the "
                    f"folder that holds the members, here {str(Path(repository).absolute().parent)!r})")
        raise NotFound(f"member {member.name!r}: no {which} under {str(Path(repository) / member.name)!r}{hint}")
    return info_from_card(read_model_card(versions[-1]), member, str(versions[-1]), int(versions[-1].name))

def declared_info(member: Member, model_repository: str | os.PathLike | None, hint: str,
                  version: int | None = None) -> MemberInfo:
    """A member's facts from a local model repository, else from the config's ``input_size.<member>``."""
    if model_repository is not None:
        return info_from_repository(model_repository, member, version)
    if member.input_size:
        return MemberInfo(input_size=member.input_size, resize=member.resize or "squash")
    raise FailedPrecondition(f"member {member.name!r}: its input size is unknown; {hint}")



# ---------------------------------------------------------------------------------------------
# gRPC (TF Serving or the embedded server)
# ---------------------------------------------------------------------------------------------

class GrpcMemberCaller(MemberCaller):
    """Members reached over gRPC, each channel reused by every call.

    ``client`` serves every member unless ``clients`` names another one for it (members spread over
    several TF Serving deployments). TF Serving's metadata does not carry the input size, so it comes from
    the config's ``input_size.<m>`` parameter or from the model cards of a model repository the gateway
    can read (``model_repository``).
    """

    def __init__(self, client, *, clients: Mapping[str, object] | None = None,
                 model_repository: str | os.PathLike | None = None):
        self.client = client
        self.clients = dict(clients or {})
        self.model_repository = model_repository

    def client_for(self, member: Member):
        return self.clients.get(member.name, self.client)

    def describe(self, member: Member, version: int | None = None) -> MemberInfo:
        return declared_info(member, self.model_repository,
                             f"give the gateway --model_repository or declare parameter 'input_size.{member.name}'",
                             version)

    def call(self, member: Member, pixels: np.ndarray, *, deadline: float,
             cancel: CancelToken | None = None) -> MemberReply:
        """One Predict to the member, cancelled on the member's server too when ``cancel`` is. A CANCELLED
        reply the gateway did not ask for (a member shutting down ends a call caught in its closing connection
        so) comes as UNAVAILABLE from the client, which the ensemble may retry and degrade on."""
        result = self.client_for(member).predict(
            member.name, {contract.INPUT_PIXELS: pixels}, signature_name=contract.SIGNATURE_PIXELS,
            version=member.version, version_label=member.version_label,
            output_filter=(contract.OUTPUT_PROBABILITIES,), timeout=remaining(deadline), cancel=cancel)
        # no probabilities (another model's outputs): left out by the runtime's check, not retried
        return MemberReply(result.outputs.get(contract.OUTPUT_PROBABILITIES), result.version)

    def close(self) -> None:
        for client in {id(c): c for c in (self.client, *self.clients.values())}.values():
            client.close()


# ---------------------------------------------------------------------------------------------
# In-process: the embedded server's predictor
# ---------------------------------------------------------------------------------------------

class PredictorMemberCaller(MemberCaller):
    """Members served by the same process, through the embedded server's predictor.

    ``predictor.predict(model_name, inputs, *, signature_name, version, version_label, output_filter,
    deadline) -> PredictResult(model_name, version, signature_name, outputs)`` takes the same path as a
    gRPC Predict (version resolution, batching, metrics) without serialising anything. The member's model
    card is read from the folder of the version the server would use (``predictor.manager.acquire``), else
    the config's ``input_size.<m>`` describes it.
    """

    def __init__(self, predictor, *, model_repository: str | os.PathLike | None = None):
        self.predictor = predictor
        self.model_repository = model_repository

    def current_version(self, member: Member) -> int | None:
        manager = getattr(self.predictor, "manager", None)
        if manager is None:
            return None
        with manager.acquire(member.name, member.version, member.version_label) as lease:
            return lease.version

    def describe(self, member: Member, version: int | None = None) -> MemberInfo:
        manager = getattr(self.predictor, "manager", None)
        if manager is not None:
            pinned = (version, None) if version is not None else (member.version, member.version_label)
            with manager.acquire(member.name, *pinned) as lease:
                folder, served = getattr(lease.servable, "path", None), lease.version
            if folder is not None:
                return info_from_card(read_model_card(folder), member, str(folder), served)
        return declared_info(member, self.model_repository,
                             f"declare parameter 'input_size.{member.name}' in the ensemble config", version)

    def call(self, member: Member, pixels: np.ndarray, *, deadline: float,
             cancel: CancelToken | None = None) -> MemberReply:
        """Views beyond the server's ``max_batch_size`` (photos x TTA views can exceed it) are sent in
        chunks the batcher accepts, every chunk pinned to the version that answered the first. A chunk still
        queued when ``cancel`` is cancelled leaves the queue and is never run."""
        remaining(deadline)
        batcher = getattr(self.predictor, "batcher", None)
        limit = getattr(getattr(batcher, "config", None), "max_batch_size", 0) or len(pixels) or 1
        version, label, parts = member.version, member.version_label, []
        for start in range(0, max(len(pixels), 1), limit):
            result = self.predictor.predict(
                member.name, {contract.INPUT_PIXELS: pixels[start:start + limit]},
                signature_name=contract.SIGNATURE_PIXELS, version=version, version_label=label,
                output_filter=(contract.OUTPUT_PROBABILITIES,), deadline=deadline, cancel=cancel)
            parts.append(np.asarray(result.outputs[contract.OUTPUT_PROBABILITIES], dtype=np.float32))
            version, label = getattr(result, "version", version), None
        return MemberReply(np.concatenate(parts) if len(parts) > 1 else parts[0], version)


# ---------------------------------------------------------------------------------------------
# Directly from a model repository (evaluation, benchmark)
# ---------------------------------------------------------------------------------------------

class SavedModelMemberCaller(MemberCaller):
    """Members loaded from ``<repository>/<name>/<version>/`` with ``tf.saved_model.load``, no server.

    Version labels live in a server's models.config, so here a member pinned by label is refused.
    """

    def __init__(self, repository: str | os.PathLike):
        self.repository = Path(repository)
        self._loaded: dict[tuple[str, int], object] = {}
        self._lock = threading.Lock()

    def _version_dir(self, member: Member, version: int | None = None) -> Path:
        if member.version_label is not None:
            raise InvalidInput(f"member {member.name!r} is pinned to version label {member.version_label!r}; "
                               "labels need a server (models.config); pin a version number instead")
        versions = version_folders(self.repository / member.name)
        wanted = version if version is not None else member.version
        if wanted is not None:
            versions = [v for v in versions if int(v.name) == wanted]
        if not versions:
            raise NotFound(f"member {member.name!r}: no version under {str(self.repository / member.name)!r}")
        return versions[-1]

    def signature(self, member: Member):
        """The loaded ``serving_pixels`` concrete function and its version (cached)."""
        import tensorflow as tf

        folder = self._version_dir(member)
        key = (member.name, int(folder.name))
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = tf.saved_model.load(str(folder))
            loaded = self._loaded[key]
        return loaded.signatures[contract.SIGNATURE_PIXELS], key[1]

    def current_version(self, member: Member) -> int | None:
        return int(self._version_dir(member).name)

    def describe(self, member: Member, version: int | None = None) -> MemberInfo:
        self.signature(member)  # load now, not inside the first request's deadline
        folder = self._version_dir(member, version)
        return info_from_card(read_model_card(folder), member, str(folder), int(folder.name))

    def call(self, member: Member, pixels: np.ndarray, *, deadline: float,
             cancel: CancelToken | None = None) -> MemberReply:
        import tensorflow as tf

        remaining(deadline)  # ``cancel``: the runtime checks it just before; a TF run cannot be stopped once started
        fn, version = self.signature(member)
        try:
            out = fn(**{contract.INPUT_PIXELS: tf.constant(pixels, dtype=tf.uint8)})
        except tf.errors.InvalidArgumentError as exc:
            raise InvalidInput(f"member {member.name!r} refused the views: {exc.message}") from None
        return MemberReply(out[contract.OUTPUT_PROBABILITIES].numpy(), version)

    def close(self) -> None:
        with self._lock:
            self._loaded.clear()
