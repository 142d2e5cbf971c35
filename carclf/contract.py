"""The exported-model contract that training, serving, the ensemble and the clients share.

Every SavedModel under ``model_repository/<name>/<version>/`` has these signatures:

``serving_default``
    input ``image_bytes``: tf.string [batch], JPEG/PNG/GIF/BMP bytes (decoded, EXIF-rotated,
    resized and preprocessed inside the graph exactly as training did).
``serving_pixels``
    input ``pixels``: tf.uint8 [batch, H, W, 3], prepared views (any H, W; resized in-graph to the
    model's input size when they differ, a no-op when they match).

Both answer ``probabilities`` float32 [batch, classes], ``class_id`` int64 [batch] and ``label``
tf.string [batch]. Labels are in ``assets/labels.txt``, the model card in ``assets.extra/model_card.json``
and warmup records in ``assets.extra/tf_serving_warmup_requests``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from carclf.errors import FailedPrecondition, InvalidInput

SIGNATURE_BYTES = "serving_default"
SIGNATURE_PIXELS = "serving_pixels"

INPUT_IMAGE_BYTES = "image_bytes"
INPUT_PIXELS = "pixels"

OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_CLASS_ID = "class_id"
OUTPUT_LABEL = "label"
OUTPUTS = (OUTPUT_PROBABILITIES, OUTPUT_CLASS_ID, OUTPUT_LABEL)

LABELS_ASSET = "labels.txt"
MODEL_CARD = "model_card.json"
WARMUP_FILE = "tf_serving_warmup_requests"

#: What a model card written before cards recorded ``resize`` means: photos were squashed to the input size.
DEFAULT_RESIZE = "squash"


def ascii_digits(text: str) -> bool:
    """``text`` is a non-empty run of ASCII digits (``str.isdigit`` alone also takes '²', which ``int`` refuses,
    and '٣', which ``int`` reads as 3)."""
    return text.isascii() and text.isdigit()


#: The largest model version: versions are int64 in TF Serving's protos and REST paths.
MAX_VERSION = 2**63 - 1


def version_number(name: str) -> int | None:
    """The version a model folder's child names: ASCII digits only, as TF Serving reads them ('2' is 2); None for any
    other name, and for a number past int64, which TF Serving's parse refuses too (such a folder is no version)."""
    if not ascii_digits(name):
        return None
    number = int(name)
    return number if number <= MAX_VERSION else None


def check_output_filter(outputs: Collection[str], output_filter: Sequence[str]) -> None:
    """TF Serving's refusal of an ``output_filter`` that names an output the signature lacks, or one twice: the
    server checks requests with it, and the REST client (TF Serving's REST API has no filter) its answers."""
    seen: set[str] = set()
    for alias in output_filter:
        if alias not in outputs:
            raise InvalidInput(f"output tensor alias not found in signature: {alias} Outputs expected to be in "
                               f"the set {{{','.join(sorted(outputs))}}}.")
        if alias in seen:
            raise InvalidInput(f"duplicate output tensor alias: {alias}")
        seen.add(alias)


def card_resize(card: Mapping[str, Any]) -> str:
    """The resize mode (``carclf.imaging.RESIZE_MODES``) a model card records; callers validate it."""
    return card.get("resize", DEFAULT_RESIZE)


#: A model's input size: one side (a square) or (height, width). Model cards write ``input_size`` as one
#: side for a square model (every card before rectangular inputs) and as [height, width] otherwise.
Size = int | tuple[int, int]


def side_pair(size: Size | list[int]) -> tuple[int, int]:
    """(height, width) of an input size given as one side (square) or as (height, width)."""
    if isinstance(size, int):
        return (size, size)
    height, width = size
    return (int(height), int(width))


def plain_size(size: Size | list[int]) -> Size:
    """The canonical form of a size: an int for a square, else a (height, width) tuple (run files keep lists)."""
    height, width = side_pair(size)
    return height if height == width else (height, width)


def size_json(size: Size | list[int]) -> int | list[int]:
    """A size as model cards and reports write it: one side for a square, else [height, width]."""
    plain = plain_size(size)
    return plain if isinstance(plain, int) else list(plain)


def size_text(size: Size | list[int]) -> str:
    """``320`` for a square, ``224x448`` (height x width) otherwise."""
    height, width = side_pair(size)
    return str(height) if height == width else f"{height}x{width}"


def card_input_size(card: Mapping[str, Any]) -> Size | None:
    """The input size a model card records, or None when it records none that is usable (sides >= 8 px)."""
    value = card.get("input_size")
    if isinstance(value, bool) or not (isinstance(value, int) or (
            isinstance(value, list | tuple) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value))):
        return None
    return plain_size(value) if min(side_pair(value)) >= 8 else None


def required_input_size(card: Mapping[str, Any] | None, card_path: Any) -> Size:
    """The input size the model card at ``card_path`` records (``card`` None: there is no card there);
    FailedPrecondition naming the card otherwise: the export records the size there only, not in the graph."""
    size = card_input_size(card or {})
    if size is None:
        raise FailedPrecondition(f"model card {str(card_path)!r} is missing: it records the model's input size"
                                 if card is None else
                                 f"model card {str(card_path)!r} has no usable input_size (received "
                                 f"{card.get('input_size')!r})")
    return size


# Hard limits on what one image may be, checked before any pixel is decoded.
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000  # e.g. 8000 x 5000
MIN_IMAGE_SIDE = 8
