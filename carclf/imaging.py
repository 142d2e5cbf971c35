"""Image decoding and resizing, written once in TensorFlow ops.

Training's input pipeline, evaluation and TTA, the exported SavedModel and the ensemble all call these
functions, so a photo becomes the same pixels everywhere. ``probe_image`` reads only an image's header,
so oversized or malformed uploads are refused before any pixel is decoded.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass
from pathlib import Path

from carclf import contract
from carclf.contract import Size, plain_size, side_pair, size_text  # noqa: F401 - the size forms, as imaging.*
from carclf.errors import InvalidInput, runtime_message

# How many leading bytes are searched for the EXIF orientation tag (APP1 sits near the start).
_EXIF_SEARCH_BYTES = 65536
_EXIF_MAX_ENTRIES = 64


# ---------------------------------------------------------------------------------------------
# TensorFlow graph ops (usable eagerly, in tf.data and inside tf.function / SavedModels)
# ---------------------------------------------------------------------------------------------

def _exif_orientation(data):
    """EXIF orientation (1..8) of JPEG bytes, or 1 when there is none. Pure TF ops, no Python I/O."""
    import tensorflow as tf

    head = tf.strings.substr(data, 0, _EXIF_SEARCH_BYTES)
    raw = tf.io.decode_raw(head, tf.uint8)
    n = tf.shape(raw)[0]
    buf = tf.cast(tf.concat([raw, tf.zeros([1024], tf.uint8)], 0), tf.int32)

    def at(i):
        return tf.gather(buf, tf.clip_by_value(i, 0, n + 1023))

    is_jpeg = tf.logical_and(tf.greater(n, 12), tf.logical_and(tf.equal(at(0), 0xFF), tf.equal(at(1), 0xD8)))
    # Positions i where b[i-4:i-2] == FF E1 and b[i:i+6] == "Exif\0\0".
    m = tf.maximum(n - 10, 1)
    idx = tf.range(4, m + 4)
    sig = [0x45, 0x78, 0x69, 0x66, 0x00, 0x00]
    hit = tf.logical_and(tf.equal(at(idx - 4), 0xFF), tf.equal(at(idx - 3), 0xE1))
    for k, byte in enumerate(sig):
        hit = tf.logical_and(hit, tf.equal(at(idx + k), byte))
    found = tf.reduce_any(hit)
    first = tf.cast(tf.argmax(tf.cast(hit, tf.int32)), tf.int32) + 4
    tiff = first + 6
    little = tf.equal(at(tiff), 0x49)

    def u16(i):
        return tf.where(little, at(i) + at(i + 1) * 256, at(i) * 256 + at(i + 1))

    def u32(i):
        lo, hi = u16(i), u16(i + 2)
        return tf.where(little, lo + hi * 65536, lo * 65536 + hi)

    ifd = tiff + u32(tiff + 4)
    count = tf.clip_by_value(u16(ifd), 0, _EXIF_MAX_ENTRIES)
    entries = ifd + 2 + 12 * tf.range(_EXIF_MAX_ENTRIES)
    tags = u16(entries)
    valid = tf.logical_and(tf.range(_EXIF_MAX_ENTRIES) < count, tf.equal(tags, 0x0112))
    has_tag = tf.reduce_any(valid)
    entry = tf.gather(entries, tf.cast(tf.argmax(tf.cast(valid, tf.int32)), tf.int32))
    value = u16(entry + 8)
    ok = tf.logical_and(tf.logical_and(is_jpeg, found), tf.logical_and(has_tag, (value >= 1) & (value <= 8)))
    return tf.where(ok, value, 1)


def apply_orientation(image, orientation):
    """Rotate/flip a [H, W, 3] image so that it stands as EXIF ``orientation`` says (as PIL's exif_transpose)."""
    import tensorflow as tf

    def transpose(x):
        return tf.transpose(x, [1, 0, 2])

    branches = [
        lambda: image,                                               # 1 (and anything unknown)
        lambda: image,                                               # 1
        lambda: tf.image.flip_left_right(image),                     # 2
        lambda: tf.image.rot90(image, 2),                            # 3
        lambda: tf.image.flip_up_down(image),                        # 4
        lambda: transpose(image),                                    # 5
        lambda: tf.image.rot90(image, 3),                            # 6: 90 degrees clockwise
        lambda: tf.image.rot90(transpose(image), 2),                 # 7
        lambda: tf.image.rot90(image, 1),                            # 8: 90 degrees counter-clockwise
    ]
    out = tf.switch_case(tf.clip_by_value(tf.cast(orientation, tf.int32), 0, 8), branches)
    out.set_shape([None, None, 3])
    return out


# A BMP file: "BM", then little-endian fields at fixed offsets (below); the palette (B, G, R, 0 per entry)
# follows the DIB header. Read by the graph (``_through_bmp_palette``) and by the header probe alike.
_BMP_HEADER_BYTES = 54
_BMP_FIELDS = {"header_size": (14, 4), "bits": (28, 2), "compression": (30, 4), "colours": (46, 4)}  # 0 colours: 2**bits


def _bmp_field(head, name: str):
    """A BMP header field by name, from the header's bytes (Python ``bytes`` or an int32 tensor of them)."""
    offset, width = _BMP_FIELDS[name]
    value = head[offset]
    for k in range(1, width):
        value = value + head[offset + k] * (256 ** k)
    return value


def _through_bmp_palette(data, image):
    """An 8-bit BMP stores palette indices, and TensorFlow's decoder returns them as grey levels: look them up
    in the file's palette. Any other image comes back as it is. (A grey 8-bit BMP's palette maps each index to
    its own grey, so it decodes as before.)"""
    import tensorflow as tf

    def if_8_bit():  # a BMP (its pixels decoded, so its header is whole)
        head = tf.cast(tf.io.decode_raw(tf.strings.substr(data, 0, _BMP_HEADER_BYTES), tf.uint8), tf.int32)

        def lookup():
            colours = _bmp_field(head, "colours")
            colours = tf.where(colours == 0, 256, colours)
            entries = tf.io.decode_raw(tf.strings.substr(data, 14 + _bmp_field(head, "header_size"), 4 * colours),
                                       tf.uint8)
            palette = tf.reverse(tf.reshape(entries, [-1, 4])[:, :3], axis=[1])  # BGR0 -> RGB
            return tf.gather(palette, tf.cast(image[..., 0], tf.int32))  # an index past the palette: InvalidArgument

        return tf.cond(_bmp_field(head, "bits") == 8, lookup, lambda: image)

    # One string comparison for the photos the server gets (JPEG, PNG): the BMP branch is not run for them.
    return tf.cond(tf.equal(tf.strings.substr(data, 0, 2), "BM"), if_8_bit, lambda: image)


def decode_image(data):
    """Decode JPEG/PNG/GIF/BMP/WebP bytes into uint8 RGB [H, W, 3], EXIF orientation applied.

    Grayscale, CMYK and RGBA become RGB; 8-bit BMPs go through their palette; for animated images the first
    frame is used (animated WebP does not decode: ``probe_image`` refuses it); a PNG named .jpg decodes by its
    content. Malformed or truncated data raises tf.errors.InvalidArgumentError.
    """
    import tensorflow as tf

    image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    image = _through_bmp_palette(data, image)
    image.set_shape([None, None, 3])
    return apply_orientation(image, _exif_orientation(data))


@functools.cache
def traced_decode():
    """``decode_image`` traced once per process as a graph for one photo's bytes: the same ops and pixels as
    eagerly, about 5x faster (eagerly each of its ops is dispatched from Python, photo after photo)."""
    import tensorflow as tf

    return tf.function(decode_image, input_signature=[tf.TensorSpec([], tf.string)])


def decode_checked(data, what: str = "", traced: bool = True):
    """``decode_image`` of photo bytes, with bytes that do not decode refused as InvalidInput: "<what> does not
    decode (truncated or corrupt): <TensorFlow's reason, one line>". Run as ``traced_decode()``, or eagerly with
    ``traced=False`` where only a photo or two are decoded (the process's first trace takes a second or more)."""
    import tensorflow as tf

    try:
        return (traced_decode() if traced else decode_image)(tf.constant(data))
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as exc:
        prefix = f"{what} " if what else ""
        raise InvalidInput(f"{prefix}does not decode (truncated or corrupt): "
                           f"{runtime_message(exc.message)[:160]}") from None


#: The order in which a photo file stores its colour channels. ``bgr`` is a data set saved with red and blue
#: swapped (an OpenCV array written as if it were RGB): its photos are turned back to RGB when read, so that a
#: model learns true colours, the ones every real photo sent to the server has.
CHANNEL_ORDERS = ("rgb", "bgr")


def check_channel_order(channel_order: str) -> str:
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"unknown channel order {channel_order!r}; expected one of {list(CHANNEL_ORDERS)}")
    return channel_order


