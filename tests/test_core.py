"""Core: the backbone registry, image decoding with EXIF orientation, TTA policies, header probing."""

from __future__ import annotations

import io
import re
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from carclf import backbones, imaging, tta
from carclf.errors import ConfigError, InvalidInput
from tests.reliability import images


def _jpeg(array: np.ndarray, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=95, **save_kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_decode_applies_exif_orientation_like_pil(orientation):
    import tensorflow as tf

    base = (np.arange(30 * 50 * 3) % 251).astype(np.uint8).reshape(30, 50, 3)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg(base, exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    plain = imaging.decode_image(tf.constant(_jpeg(base))).numpy()
    got = imaging.decode_image(tf.constant(data)).numpy()
    assert got.shape == expected.shape
    # Same orientation as PIL: the oriented image is closer to PIL's than any other orientation is.
    diffs = {o: np.abs(imaging.apply_orientation(tf.constant(plain), o).numpy().astype(int) - expected).mean()
             for o in range(1, 9)
             if imaging.apply_orientation(tf.constant(plain), o).shape == expected.shape}
    assert min(diffs, key=diffs.get) == orientation or diffs[orientation] == min(diffs.values())


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P"])
def test_decode_converts_modes_to_rgb(mode):
    import tensorflow as tf

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "PNG" if mode in ("RGBA", "P") else "JPEG")
    assert imaging.decode_image(tf.constant(buf.getvalue())).numpy().shape == (20, 24, 3)


@pytest.mark.parametrize("mode,colours", [("P", 256), ("P", 16), ("L", None)])
def test_an_8_bit_bmp_decodes_through_its_palette(mode, colours):
    """TensorFlow's BMP decoder returns an 8-bit BMP's palette indices as grey; decode_image (eager and traced,
    as in the SavedModel) gives PIL's colours. A grey BMP, whose palette is the identity, stays as it was."""
    import tensorflow as tf

    photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (18, 26, 3), dtype=np.uint8))
    image = photo.convert("P", palette=Image.ADAPTIVE, colors=colours) if mode == "P" else photo.convert("L")
    buf = io.BytesIO()
    image.save(buf, "BMP")
    data = buf.getvalue()
    assert data[28] == 8  # bits per pixel
    imaging.probe_image(data, min_side=1)
    expected = np.asarray(image.convert("RGB"))
    traced = tf.function(imaging.decode_image, input_signature=[tf.TensorSpec([], tf.string)])
    np.testing.assert_array_equal(imaging.decode_image(tf.constant(data)).numpy(), expected)
    np.testing.assert_array_equal(traced(tf.constant(data)).numpy(), expected)
    short = bytearray(data)  # a palette shorter than the indices used: refused, not read past its end
    short[46:50] = (2).to_bytes(4, "little")
    with pytest.raises(InvalidInput, match="does not decode"):
        imaging.decode_checked(bytes(short), "photo")


def test_probe_names_the_image_variants_tensorflow_cannot_decode():
    """Variants TensorFlow's decoders refuse (or would misread) are refused by the header probe as not
    supported, not left to fail as if the file were damaged; their plain siblings pass."""
    photo = Image.fromarray(np.random.default_rng(2).integers(0, 255, (20, 24, 3), dtype=np.uint8))

    def encoded(image, fmt, **options):
        buf = io.BytesIO()
        image.save(buf, fmt, **options)
        return buf.getvalue()

    refused = {
        "BMP with 1 bit(s) per pixel is not supported": encoded(photo.convert("1"), "BMP"),
        "animated WebP (3 frames) is not supported": encoded(photo, "WEBP", save_all=True,
                                                             append_images=[photo.rotate(90), photo.rotate(180)]),
    }
    rle = bytearray(encoded(photo.convert("P"), "BMP"))
    rle[30:34] = (1).to_bytes(4, "little")  # RLE8
    refused["compressed BMP (compression 1) is not supported"] = bytes(rle)
    for needle, data in refused.items():
        with pytest.raises(InvalidInput, match=re.escape(needle)):
            imaging.probe_image(data)
    for data in (encoded(photo, "BMP"), encoded(photo.convert("RGBA"), "BMP"), encoded(photo, "WEBP")):
        assert imaging.probe_image(data).width == 24


