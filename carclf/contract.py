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

from collections.abc import Mapping
from typing import Any

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

#: What a model card written before cards recorded ``resize`` means: photos were squashed to the square.
DEFAULT_RESIZE = "squash"


def card_resize(card: Mapping[str, Any]) -> str:
    """The resize mode (``carclf.imaging.RESIZE_MODES``) a model card records; callers validate it."""
    return card.get("resize", DEFAULT_RESIZE)

# Hard limits on what one image may be, checked before any pixel is decoded.
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000  # e.g. 8000 x 5000
MIN_IMAGE_SIDE = 8
