"""Kaggle layouts, the data scan (corrupt files generated here), the EDA summary and the split."""

from __future__ import annotations

import io
import json
import random
import re

import numpy as np
import pytest
from PIL import Image, ImageOps

from carclf.errors import ConfigError, InvalidInput, NotFound
from carclf.train import data, pipeline
from tests.train.conftest import jpeg_bytes, noise_image


@pytest.fixture
def messy_data(tmp_path):
    """Two classes of good photos in every awkward encoding, plus the broken files the competition had."""
    root = tmp_path / "train"
    good, bad = root / "0", root / "1"
    good.mkdir(parents=True)
    bad.mkdir(parents=True)
    base = noise_image(60, 80, seed=1)
    (good / "rgb.jpg").write_bytes(jpeg_bytes(base))
    gray = io.BytesIO()
    Image.fromarray(base).convert("L").save(gray, "JPEG")
    (good / "gray.jpg").write_bytes(gray.getvalue())
    cmyk = io.BytesIO()
    Image.fromarray(base).convert("CMYK").save(cmyk, "JPEG")
    (good / "cmyk.jpg").write_bytes(cmyk.getvalue())
    png = io.BytesIO()
    Image.fromarray(base).save(png, "PNG")
    (good / "png_named.jpg").write_bytes(png.getvalue())
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, to be shown rotated 90 degrees clockwise
    (good / "rotated.jpg").write_bytes(jpeg_bytes(base, exif=exif.tobytes()))
    full = jpeg_bytes(noise_image(64, 64, seed=2))
    (bad / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.jpg").write_text("this is a text file, not a photo\n")
    (bad / "tiny.jpg").write_bytes(jpeg_bytes(noise_image(12, 12)))
    (bad / "fine.jpg").write_bytes(jpeg_bytes(noise_image(48, 40, seed=3)))
    return root


def test_scan_lists_corrupt_files_and_keeps_awkward_good_ones(messy_data):
    dataset = data.read_folder_layout(messy_data)
    report = data.scan_dataset(dataset, min_side=32)
    reasons = {b["file"]: b["reason"] for b in report.bad}
    assert set(reasons) == {"1/truncated.jpg", "1/empty.jpg", "1/notes.jpg", "1/tiny.jpg"}
    assert "empty" in reasons["1/empty.jpg"]
    assert "not a recognised image" in reasons["1/notes.jpg"]
    assert "smaller than 32" in reasons["1/tiny.jpg"]
    assert "truncated" in reasons["1/truncated.jpg"]
    good = {g.rel: g for g in report.good}
    assert set(good) == {"0/rgb.jpg", "0/gray.jpg", "0/cmyk.jpg", "0/png_named.jpg", "0/rotated.jpg",
                         "1/fine.jpg"}
    assert good["0/png_named.jpg"].format == "PNG" and good["0/cmyk.jpg"].mode == "CMYK"
    assert [s.rel for s in data.clean_samples(dataset, report)] == sorted(good, key=lambda r: (r[0], r))


def test_training_pixels_are_oriented_rgb(messy_data):
    """The cached training pixels of every awkward file are RGB and EXIF-oriented, as PIL shows them."""
    dataset = data.read_folder_layout(messy_data)
    samples = data.clean_samples(dataset, data.scan_dataset(dataset))
    prepared = dict(zip([s.rel for s in samples],
                        (img for img, _ in pipeline.prepared_images(samples, 32).as_numpy_iterator()), strict=True))
    assert all(p.shape == (32, 32, 3) for p in prepared.values())
    rotated_path = messy_data / "0" / "rotated.jpg"
    shown = np.asarray(ImageOps.exif_transpose(Image.open(rotated_path)).convert("RGB"))
    assert shown.shape[:2] == (80, 60)  # portrait once oriented
    import tensorflow as tf

    from carclf import imaging

    expected = imaging.prepare(tf.constant(shown), 32).numpy()
    assert np.abs(prepared["0/rotated.jpg"].astype(int) - expected).mean() < 8  # JPEG noise only
    unrotated = imaging.prepare(tf.constant(np.asarray(Image.open(rotated_path).convert("RGB"))), 32).numpy()
    assert np.abs(prepared["0/rotated.jpg"].astype(int) - unrotated).mean() > 20


def test_eda_summary_and_plot(messy_data, tmp_path):
    from carclf.train.plots import plot_eda

    dataset = data.read_folder_layout(messy_data)
    report = data.scan_dataset(dataset)
    summary = data.eda_summary(dataset, report)
    assert summary["class_counts"] == {"0": 5, "1": 1} and summary["num_bad"] == 4
    assert summary["width"]["max"] == 80 and summary["height"]["min"] == 48
    json.dumps(summary)
    plot_eda(summary, [(g.width, g.height) for g in report.good], tmp_path / "eda.png")
    assert (tmp_path / "eda.png").read_bytes()[:4] == b"\x89PNG"


def _samples(counts):
    return [data.Sample(path=f"/x/{c}/{i}.jpg", rel=f"{c}/{i:03d}.jpg", label=c)
            for c, n in enumerate(counts) for i in range(n)]


def test_split_is_deterministic_stratified_and_order_independent():
    samples = _samples([40, 50, 37, 2])
    a = data.stratified_split(samples, 0.2, seed=42)
    shuffled = samples[:]
    random.Random(0).shuffle(shuffled)
    b = data.stratified_split(shuffled, 0.2, seed=42)
    assert [s.rel for s in a.val] == [s.rel for s in b.val] and a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != data.stratified_split(samples, 0.2, seed=43).fingerprint()
    per_class = [sum(s.label == c for s in a.val) for c in range(4)]
    assert per_class == [8, 10, 7, 1]
    assert not {s.rel for s in a.val} & {s.rel for s in a.train}
    assert len(a.val) + len(a.train) == len(samples)


def test_a_hold_out_split_leaves_every_class_of_two_or_more_something_to_train_on():
    """A fraction that rounds a small class entirely into validation (0.9 of 2 or 3 files) still leaves one
    file of it for training, and keeps one for validation."""
    split = data.stratified_split(_samples([2, 3, 10]), 0.9, seed=5)
    assert [sum(s.label == c for s in split.train) for c in range(3)] == [1, 1, 1]
    assert [sum(s.label == c for s in split.val) for c in range(3)] == [1, 2, 9]


def test_k_fold_splits_partition_every_class_evenly():
    counts = [40, 50, 37, 2, 1]
    samples = _samples(counts)
    folds = [data.stratified_split(samples, 0.2, seed=7, folds=5, fold=k) for k in range(5)]
    everything = {s.rel for s in samples}
    for split in folds:
        assert {s.rel for s in split.val} | {s.rel for s in split.train} == everything
        assert not {s.rel for s in split.val} & {s.rel for s in split.train}
        assert (split.folds, split.seed) == (5, 7)
    vals = [{s.rel for s in split.val} for split in folds]
    assert set().union(*vals) == everything and sum(map(len, vals)) == len(everything)  # each photo once
    assert max(map(len, vals)) - min(map(len, vals)) <= 1
    for label, n in enumerate(counts):
        per_fold = [sum(s.label == label for s in split.val) for split in folds]
        assert sum(per_fold) == n and max(per_fold) - min(per_fold) <= 1
    shuffled = samples[:]
    random.Random(1).shuffle(shuffled)
    assert data.stratified_split(shuffled, 0.2, seed=7, folds=5, fold=3).fingerprint() == folds[3].fingerprint()
    assert data.stratified_split(samples, 0.2, seed=8, folds=5, fold=3).fingerprint() != folds[3].fingerprint()
    # the hold-out split of the same seed is not affected by the k-fold option
    assert data.stratified_split(samples, 0.2, seed=7).fingerprint() == \
        data.stratified_split(samples, 0.2, seed=7, folds=0, fold=0).fingerprint()


@pytest.mark.parametrize("folds,fold,needle", [(1, 0, "at least 2, received 1"), (4, 4, r"fold must be in \[0, 4\)"),
                                               (3, -1, "received -1"),
                                               (11, 0, "more than the 10 usable photos")])
def test_k_fold_split_refuses_impossible_folds(folds, fold, needle):
    with pytest.raises(InvalidInput, match=needle):
        data.stratified_split(_samples([5, 5]), 0.2, seed=1, folds=folds, fold=fold)


def test_split_is_saved_and_read_back(two_class_data, tmp_path):
    dataset = data.read_folder_layout(two_class_data / "train", two_class_data / "classes.json")
    split = data.stratified_split(dataset.samples, 0.4, seed=5)
    data.save_split(split, tmp_path / "split.json")
    again = data.load_split(tmp_path / "split.json", dataset)
    assert [s.rel for s in again.val] == [s.rel for s in split.val]
    assert again.fingerprint() == split.fingerprint()
    fold = data.stratified_split(dataset.samples, 0.0, seed=5, folds=3, fold=2)
    data.save_split(fold, tmp_path / "fold.json")
    again = data.load_split(tmp_path / "fold.json", dataset)
    assert (again.folds, again.fold, again.fingerprint()) == (3, 2, fold.fingerprint())


@pytest.mark.parametrize("text,needle", [
    (None, "cannot read the split file: No such file or directory"),
    ("{not json", "is not a split file (not valid JSON: "),
    ('[["0/a.jpg", 0]]', 'is not a split file: expected a JSON object with "train" and "val" lists, found a list'),
    ('{"val": [], "seed": 1, "val_fraction": 0.4}', "field 'train': missing: expected a list of [file, label] rows"),
    ('{"train": [], "val": {"0/a.jpg": 0}, "seed": 1, "val_fraction": 0.4}',
     "field 'val': expected a list of [file, label] rows, found {'0/a.jpg': 0}"),
    ('{"train": [["0/a.jpg"]], "val": [], "seed": 1, "val_fraction": 0.4}',
     "field 'train[0]': expected [file, label], found ['0/a.jpg']"),
    ('{"train": [], "val": [["0/a.jpg", "zero"]], "seed": 1, "val_fraction": 0.4}',
     "field 'val[0]': expected [file, label], found ['0/a.jpg', 'zero']"),
    ('{"train": [], "val": [], "val_fraction": 0.4}', "field 'seed': missing"),
])
def test_a_file_that_is_not_a_split_is_one_config_error_naming_it(two_class_data, tmp_path, text, needle):
    dataset = data.read_folder_layout(two_class_data / "train")
    path = tmp_path / "split.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        data.load_split(path, dataset)
    assert caught.value.message.startswith(f"{path}: ") and needle in caught.value.message


def test_a_split_without_validation_photos_reads_back(two_class_data, tmp_path):
    dataset = data.read_folder_layout(two_class_data / "train")
    data.save_split(data.stratified_split(dataset.samples, 0.0, seed=5), tmp_path / "split.json")
    again = data.load_split(tmp_path / "split.json", dataset)  # a run may train on every photo
    assert again.val == [] and len(again.train) == len(dataset.samples)


def test_csv_layout_and_class_names(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(6):
        (images / f"{i}.jpg").write_bytes(jpeg_bytes(noise_image(40, 40, i)))
        rows.append(f"{i}.jpg,{i % 3}")
    (tmp_path / "train.csv").write_text("Id,Category\n" + "\n".join(rows) + "\n")
    (tmp_path / "names.txt").write_text("alpha\nbeta\ngamma\n")
    dataset = data.read_csv_layout(tmp_path / "train.csv", images, tmp_path / "names.txt")
    assert dataset.class_ids == ["0", "1", "2"] and dataset.class_names == ["alpha", "beta", "gamma"]
    assert [(s.rel, s.label) for s in dataset.samples][:3] == [("0.jpg", 0), ("1.jpg", 1), ("2.jpg", 2)]
    (tmp_path / "bad.csv").write_text("file,label\n0.jpg,0\n")
    with pytest.raises(ConfigError, match="expected columns Id,Category"):
        data.read_csv_layout(tmp_path / "bad.csv", images)
    with pytest.raises(ConfigError, match="lists 2 names for 3 classes"):
        (tmp_path / "two.txt").write_text("a\nb\n")
        data.read_csv_layout(tmp_path / "train.csv", images, tmp_path / "two.txt")



@pytest.mark.parametrize("extra,needle", [
    ("2.jpg,0", "'2.jpg' is listed twice (lines 4 and 8, with category '2' and '0'): each photo needs one label"),
    ("2.jpg,2", "'2.jpg' is listed twice (lines 4 and 8, again)"),
    ("3.jpg,", "line 8: Id and Category must both be given, received '3.jpg',''"),
])
def test_a_label_csv_with_a_photo_twice_or_a_blank_is_refused_naming_the_lines(tmp_path, extra, needle):
    """A label file that gives one photo two labels (or one twice, which would weigh it double in training) is
    refused, as is a row without its Id or Category; a photo never silently counts in two classes."""
    images = tmp_path / "images"
    images.mkdir()
    rows = [f"{i}.jpg,{i % 3}" for i in range(6)]
    for i in range(6):
        (images / f"{i}.jpg").write_bytes(jpeg_bytes(noise_image(40, 40, i)))
    labels = tmp_path / "train.csv"
    labels.write_text("Id,Category\n" + "\n".join([*rows, extra]) + "\n")
    with pytest.raises(ConfigError, match=re.escape(needle)) as caught:
        data.read_csv_layout(labels, images)
    assert str(labels) in str(caught.value)


def test_missing_folders_are_clear_errors(tmp_path):
    with pytest.raises(NotFound, match="does not exist"):
        data.read_folder_layout(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    with pytest.raises(InvalidInput, match="no class folders"):
        data.read_folder_layout(tmp_path / "flat")


def test_a_file_given_for_a_folder_or_a_folder_for_a_file_is_called_what_it_is(tmp_path):
    """A CSV given as the training folder (or a folder as the label CSV) is there: the error says what it is, not
    that it does not exist, which would send its user looking for a path that is right there."""
    labels = tmp_path / "train.csv"
    labels.write_text("Id,Category\n")
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(InvalidInput, match=re.escape(f"training folder {str(labels)!r} is a file, not a folder")):
        data.read_folder_layout(labels)
    with pytest.raises(InvalidInput, match=re.escape(f"label CSV {str(images)!r} is a folder, not a file")):
        data.read_csv_layout(images, images)
    with pytest.raises(InvalidInput, match=re.escape(f"image folder {str(labels)!r} is a file, not a folder")):
        data.read_csv_layout(labels, labels)
    with pytest.raises(InvalidInput, match=re.escape(f"class-names file {str(images)!r} is a folder, not a file")):
        data.load_class_names(images, ["0"])
    with pytest.raises(NotFound, match=re.escape(f"label CSV {str(tmp_path / 'no.csv')!r} does not exist")):
        data.read_csv_layout(tmp_path / "no.csv", images)


def test_prepared_images_follow_the_resize_mode(two_class_data):
    import tensorflow as tf

    from carclf import imaging
    from carclf.train import pipeline
    from carclf.train.data import read_folder_layout

    samples = read_folder_layout(two_class_data / "train").samples[:3]
    got = [img for img, _ in pipeline.prepared_images(samples, 32, "letterbox").as_numpy_iterator()]
    for sample, image in zip(samples, got, strict=True):
        decoded = imaging.decode_image(tf.io.read_file(str(sample.path)))
        np.testing.assert_array_equal(image, imaging.prepare(decoded, 32, "letterbox").numpy())


def test_a_photo_folder_leaves_out_hidden_files_and_a_file_is_not_a_folder(tmp_path):
    """macOS's ``._name.jpg`` companions (AppleDouble files that zip archives carry along) and other dot-files
    are not photos: a submission must not stop on them. A photo given where a folder is wanted says so."""
    from carclf.clients.commands.predict import collect

    folder = tmp_path / "test_upload"
    folder.mkdir()
    photo = jpeg_bytes(noise_image(40, 40, 1))
    for name in ("b.jpg", "a.JPG", "._a.JPG", ".thumbnail.jpg", "notes.txt"):
        (folder / name).write_bytes(photo if not name.startswith("._") else b"\0\5\26\7 AppleDouble")
    (folder / "nested.jpg").mkdir()
    assert [p.name for p in data.list_photos(folder, warn=False)] == ["a.JPG", "b.jpg"]
    assert [p.name for p in collect([str(folder)])[0]] == ["a.JPG", "b.jpg"]  # carclf predict FOLDER alike
    with pytest.raises(InvalidInput, match=re.escape(f"{str(folder / 'b.jpg')!r} is a file; give the folder of "
                                                     "photos")):
        data.list_photos(folder / "b.jpg")


def test_class_ids_past_nine_keep_their_numeric_order(tmp_path):
    """Category ids are numbers: class 10 comes after class 9, not after class 1, in both Kaggle layouts, so the
    model's output order (and every saved labels.txt) stays the competition's order."""
    root = tmp_path / "train"
    ids = [str(i) for i in range(12)]
    photo = jpeg_bytes(noise_image(40, 40))
    for cid in ids:
        (root / cid).mkdir(parents=True)
        (root / cid / f"photo_{cid}.jpg").write_bytes(photo)
    folder = data.read_folder_layout(root)
    assert folder.class_ids == ids
    assert [(s.rel, folder.class_ids[s.label]) for s in folder.samples] == [(f"{c}/photo_{c}.jpg", c) for c in ids]
    labels = tmp_path / "train.csv"
    labels.write_text("Id,Category\n" + "".join(f"{c}/photo_{c}.jpg,{c}\n" for c in ids))
    table = data.read_csv_layout(labels, root)
    assert table.class_ids == ids
    assert all(table.class_ids[s.label] == s.rel.split("/")[0] for s in table.samples)


def test_hidden_folders_and_files_are_neither_classes_nor_photos(tmp_path):
    """A Jupyter ``.ipynb_checkpoints`` folder (Kaggle notebooks leave one in train/) is no class, and macOS's
    ``._name.jpg`` companions in a class folder are no photos."""
    root = tmp_path / "train"
    photo = jpeg_bytes(noise_image(40, 40))
    for cid in ("0", "1"):
        (root / cid).mkdir(parents=True)
        (root / cid / "car.jpg").write_bytes(photo)
    (root / "0" / "._car.jpg").write_bytes(b"\0\5\26\7 AppleDouble")
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "car.jpg").write_bytes(photo)
    dataset = data.read_folder_layout(root)
    assert dataset.class_ids == ["0", "1"] and dataset.num_classes == 2
    assert [s.rel for s in dataset.samples] == ["0/car.jpg", "1/car.jpg"]


def test_a_photo_that_cannot_be_read_is_listed_and_the_scan_goes_on(tmp_path):
    """A file that disappears or cannot be read between listing and scanning (a network share, a sync client) is
    one more file to skip, with the reason; the other photos are still scanned."""
    root = tmp_path / "train"
    (root / "0").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (root / "0" / name).write_bytes(jpeg_bytes(noise_image(40, 40)))
    dataset = data.read_folder_layout(root)
    (root / "0" / "b.jpg").unlink()
    report = data.scan_dataset(dataset)
    assert [g.rel for g in report.good] == ["0/a.jpg", "0/c.jpg"]
    assert [b["file"] for b in report.bad] == ["0/b.jpg"] and "unreadable" in report.bad[0]["reason"]


def test_a_split_whose_labels_disagree_with_the_data_is_refused(two_class_data, tmp_path):
    """A split.json that gives a photo another class than its folder now does (photos moved between classes since
    the run) is refused naming the file, not evaluated against labels the run never trained on."""
    dataset = data.read_folder_layout(two_class_data / "train")
    split = data.stratified_split(dataset.samples, 0.4, seed=5)
    saved = split.to_dict()
    rel, label = saved["val"][0]
    saved["val"][0] = [rel, 1 - label]
    path = tmp_path / "split.json"
    path.write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=re.escape(f"val file {rel!r} (label {1 - label}) is not in the data")) \
            as caught:
        data.load_split(path, dataset)
    assert str(path) in caught.value.message


def test_a_class_names_file_without_a_name_for_a_class_is_a_config_error(two_class_data, tmp_path):
    """classes.json must name every class folder; one it leaves out is a ConfigError naming the file and the ids."""
    names = tmp_path / "classes.json"
    names.write_text(json.dumps({"0": "GMC Savana Van 2012"}))
    with pytest.raises(ConfigError, match=re.escape("has no name for class ids ['1']")) as caught:
        data.read_folder_layout(two_class_data / "train", names)
    assert str(names) in caught.value.message


def test_a_label_csv_saved_with_a_byte_order_mark_reads(tmp_path):
    """Excel's "CSV UTF-8" starts the file with a byte order mark (and ends lines with CRLF); the Id column is still
    the Id column, not '\\ufeffId' (which refused the file)."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        (images / f"{i}.jpg").write_bytes(jpeg_bytes(noise_image(40, 40, i)))
    labels = tmp_path / "train.csv"
    labels.write_bytes(b"\xef\xbb\xbfId,Category\r\n" + b"".join(f"{i}.jpg,{i % 2}\r\n".encode() for i in range(4)))
    dataset = data.read_csv_layout(labels, images)
    assert dataset.class_ids == ["0", "1"]
    assert [(s.rel, s.label) for s in dataset.samples] == [(f"{i}.jpg", i % 2) for i in range(4)]


@pytest.mark.parametrize("name,text", [("classes.json", '{"0": "GMC Savana", "1": "Jaguar F-Type"}'),
                                       ("classes.txt", "GMC Savana\r\nJaguar F-Type\r\n")], ids=["json", "txt"])
def test_a_class_names_file_saved_with_a_byte_order_mark_reads(two_class_data, tmp_path, name, text):
    """Notepad and Excel may start a UTF-8 file with a byte order mark: classes.json still parses, and the first
    name of a names file does not begin with an invisible '\\ufeff'."""
    names = tmp_path / name
    names.write_bytes(b"\xef\xbb\xbf" + text.encode())
    dataset = data.read_folder_layout(two_class_data / "train", names)
    assert dataset.class_names == ["GMC Savana", "Jaguar F-Type"]


def test_class_folders_named_by_other_digits_sort_as_text(tmp_path):
    """A class folder named '²' (str.isdigit, yet no integer) makes the ids text, sorted as text, not a crash."""
    root = tmp_path / "train"
    for cid in ("2", "10", "\u00b2"):
        (root / cid).mkdir(parents=True)
        (root / cid / "car.jpg").write_bytes(jpeg_bytes(noise_image(40, 40)))
    assert data.read_folder_layout(root).class_ids == ["10", "2", "\u00b2"]