def test_a_bitfields_bmp_with_alpha_probes_and_decodes_to_its_pixels():
    """A 32-bit BMP whose header declares its colour masks (BI_BITFIELDS, what Windows writes for pictures with
    alpha) is a supported BMP: it passes the probe and decodes to its RGB pixels."""
    import struct

    import tensorflow as tf

    rgb = np.random.default_rng(4).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    height, width = rgb.shape[:2]
    bgra = np.concatenate([rgb[..., ::-1], np.full((height, width, 1), 255, np.uint8)], axis=2)
    pixels = bgra[::-1].tobytes()  # rows bottom-up
    info = struct.pack("<IiiHHIIiiII", 108, width, height, 1, 32, 3, len(pixels), 2835, 2835, 0, 0)  # BITMAPV4
    info += struct.pack("<IIII", 0x00FF0000, 0x0000FF00, 0x000000FF, 0xFF000000) + b"BGRs" + bytes(48)
    data = b"BM" + struct.pack("<IHHI", 14 + len(info) + len(pixels), 0, 0, 14 + len(info)) + info + pixels
    assert data[30] == 3  # compression: BI_BITFIELDS
    probed = imaging.probe_image(data)
    assert (probed.format, probed.width, probed.height) == ("BMP", width, height)
    np.testing.assert_array_equal(imaging.decode_checked(data).numpy(), rgb)
    np.testing.assert_array_equal(imaging.decode_image(tf.constant(data)).numpy(),
                                  np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_a_multi_picture_jpeg_is_a_photo_read_by_its_first_picture():
    """Cameras and phones save MPO files (a JPEG followed by more pictures, such as a depth or stereo view): the
    probe accepts them and the first picture is the one decoded."""
    y, x = np.mgrid[0:40, 0:56]
    rgb = np.stack([x * 4, y * 6, 255 - x * 4], axis=-1).astype(np.uint8)  # smooth: little JPEG noise
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "MPO", save_all=True, append_images=[Image.fromarray(255 - rgb)])
    probed = imaging.probe_image(buf.getvalue())
    assert (probed.format, probed.width, probed.height, probed.frames) == ("MPO", 56, 40, 2)
    pixels = imaging.decode_checked(buf.getvalue()).numpy().astype(int)
    assert pixels.shape == (40, 56, 3)
    assert np.abs(pixels - rgb).mean() < 4  # the first picture, up to JPEG noise
    assert np.abs(pixels - (255 - rgb)).mean() > 30  # not the second


def test_the_probe_limits_are_inclusive():
    """An image exactly at a limit (as many bytes as allowed, a side as short as allowed) is accepted; one byte or
    one pixel past it is refused, naming the limit."""
    from carclf import contract

    side = contract.MIN_IMAGE_SIDE
    at_limit = _jpeg(np.full((side, side + 5, 3), 128, np.uint8))
    assert (imaging.probe_image(at_limit).height, imaging.probe_image(at_limit, max_bytes=len(at_limit)).width) == \
        (side, side + 5)
    with pytest.raises(InvalidInput, match=f"larger than the limit of {len(at_limit) - 1} bytes"):
        imaging.probe_image(at_limit, max_bytes=len(at_limit) - 1)
    with pytest.raises(InvalidInput, match=f"smaller than {side + 1} px on a side"):
        imaging.probe_image(at_limit, min_side=side + 1)


def test_an_animated_webp_of_two_frames_is_refused_as_animated():
    """Any animated WebP (TensorFlow cannot decode one), the shortest of two frames too, is refused by the probe as
    not supported, not left to fail later as a damaged file."""
    photo = Image.fromarray(np.random.default_rng(6).integers(0, 255, (20, 24, 3), dtype=np.uint8))
    buf = io.BytesIO()
    photo.save(buf, "WEBP", save_all=True, append_images=[photo.rotate(180)])
    with pytest.raises(InvalidInput, match=re.escape("animated WebP (2 frames) is not supported")):
        imaging.probe_image(buf.getvalue(), min_side=1)


def test_png_named_jpg_decodes_by_content(tmp_path):
    import tensorflow as tf

    path = tmp_path / "photo.jpg"
    Image.new("RGB", (16, 12), (200, 10, 10)).save(path, "PNG")
    pixels = imaging.decode_image(tf.constant(path.read_bytes())).numpy()
    assert pixels.shape == (12, 16, 3) and tuple(pixels[0, 0]) == (200, 10, 10)


