"""Export a trained classifier as a versioned TF Serving SavedModel.

The graph decodes, orients, resizes and preprocesses images itself (``carclf.imaging``), so clients send
JPEG bytes. Versions are written atomically: into a hidden temporary folder beside the final one (TF Serving
ignores non-numeric folders), then renamed; an existing version is never overwritten.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from carclf import contract, durable, imaging
from carclf.errors import InvalidInput

MAX_WARMUP_RECORDS = 1000
MODEL_NAME = re.compile(r"[A-Za-z0-9_-]+")
PIXEL_WARMUP_RECORDS = 2  # one uint8 [1, H, W, 3] request is H*W*3 bytes: a few warm the graph


def _serving_module(model, input_size: imaging.Size, labels: Sequence[str], labels_path: str, resize: str):
    import tensorflow as tf

    size = imaging.side_pair(input_size)
    height, width = size
    imaging.check_resize(resize)

    class CarClassifier(tf.Module):
        """The exported servable: one Keras model behind two signatures."""

        def __init__(self):
            super().__init__(name="car_classifier")
            # The model's weights (BatchNorm statistics included), not the Keras model: saving lists the
            # attributes of every tracked object (a backbone's hundreds of layers), and stored a default
            # signature of the bare model, traced twice, that nothing serves (docs/PERFORMANCE.md, 2026-12-07).
            self.model_weights = list(model.weights)
            self.labels = tf.constant(list(labels), dtype=tf.string)
            self.labels_asset = tf.saved_model.Asset(labels_path)

        def _classify(self, pixels):
            probs = model(tf.cast(pixels, tf.float32), training=False)
            probs = tf.cast(probs, tf.float32)
            class_id = tf.argmax(probs, axis=-1, output_type=tf.int64)
            return {
                contract.OUTPUT_PROBABILITIES: probs,
                contract.OUTPUT_CLASS_ID: class_id,
                contract.OUTPUT_LABEL: tf.gather(self.labels, class_id),
            }

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=contract.INPUT_IMAGE_BYTES)])
        def serve_bytes(self, image_bytes):
            pixels = tf.map_fn(
                lambda data: imaging.prepare(imaging.decode_image(data), size, resize),
                image_bytes,
                fn_output_signature=tf.TensorSpec([height, width, 3], tf.uint8),
            )
            return self._classify(pixels)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name=contract.INPUT_PIXELS)])
        def serve_pixels(self, pixels):
            shape = tf.shape(pixels)
            same = tf.logical_and(tf.equal(shape[1], height), tf.equal(shape[2], width))
            pixels = tf.cond(same, lambda: tf.ensure_shape(pixels, [None, height, width, 3]),
                             lambda: imaging.prepare(pixels, size, resize))
            return self._classify(tf.ensure_shape(pixels, [None, height, width, 3]))

    return CarClassifier()


def next_version(base_path: str | os.PathLike) -> int:
    """One more than the highest integer version (1 for a new model). A stray file with a version's name
    counts too: the rename into it would fail on every try."""
    base = Path(base_path)
    numbers = (contract.version_number(p.name) for p in base.iterdir()) if base.is_dir() else ()
    versions = [n for n in numbers if n is not None]
    return max(versions, default=0) + 1


def write_warmup_records(path: str | os.PathLike, model_name: str, images: Sequence[bytes],
                         input_size: imaging.Size | None = None, pixel_records: int = PIXEL_WARMUP_RECORDS,
                         resize: str = "squash") -> int:
    """Write TF Serving warmup records: one ``serving_default`` PredictRequest of JPEG bytes per image, and
    with ``input_size`` a ``serving_pixels`` request (the photo decoded and resized exactly as the
    model's own preprocessing does) for the first ``pixel_records`` images, so both signatures are warm.
    At most 1000 records in all. Returns how many were written."""
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    def record(signature: str, key: str, tensor) -> bytes:
        request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=model_name,
                                                                           signature_name=signature))
        request.inputs[key].CopyFrom(tensor)
        return prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)).SerializeToString()

    images = list(images)
    records = [record(contract.SIGNATURE_BYTES, contract.INPUT_IMAGE_BYTES,
                      tf.make_tensor_proto([data], dtype=tf.string)) for data in images]
    if input_size is not None:
        for data in images[:pixel_records]:
            pixels = imaging.prepare(imaging.decode_image(tf.constant(data)), input_size, resize).numpy()
            records.append(record(contract.SIGNATURE_PIXELS, contract.INPUT_PIXELS,
                                  tf.make_tensor_proto(pixels[None].astype(np.uint8))))
    with tf.io.TFRecordWriter(str(path)) as writer:
        for data in records[:MAX_WARMUP_RECORDS]:
            writer.write(data)
    return min(len(records), MAX_WARMUP_RECORDS)


def check_model_name(name: str, hint: str = "") -> None:
    """A model name is a folder of the repository and a REST path segment: ASCII letters, digits, '_' or '-'."""
    if not MODEL_NAME.fullmatch(name or ""):
        raise InvalidInput(f"model name must be ASCII letters, digits, '_' or '-', received {name!r}{hint}")


def export_model(
    model,
    *,
    repository: str | os.PathLike,
    name: str,
    input_size: imaging.Size,
    labels: Sequence[str],
    warmup_images: Sequence[bytes] = (),
    verify_images: Sequence[bytes] = (),
    card: dict[str, Any] | None = None,
    atol: float = 1e-4,
    resize: str = "squash",
) -> Path:
    """Export ``model`` (float pixels [B, S, S, 3] in 0..255 -> probabilities) as the next version; the
    graph resizes photos with ``resize`` (``imaging.RESIZE_MODES``), as the model was trained.

    Returns the final version folder. After saving, the SavedModel is reloaded and must agree with the
    Keras model within ``atol`` on ``verify_images``, otherwise nothing is published.
    """
    import tensorflow as tf

    check_model_name(name)
    if len(labels) != int(model.output_shape[-1]):
        raise InvalidInput(f"{len(labels)} labels for a model with {model.output_shape[-1]} outputs")
    base = Path(repository) / name
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-export-{uuid.uuid4().hex[:8]}-", dir=base))
    try:
        assets_src = tmp / "_labels_src.txt"
        assets_src.write_text("\n".join(labels) + "\n", encoding="utf-8")
        module = _serving_module(model, input_size, labels, str(assets_src), resize)
        # The functions themselves, not concrete functions traced here: the save traces each inside its save
        # context (another cache key), so a trace made before would be thrown away (2-5 s a signature).
        signatures = {contract.SIGNATURE_BYTES: module.serve_bytes, contract.SIGNATURE_PIXELS: module.serve_pixels}
        export_dir = tmp / "savedmodel"
        tf.saved_model.save(module, str(export_dir), signatures=signatures)
        # The Asset keeps its file name; give it the contract's name.
        assets_dir = export_dir / "assets"
        (assets_dir / assets_src.name).rename(assets_dir / contract.LABELS_ASSET)
        assets_src.unlink()
        extra = export_dir / "assets.extra"
        extra.mkdir(exist_ok=True)
        warmups = (write_warmup_records(extra / contract.WARMUP_FILE, name, warmup_images, input_size,
                                        resize=resize) if warmup_images else 0)

        max_diff = verify_export(model, export_dir, input_size, verify_images, resize) if verify_images else None
        if max_diff is not None and max_diff > atol:
            raise InvalidInput(f"exported model disagrees with the Keras model by {max_diff:.2e} > {atol:.0e}")

        card_data = {
            "name": name,
            "input_size": contract.size_json(input_size),
            "resize": resize,
            "labels": list(labels),
            "signatures": {
                contract.SIGNATURE_BYTES: {"inputs": {contract.INPUT_IMAGE_BYTES: "string[batch]"}},
                contract.SIGNATURE_PIXELS: {"inputs": {contract.INPUT_PIXELS: "uint8[batch,H,W,3]"}},
                "outputs": list(contract.OUTPUTS),
            },
            "warmup_records": warmups,
            "export_check_max_abs_diff": max_diff,
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(card or {}),
        }
        (extra / contract.MODEL_CARD).write_text(json.dumps(card_data, indent=2, default=str), encoding="utf-8")

        durable.sync_tree(export_dir)  # on disk before the rename publishes it (see carclf.durable)
        while True:
            version = next_version(base)
            final = base / str(version)
            try:
                os.rename(export_dir, final)  # atomic on one filesystem; fails if the version appeared
                break
            except OSError:
                if not final.exists():
                    raise
        durable.sync(base)
        durable.sync(base.parent)  # the model's folder itself may be new
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verify_export(model, export_dir: str | os.PathLike, input_size: imaging.Size, images: Sequence[bytes],
                  resize: str = "squash") -> float:
    """Largest absolute difference between the SavedModel (from bytes) and the Keras model on ``images``."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(export_dir))
    serve = loaded.signatures[contract.SIGNATURE_BYTES]
    data = tf.constant(list(images), dtype=tf.string)
    served = serve(**{contract.INPUT_IMAGE_BYTES: data})[contract.OUTPUT_PROBABILITIES].numpy()
    pixels = tf.stack([imaging.prepare(imaging.decode_image(d), input_size, resize) for d in images])
    direct = model(tf.cast(pixels, tf.float32), training=False)
    return float(np.max(np.abs(served - np.asarray(direct))))