def to_rgb(image, channel_order: str = "rgb"):
    """A decoded uint8 [..., 3] image (or batch) in RGB order, given the order its file stored it in."""
    return image[..., ::-1] if check_channel_order(channel_order) == "bgr" else image


def rgb_encoded(data: bytes, channel_order: str) -> bytes:
    """Photo bytes whose pixels are in RGB order, for consumers that take encoded photos (a served model, the
    ensemble): ``rgb`` bytes are returned as they are; ``bgr`` ones are decoded (EXIF orientation applied),
    turned to RGB and re-encoded as PNG, which is lossless, so the pixels are exactly ``to_rgb`` of the decode."""
    if check_channel_order(channel_order) == "rgb":
        return data
    import tensorflow as tf

    return tf.io.encode_png(to_rgb(decode_image(tf.constant(data)), channel_order)).numpy()


#: How a photo becomes a model input of a given size: ``squash`` stretches it to that size (aspect ratio lost
#: unless the photo has the input's shape); ``letterbox`` scales it to fit inside and pads the rest with black,
#: centred.
RESIZE_MODES = ("squash", "letterbox")


def check_resize(resize: str) -> str:
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}; expected one of {list(RESIZE_MODES)}")
    return resize


def prepare(image, size: Size, resize: str = "squash"):
    """Resize a uint8 [H, W, 3] image (or a batch [B, H, W, 3]) to uint8 [height, width, 3] of ``size`` (one
    side for a square, or (height, width)): bilinear with antialiasing, rounded; with ``resize="letterbox"``
    the aspect ratio is kept and the borders are black.

    This is the one resize of the product: training, evaluation, TTA views and serving all use it.
    """
    import tensorflow as tf

    check_resize(resize)
    size = side_pair(size)
    image = tf.cast(image, tf.float32)
    if resize == "squash":
        resized = tf.image.resize(image, size, method="bilinear", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)
    shape = tf.cast(tf.shape(image)[-3:-1], tf.float32)
    target = tf.constant(size, tf.float32)
    scale = tf.reduce_min(target / shape)
    inner = tf.clip_by_value(tf.cast(tf.round(shape * scale), tf.int32), 1, tf.constant(size, tf.int32))
    resized = tf.image.resize(image, inner, method="bilinear", antialias=True)
    resized = tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)
    offset = (tf.constant(size, tf.int32) - inner) // 2
    out = tf.image.pad_to_bounding_box(resized, offset[0], offset[1], size[0], size[1])
    return tf.ensure_shape(out, image.shape[:-3].concatenate([size[0], size[1], 3]))