@pytest.mark.parametrize("traced", [True, False])
def test_decode_checked_names_the_photo_that_does_not_decode(traced):
    """One refusal for every caller (server, ensemble, submit, data scan), traced or eager (the server's error
    path): InvalidInput naming the photo and TensorFlow's reason in one line, the same line both ways; a good
    photo gives the same pixels as decode_image."""
    import tensorflow as tf

    photo = _jpeg((np.arange(40 * 60 * 3) % 253).astype(np.uint8).reshape(40, 60, 3))
    assert np.array_equal(imaging.decode_checked(photo, "a.jpg", traced=traced).numpy(),
                          imaging.decode_image(tf.constant(photo)).numpy())
    for bad in (photo[: len(photo) // 2], b"plain text, not a photo"):
        with pytest.raises(InvalidInput) as refused:
            imaging.decode_checked(bad, "photo 3", traced=traced)
        message = refused.value.message
        assert message.startswith("photo 3 does not decode (truncated or corrupt): ") and "\n" not in message
        reason = message.split(": ", 1)[1]
        assert reason and "function_node" not in reason and "/device:" not in reason
        assert not reason.rstrip().endswith("name:"), reason
        with pytest.raises(InvalidInput) as other_way:
            imaging.decode_checked(bad, "photo 3", traced=not traced)
        assert other_way.value.message == message
    with pytest.raises(InvalidInput, match=r"^does not decode"):
        imaging.decode_checked(photo[:100], traced=traced)


def test_probe_refuses_bomb_before_decoding():
    img = Image.new("L", (1, 1))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = (100_000).to_bytes(4, "big") + (100_000).to_bytes(4, "big")  # IHDR width, height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # keep the header's CRC valid
    with pytest.raises(InvalidInput, match="pixels"):
        imaging.probe_image(bytes(data))


def _pil_probe(data: bytes, monkeypatch) -> imaging.ImageInfo | str:
    """What probe_image says when every file goes through PIL (the JPEG fast path turned off)."""
    with monkeypatch.context() as m:
        m.setattr(imaging, "_jpeg_frame", lambda data: None)
        try:
            return imaging.probe_image(data)
        except InvalidInput as exc:
            return exc.message


def _jpeg_variants() -> dict[str, bytes]:
    rgb = np.random.default_rng(3).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    variants = {"rgb": _jpeg(rgb), "progressive": _jpeg(rgb, progressive=True), "exif": _jpeg(rgb, exif=exif.tobytes()),
                "icc": _jpeg(rgb, icc_profile=b"\0" * 3000)}
    for mode in ("L", "CMYK"):
        buf = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(buf, "JPEG")
        variants[mode] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "MPO", save_all=True, append_images=[Image.fromarray(rgb[::-1])])
    variants["mpo"] = buf.getvalue()
    bad_table = bytearray(variants["rgb"])
    dqt = bad_table.index(b"\xff\xdb")
    bad_table[dqt + 4] |= 0x10  # declares a 16-bit table, which the segment is too short to hold
    variants["bad_quantization_table"] = bytes(bad_table)
    return variants


def test_jpeg_fast_path_says_what_pil_says(photos, monkeypatch):
    """The header walk that spares served requests PIL gives the same ImageInfo or the same refusal as PIL, on
    real photos, on JPEG variants, and on JPEGs cut inside their header."""
    cases = {p.name: p.read_bytes() for p in photos[:10]} | _jpeg_variants()
    fast_read = 0
    for name, data in cases.items():
        fast_read += imaging._jpeg_frame(data) is not None
        for cut in (None, 3, 20, 100, 160, 400):  # whole, then cut inside APP0, DQT, the frame header, DHT...
            try:
                got = imaging.probe_image(data[:cut])
            except InvalidInput as exc:
                got = exc.message
            assert got == _pil_probe(data[:cut], monkeypatch), (name, cut)
    assert fast_read >= len(cases) - 2  # everything but the MPO and the broken table skipped PIL
    assert imaging._jpeg_frame(_jpeg_variants()["mpo"]) is None


def test_probe_refuses_a_jpeg_bomb_from_its_frame_header():
    data = bytearray(_jpeg(np.zeros((16, 16, 3), np.uint8)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (60_000).to_bytes(2, "big") + (60_000).to_bytes(2, "big")  # height, width
    assert imaging._jpeg_frame(bytes(data)) == (60_000, 60_000, "RGB")
    with pytest.raises(InvalidInput, match="60000x60000 = 3600000000 pixels.*refused before decoding"):
        imaging.probe_image(bytes(data))


@pytest.mark.parametrize("data,needle", [(b"", "empty"), (b"hello world, not an image", "not a recognised image")])
def test_probe_rejects_non_images(data, needle):
    with pytest.raises(InvalidInput, match=needle):
        imaging.probe_image(data)


def test_tta_none_is_exactly_prepare(photos):
    import tensorflow as tf

    image = imaging.decode_image(tf.constant(photos[0].read_bytes()))
    views = tta.make_views(image, "none", 64).numpy()
    np.testing.assert_array_equal(views[0], imaging.prepare(image, 64).numpy())
    flips = tta.make_views(image, "hflip", 64).numpy()
    np.testing.assert_array_equal(flips[1], flips[0][:, ::-1])


def _photo_kinds(photo: bytes) -> dict[str, bytes]:
    """A real photo in each form the decoder handles differently: EXIF orientations, modes, containers (the
    reliability suite's upload builders, plus an 8-bit BMP)."""
    rgb = images.rgb_pixels(photo)
    kinds = {}
    for orientation in (3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        kinds[f"jpeg, EXIF orientation {orientation}"] = _jpeg(rgb, exif=exif.tobytes())
    for build in (images.grayscale_jpeg, images.cmyk_jpeg, images.rgba_png, images.animated_gif, images.webp):
        kinds[build.__name__] = build(photo)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("P").save(buf, "BMP")
    kinds["8-bit BMP"] = buf.getvalue()
    return kinds


def test_traced_decode_gives_decode_images_pixels_and_is_traced_once(photos):
    """``decode_checked`` (every offline caller: submit's check, evaluation, the data scan, the ensemble)
    runs the process's one traced decoder; it must give exactly the eager decoder's pixels."""
    import tensorflow as tf

    assert imaging.traced_decode() is imaging.traced_decode()
    cases = {**_photo_kinds(photos[0].read_bytes()), **{p.name: p.read_bytes() for p in photos[:4]}}
    for name, data in cases.items():
        eager = imaging.decode_image(tf.constant(data)).numpy()
        np.testing.assert_array_equal(imaging.traced_decode()(tf.constant(data)).numpy(), eager, err_msg=name)
        np.testing.assert_array_equal(imaging.decode_checked(data, name).numpy(), eager, err_msg=name)
    assert imaging.traced_decode().experimental_get_tracing_count() == 1


@pytest.mark.parametrize("policy", ["none", "hflip", "hflip_crops"])
@pytest.mark.parametrize("size,resize", [(64, "squash"), ((48, 96), "squash"), ((48, 96), "letterbox")])
@pytest.mark.parametrize("channel_order", ["rgb", "bgr"])
def test_traced_views_are_make_views_of_the_photo_in_rgb(photos, policy, size, resize, channel_order):
    """The graph evaluation and the ensemble run per photo gives the eager ``make_views`` pixels, after the
    photo is read in its file's channel order."""
    import tensorflow as tf

    views_of = tta.traced_views(policy, size, resize, channel_order)
    assert tta.traced_views(tta.get_policy(policy), size, resize, channel_order) is views_of  # traced once a process
    for path in photos[:3]:
        image = imaging.decode_image(tf.constant(path.read_bytes()))
        eager = tta.make_views(imaging.to_rgb(image, channel_order), policy, size, resize).numpy()
        got = views_of(image).numpy()
        assert got.shape == eager.shape == (len(tta.get_policy(policy).views), *imaging.side_pair(size), 3)
        np.testing.assert_array_equal(got, eager)
    assert views_of.experimental_get_tracing_count() == 1
    if isinstance(size, int):  # one side and its (side, side) pair are the same size
        assert tta.traced_views(policy, (size, size), resize, channel_order) is views_of


def test_traced_views_refuse_an_unknown_channel_order_resize_or_policy():
    with pytest.raises(ValueError, match="unknown channel order 'rbg'"):
        tta.traced_views("hflip", 64, "squash", "rbg")
    with pytest.raises(ValueError, match="unknown resize mode 'crop'"):
        tta.traced_views("hflip", 64, "crop")
    with pytest.raises(ConfigError, match="unknown TTA policy 'flip'"):
        tta.traced_views("flip", 64)


def test_tta_policy_round_trips_as_data():
    policy = tta.get_policy("hflip_crops")
    assert tta.get_policy(policy.to_dict()) == policy
    with pytest.raises(ConfigError, match="box"):
        tta.View("bad", box=(0.5, 0.0, 0.2, 1.0))
    for empty in ((0.5, 0.0, 0.5, 1.0), (0.0, 0.3, 1.0, 0.3)):  # no rows, or no columns: nothing to look at
        with pytest.raises(ConfigError, match="box"):
            tta.View("empty", box=empty)
    with pytest.raises(ConfigError, match="unknown TTA policy 'nope'"):
        tta.get_policy("nope")


def test_registry_has_the_required_backbones():
    names = backbones.names()
    for required in ["xception", "mobilenet_v2", *(f"efficientnet_b{i}" for i in range(8)),
                     *(f"efficientnet_b{i}_ns" for i in range(8))]:
        assert required in names
    with pytest.raises(ConfigError, match="unknown backbone 'resnet9000'"):
        backbones.get("resnet9000")
    with pytest.raises(ConfigError, match="weights"):
        backbones.resolve_weights(backbones.get("xception"), "/no/such/file.h5")


def test_a_backbone_keras_refuses_to_build_is_a_clear_error_naming_it_and_the_size():
    """Keras's ValueError (Xception below 71 px) becomes the product's InvalidInput, which a training run treats
    as bad input (no half-made run folder left behind) instead of a traceback."""
    spec = backbones.get("xception")
    assert spec.min_input_size == 71
    with pytest.raises(InvalidInput, match=r"backbone 'xception' cannot be built at 48x64 px: ValueError: .*71"):
        spec.build(input_size=(48, 64), weights=None)


def test_letterbox_keeps_the_aspect_ratio_and_pads_black():
    import tensorflow as tf

    wide = np.full((50, 200, 3), 200, np.uint8)  # 4:1, one colour
    out = imaging.prepare(tf.constant(wide), 64, "letterbox").numpy()
    assert out.shape == (64, 64, 3)
    rows = np.flatnonzero(out[:, 32, 0])  # the photo's band, centred
    assert (rows.min(), rows.max() + 1) == (24, 40)  # 64 * 50 / 200 = 16 rows
    assert (out[rows] == 200).all() and not out[:24].any() and not out[40:].any()
    tall = imaging.prepare(tf.constant(wide.transpose(1, 0, 2)), 64, "letterbox").numpy()
    np.testing.assert_array_equal(tall, out.transpose(1, 0, 2))


def test_letterbox_of_a_batch_equals_each_photo_and_squash_is_unchanged(photos):
    import tensorflow as tf

    image = imaging.decode_image(tf.constant(photos[0].read_bytes()))
    single = imaging.prepare(image, 48, "letterbox")
    batch = imaging.prepare(tf.stack([image, image]), 48, "letterbox")
    assert batch.shape == (2, 48, 48, 3)
    np.testing.assert_array_equal(batch.numpy(), np.stack([single.numpy()] * 2))
    np.testing.assert_array_equal(imaging.prepare(image, 48, "squash").numpy(), imaging.prepare(image, 48).numpy())
    views = tta.make_views(image, "hflip", 48, "letterbox").numpy()
    np.testing.assert_array_equal(views[0], single.numpy())
    with pytest.raises(ValueError, match="unknown resize mode 'stretch'"):
        imaging.prepare(image, 48, "stretch")


def test_squash_resize_is_antialiased_bilinear_rounded_to_the_nearest_value():
    """prepare's documented resize: bilinear with antialiasing, then rounded (not truncated). A 1-px checkerboard
    shrunk 4x is a flat grey only with antialiasing; its 127.5 greys round up."""
    import tensorflow as tf

    rows, cols = np.indices((64, 96))
    board = np.repeat((((rows + cols) % 2) * 255).astype(np.uint8)[..., None], 3, axis=2)
    noise = np.random.default_rng(5).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    for image in (board, noise):
        for size in (16, (16, 24), (40, 30)):
            reference = tf.image.resize(tf.cast(image, tf.float32), imaging.side_pair(size), method="bilinear",
                                        antialias=True)
            expected = np.clip(np.round(reference.numpy()), 0, 255).astype(np.uint8)
            np.testing.assert_array_equal(imaging.prepare(tf.constant(image), size).numpy(), expected)
    shrunk = imaging.prepare(tf.constant(board), (16, 24)).numpy()
    assert np.abs(shrunk.astype(int) - 128).max() <= 1  # no aliasing pattern


def _coordinate_image(height: int = 48, width: int = 96) -> np.ndarray:
    """R = row, G = column, B = 0: every pixel says where it is."""
    rows, cols = np.indices((height, width))
    return np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)


def test_crop_fraction_cuts_rows_by_the_height_and_columns_by_the_width():
    import tensorflow as tf

    image = _coordinate_image()
    for box in ((0.0, 0.5, 1.0, 1.0), (0.25, 0.125, 0.75, 0.5), (0.125, 0.0625, 1.0, 0.9375)):
        top, left, bottom, right = box
        crop = imaging.crop_fraction(tf.constant(image), box).numpy()
        expected = image[round(top * 48):round(bottom * 48), round(left * 96):round(right * 96)]
        np.testing.assert_array_equal(crop, expected)


def test_hflip_crops_views_are_the_named_crops_of_the_photo():
    """hflip_crops: the full photo, its centre and its four corners (each 87.5 % of each side, docs/RESULTS.md),
    each also flipped where declared; every view is prepare() of that crop."""
    import tensorflow as tf

    height, width, c = 48, 96, 0.875
    image = _coordinate_image(height, width)
    h, w = round(c * height), round(c * width)
    dy, dx = (height - h) // 2, (width - w) // 2
    crops = {
        "full": image, "center": image[dy:dy + h, dx:dx + w],
        "top_left": image[:h, :w], "top_right": image[:h, width - w:],
        "bottom_left": image[height - h:, :w], "bottom_right": image[height - h:, width - w:],
    }
    policy = tta.get_policy("hflip_crops")
    views = tta.make_views(tf.constant(image), policy, (24, 40)).numpy()
    names = [v.name for v in policy.views]
    assert sorted(names) == sorted([*crops, "full_flip", "center_flip"])
    for view, got in zip(policy.views, views, strict=True):
        expected = imaging.prepare(tf.constant(crops[view.name.removesuffix("_flip")]), (24, 40)).numpy()
        np.testing.assert_array_equal(got, expected[:, ::-1] if view.flip else expected, err_msg=view.name)
        assert view.flip == view.name.endswith("_flip")


def test_each_backbone_preprocesses_pixels_as_its_own_preprocess_input():
    """The registry's preprocessing for a backbone is what its Keras module's preprocess_input does (the
    noisy-student EfficientNets: the ``efficientnet`` package's, torch mode)."""
    import importlib

    pixels = np.random.default_rng(0).uniform(0, 255, (2, 5, 7, 3)).astype("float32")
    for spec in backbones.all_specs():
        if not spec.weight_sources:  # tiny_cnn: no pretrained weights, so no pixel convention to match
            continue
        module = spec.constructor.split(":")[0]
        if module == "keras.applications":  # keras.applications.MobileNetV2 lives in ...applications.mobilenet_v2
            module = spec.resolve_constructor().__module__
        expected = np.asarray(importlib.import_module(module).preprocess_input(pixels.copy()))
        got = np.asarray(backbones.preprocessing_layer(spec.preprocessing)(pixels))
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=spec.name)


def test_torch_preprocessing_divides_by_the_standard_deviation():
    """torch mode: (x / 255 - mean) / std with ImageNet's mean and std per channel."""
    pixels = np.random.default_rng(1).uniform(0, 255, (3, 4, 4, 3)).astype("float32")
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    got = np.asarray(backbones.preprocessing_layer("torch")(pixels))
    np.testing.assert_allclose(got, (pixels / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)


def test_a_file_that_cannot_hold_keras_weights_is_told_from_its_bytes(tmp_path):
    """HDF5's signature may sit at byte 0 or after a user block (512, 1024, 2048... bytes); .keras is a zip."""
    import zipfile

    import h5py

    signature = b"\x89HDF\r\n\x1a\n"
    with h5py.File(tmp_path / "real.h5", "w") as f:
        f.create_dataset("x", data=np.zeros(2))
    with h5py.File(tmp_path / "user_block.hdf5", "w", userblock_size=1024) as f:
        f.create_dataset("x", data=np.zeros(2))
    assert (tmp_path / "user_block.hdf5").read_bytes()[1024:1032] == signature
    (tmp_path / "mid.h5").write_bytes(b"\0" * 100 + signature + b"\0" * 900)  # not at a place HDF5 allows
    (tmp_path / "short.h5").write_bytes(signature[:5])
    (tmp_path / "text.weights.h5").write_text("weights")
    with zipfile.ZipFile(tmp_path / "model.keras", "w") as z:
        z.writestr("config.json", "{}")
    (tmp_path / "plain.keras").write_bytes(signature)
    (tmp_path / "sharded.weights.json").write_text("{}")  # a format judged by Keras alone
    problems = {p.name: backbones.weights_file_problem(str(p)) for p in tmp_path.iterdir()}
    assert problems == {
        "real.h5": None, "user_block.hdf5": None, "model.keras": None, "sharded.weights.json": None,
        "mid.h5": "an .h5 file must be HDF5; this one has no HDF5 signature",
        "short.h5": "an .h5 file must be HDF5; this one has no HDF5 signature",
        "text.weights.h5": "an .h5 file must be HDF5; this one has no HDF5 signature",
        "plain.keras": "a .keras file must be a zip archive; this one is not",
    }


def test_a_weights_file_that_cannot_be_opened_is_named_as_such_not_as_a_wrong_format(tmp_path, monkeypatch):
    """Root reads any file, so the refusal to open is simulated: the reason is the operating system's."""
    (tmp_path / "locked.keras").write_bytes(b"PK")
    (tmp_path / "locked.h5").write_bytes(b"\x89HDF\r\n\x1a\n")

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(backbones, "open", refuse, raising=False)
    for name in ("locked.keras", "locked.h5"):
        assert backbones.weights_file_problem(str(tmp_path / name)) == "it cannot be read (Permission denied)"


def test_a_weights_path_under_the_home_folder_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "mine.h5").write_bytes(b"not read here")
    spec = backbones.get("mobilenet_v2")
    assert backbones.resolve_weights(spec, "~/weights/mine.h5") == str(tmp_path / "weights" / "mine.h5")


def test_tf_threads_are_set_before_tensorflow_runs_and_refused_after():
    """carclf.tf_threads.configure in a new process: the counts asked for are in place; once TensorFlow runs,
    the same counts are accepted and other ones are reported as refused, not silently dropped."""
    import subprocess
    import sys

    program = """
import tensorflow as tf
from carclf import tf_threads
assert tf_threads.configure(1, 2) == []
print(tf.config.threading.get_intra_op_parallelism_threads(), tf.config.threading.get_inter_op_parallelism_threads())
float(tf.reduce_sum(tf.ones(3)))
print(tf_threads.configure(1, 2), tf_threads.configure(3, 0), tf_threads.configure(0, 5))
try:
    tf_threads.configure(-1, 0)
except ValueError as exc:
    print(exc)
"""
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["1 2", "[] ['intra_op'] ['inter_op']",
                                          "intra_op threads must be >= 0, received -1"]
    from carclf import tf_threads

    assert tf_threads.describe(1, 0) == "intra-op 1, inter-op TensorFlow's default"


def test_a_model_card_without_resize_reads_as_squash(tmp_path):
    """Cards written before they recorded ``resize`` come from models trained on squashed photos: such a card
    reads as squash wherever it is read (an ensemble member, the bench's in-process side); a recorded mode wins."""
    import json

    from carclf import contract
    from carclf.ensemble.config import Member
    from carclf.ensemble.members import info_from_card
    from carclf.loadtest.inprocess import input_spec

    old = {"backbone": "mobilenet_v2", "input_size": 224}
    assert contract.card_resize(old) == "squash"
    assert info_from_card(old, Member(name="old"), "its card").resize == "squash"
    (tmp_path / "assets.extra").mkdir()
    (tmp_path / "assets.extra" / contract.MODEL_CARD).write_text(json.dumps(old))
    assert input_spec(tmp_path) == (224, "squash")
    assert info_from_card({**old, "resize": "letterbox"}, Member(name="new"), "its card").resize == "letterbox"


@pytest.mark.parametrize("name,number", [("1", 1), ("0012", 12), ("\u00b2", None), ("\u0663", None), ("1a", None),
                                         ("", None), (".tmp-export-3", None), ("-1", None),
                                         (str(2**63 - 1), 2**63 - 1), (str(2**63), None), ("9" * 30, None)])
def test_a_version_folder_is_named_by_ascii_digits(name, number):
    from carclf import contract

    assert contract.version_number(name) == number
