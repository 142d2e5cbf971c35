"""What one photo costs on the wire in each format a client could send.

JPEG bytes (``serving_default``), uint8 pixels already resized to the model's input size
(``serving_pixels``), and float JSON (what clients of float-input models send: preprocessed pixels as
nested JSON numbers; our signatures do not take it, it is sized for comparison only).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from carclf import contract
from carclf.loadtest import protocol


def prepared_pixels(data: bytes, size: contract.Size, resize: str = "squash") -> np.ndarray:
    """uint8 [1, height, width, 3] for the model's ``size``: the photo decoded and resized exactly as the
    model's graph would (its card's ``resize`` mode)."""
    from carclf import imaging

    return np.asarray(imaging.prepare(imaging.decode_image(data), size, resize))[np.newaxis]


def request_sizes(model: str, data: bytes, size: contract.Size, resize: str = "squash") -> dict[str, int]:
    """Bytes of one request carrying ``data`` in every format, over gRPC and over REST."""
    jpeg = {contract.INPUT_IMAGE_BYTES: np.array([data], dtype=object)}
    pixels = {contract.INPUT_PIXELS: prepared_pixels(data, size, resize)}
    floats = pixels[contract.INPUT_PIXELS].astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    float_request = protocol.grpc_request(model, contract.SIGNATURE_PIXELS, {"input": floats})
    return {
        "jpeg_file": len(data),
        "jpeg_grpc": protocol.grpc_request(model, contract.SIGNATURE_BYTES, jpeg).ByteSize(),
        "jpeg_rest_b64": len(protocol.rest_body(contract.SIGNATURE_BYTES, jpeg)),
        "uint8_grpc": protocol.grpc_request(model, contract.SIGNATURE_PIXELS, pixels).ByteSize(),
        "uint8_rest_json": len(protocol.rest_body(contract.SIGNATURE_PIXELS, pixels)),
        "float_grpc": float_request.ByteSize(),
        "float_rest_json": len(json.dumps({"instances": floats.tolist()}, separators=(",", ":"))),
    }


def payload_table(model: str, photos: Sequence[bytes], size: contract.Size, resize: str = "squash") -> dict:
    """Mean bytes per request of each format over ``photos``, and each as a multiple of gRPC JPEG."""
    sizes = [request_sizes(model, data, size, resize) for data in photos]
    means = {key: float(np.mean([s[key] for s in sizes])) for key in sizes[0]}
    base = means["jpeg_grpc"]
    return {
        "photos": len(sizes),
        "input_size": contract.size_json(size),
        "mean_bytes": {k: round(v) for k, v in means.items()},
        "relative_to_jpeg_grpc": {k: round(v / base, 2) for k, v in means.items()},
    }