def crop_fraction(image, box):
    """Crop a [H, W, 3] image to ``box`` = (top, left, bottom, right) given as fractions of its size."""
    import tensorflow as tf

    top, left, bottom, right = box
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    y0 = tf.cast(tf.round(top * h), tf.int32)
    x0 = tf.cast(tf.round(left * w), tf.int32)
    y1 = tf.maximum(tf.cast(tf.round(bottom * h), tf.int32), y0 + 1)
    x1 = tf.maximum(tf.cast(tf.round(right * w), tf.int32), x0 + 1)
    return image[y0:y1, x0:x1, :]


# ---------------------------------------------------------------------------------------------
# Which files of a folder are photos
# ---------------------------------------------------------------------------------------------

#: The file name endings read as photos when a folder is given (case does not matter).
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def is_photo_file(path) -> bool:
    """A file with a photo's ending and not hidden: macOS's ``._name.jpg`` companions and other dot-files, which
    archives carry along, are not photos."""
    return path.suffix.lower() in PHOTO_SUFFIXES and not path.name.startswith(".") and path.is_file()


def photo_files(folder: Path) -> tuple[list[Path], list[str]]:
    """A folder's photo files sorted by name, and the names of its other files (hidden ones and folders aside):
    a command that leaves them out of a submission says so (``left_out``)."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    photos = [p for p in entries if is_photo_file(p)]
    chosen = {p.name for p in photos}
    return photos, [p.name for p in entries if p.name not in chosen and not p.is_dir()]


def no_photos(folder: str | os.PathLike, what: str = "photo folder") -> str:
    """The message for a folder without photo files; when it holds one folder that has them (an archive unpacked
    into a folder of its own name, as Kaggle's test_upload/test_upload/), the message names that one."""
    root = Path(folder)
    message = f"{what} {str(folder)!r} has no photos ({', '.join(PHOTO_SUFFIXES)})"
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
    if len(folders) == 1 and any(is_photo_file(p) for p in folders[0].iterdir()):
        message += f"; its folder {folders[0].name!r} has them: pass {str(Path(folder) / folders[0].name)!r}"
    return message


def left_out(folder: str | os.PathLike, names: list[str]) -> str:
    """The line that names a folder's files that are not photos (a submission has no row for them)."""
    shown = ", ".join(repr(name) for name in names[:3]) + (", ..." if len(names) > 3 else "")
    these = "1 file is not a readable photo file and is" if len(names) == 1 else \
        f"{len(names)} files are not readable photo files and are"
    return f"{folder}: {these} left out ({shown}); photos are {', '.join(PHOTO_SUFFIXES)} files"


# ---------------------------------------------------------------------------------------------
# Header probing in Python: refuse bad uploads before decoding
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    mode: str
    frames: int


def probe_image(
    data: bytes,
    *,
    max_bytes: int = contract.MAX_IMAGE_BYTES,
    max_pixels: int = contract.MAX_IMAGE_PIXELS,
    min_side: int = contract.MIN_IMAGE_SIDE,
) -> ImageInfo:
    """Read an image's header only and check it against the limits; raise InvalidInput naming the problem."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidInput(f"image must be bytes, received {type(data).__name__}")
    size = len(data)
    if size == 0:
        raise InvalidInput("image is empty (0 bytes)")
    if size > max_bytes:
        raise InvalidInput(f"image is {size} bytes, larger than the limit of {max_bytes} bytes")
    frame = _jpeg_frame(data)
    if frame is not None:  # most uploads: their header walked in a few microseconds, without PIL
        width, height, mode = frame
        return _checked(ImageInfo("JPEG", width, height, mode, 1), max_pixels, min_side)
    try:
        with Image.open(io.BytesIO(bytes(data))) as img:  # lazy: reads the header, decodes no pixel
            width, height = img.size
            fmt = img.format or "unknown"
            mode = img.mode
            frames = int(getattr(img, "n_frames", 1))
    except UnidentifiedImageError:
        raise InvalidInput(f"data is not a recognised image ({size} bytes; first bytes {bytes(data[:8])!r})") from None
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"image declares too many pixels to decode safely: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidInput(f"image header is malformed: {exc}") from None
    if fmt not in ("JPEG", "PNG", "GIF", "BMP", "WEBP", "MPO"):
        raise InvalidInput(f"image format {fmt} is not supported; send JPEG, PNG, GIF, BMP or WebP")
    if fmt == "BMP":
        _check_bmp_variant(data)
    if fmt == "WEBP" and frames > 1:
        raise InvalidInput(f"animated WebP ({frames} frames) is not supported; send one frame as JPEG, PNG or "
                           "still WebP")
    return _checked(ImageInfo(format=fmt, width=width, height=height, mode=mode, frames=frames), max_pixels,
                    min_side)


def _check_bmp_variant(data) -> None:
    """Refuse the BMP variants TensorFlow's decoder cannot read (it takes uncompressed 8-, 24- and 32-bit
    pixels after a Windows header of 40 bytes or more) before they fail as if they were damaged."""
    head = bytes(data[:_BMP_HEADER_BYTES]).ljust(_BMP_HEADER_BYTES, b"\0")
    header_size, bits, compression = (_bmp_field(head, name) for name in ("header_size", "bits", "compression"))
    if header_size < 40:
        raise InvalidInput(f"BMP with a {header_size}-byte (OS/2) header is not supported; send JPEG or PNG, or a "
                           "Windows BMP")
    if bits not in (8, 24, 32):
        raise InvalidInput(f"BMP with {bits} bit(s) per pixel is not supported; send JPEG or PNG, or an 8-, 24- or "
                           "32-bit BMP")
    if compression not in (0, 3):  # BI_RGB, BI_BITFIELDS; not RLE or embedded JPEG/PNG
        raise InvalidInput(f"compressed BMP (compression {compression}) is not supported; send JPEG or PNG, or an "
                           "uncompressed BMP")


def _checked(info: ImageInfo, max_pixels: int, min_side: int) -> ImageInfo:
    width, height = info.width, info.height
    if width * height > max_pixels:
        raise InvalidInput(
            f"image declares {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}; "
            "refused before decoding"
        )
    if min(width, height) < min_side:
        raise InvalidInput(f"image is {width}x{height}, smaller than {min_side} px on a side")
    return info


def _segment_reads_like_pil(data, marker: int, start: int, stop: int) -> bool:
    """False for the header segments PIL's JPEG reader refuses: quantization tables that do not fill their
    segment exactly, JFIF and Adobe segments too short for their version field."""
    if marker == 0xDB:
        while start < stop:
            start += 1 + (64 if data[start] >> 4 == 0 else 128)
        return start == stop
    if (marker == 0xE0 and data[start:start + 4] == b"JFIF") or (marker == 0xEE and data[start:start + 5] == b"Adobe"):
        return stop - start >= 7
    return True


# Start-of-frame markers (SOF0-SOF15 less DHT, JPG and DAC), JPEG's 8-bit colour modes as PIL names them.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}


def _jpeg_frame(data) -> tuple[int, int, str] | None:
    """(width, height, mode) of a plain 8-bit JPEG, from walking its header segments up to the start of scan.

    None for anything else (another format, a multi-picture MPO, fill bytes, a segment cut short or not of
    the header kinds, no or two frame headers, an unusual bit depth or component count): ``probe_image``
    then asks PIL, which names the problem. So this never refuses a file, and reads only headers that PIL
    reads the same way.
    """
    if data[:3] != b"\xff\xd8\xff":
        return None
    frame = None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2 or pos + 2 + length > end:
            return None  # a segment runs past the end of the data
        if marker == 0xDA:  # start of scan: the header is complete
            return frame
        if marker in _SOF_MARKERS:
            if frame is not None or length < 8:
                return None
            bits, components = data[pos + 4], data[pos + 9]
            if bits != 8 or components not in _JPEG_MODES:
                return None
            height = (data[pos + 5] << 8) | data[pos + 6]
            width = (data[pos + 7] << 8) | data[pos + 8]
            frame = (width, height, _JPEG_MODES[components])
        elif not (0xE0 <= marker <= 0xFE or marker in (0xC4, 0xDB, 0xDD)):
            return None  # restart, fill or unknown markers: leave it to PIL
        elif marker == 0xE2 and data[pos + 4:pos + 8] == b"MPF\x00":
            return None  # a multi-picture file: PIL reports it as MPO with its frame count
        elif not _segment_reads_like_pil(data, marker, pos + 4, pos + 2 + length):
            return None
        pos += 2 + length
    return None
