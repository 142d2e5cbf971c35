"""Training data: the Kaggle layouts, the data scan, the EDA summary and the train/validation split.

Both Kaggle layouts are read: ``train/<class>/<image>`` and a CSV ``Id,Category`` beside an image folder.
The scan decodes every file with the product's own decoder (``carclf.imaging``) and lists the files
that training must skip. The split depends only on the scanned file list, the seed and the validation
fraction, so every recipe trained on the same data sees the same validation photos.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from carclf import contract, imaging, sources
from carclf.errors import ConfigError, InvalidInput, NotFound

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    path: str       # absolute path
    rel: str        # path relative to the data root, as written in split.json
    label: int      # index into Dataset.class_ids


@dataclass
class Dataset:
    """Labelled photos. ``class_ids`` are the competition's category ids, ``class_names`` their names."""

    root: str
    class_ids: list[str]
    class_names: list[str]
    samples: list[Sample]

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)


def load_class_names(path: str | os.PathLike | None, class_ids: Sequence[str]) -> list[str]:
    """Names for ``class_ids`` from classes.json ({"0": "name", ...}) or a text file (one name per line)."""
    if path is None:
        return list(class_ids)
    p = sources.require(path, "file", "class-names file")
    if p.suffix == ".json":
        try:
            mapping = json.loads(p.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"is not valid JSON: {exc}", source=str(p)) from None
        if isinstance(mapping, list):
            mapping = {str(i): n for i, n in enumerate(mapping)}
        missing = [c for c in class_ids if c not in mapping]
        if missing:
            raise ConfigError(f"has no name for class ids {missing}", source=str(p))
        return [str(mapping[c]) for c in class_ids]
    names = [line.strip() for line in p.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if len(names) != len(class_ids):
        raise ConfigError(f"lists {len(names)} names for {len(class_ids)} classes", source=str(p))
    return names


def _sort_ids(ids: Iterable[str]) -> list[str]:
    ids = list(ids)
    return sorted(ids, key=int) if all(contract.ascii_digits(i) for i in ids) else sorted(ids)


def classes_beside(train_dir: str | os.PathLike) -> str | None:
    """The class-names file of a Kaggle-style layout for ``train_dir``: ``classes.json`` beside it (cars10/
    classes.json next to cars10/train/), else inside it; None when there is neither."""
    root = Path(train_dir)
    for candidate in (root.parent / "classes.json", root / "classes.json"):
        if candidate.is_file():
            return str(candidate)
    return None


def read_folder_layout(train_dir: str | os.PathLike, classes: str | os.PathLike | None = None) -> Dataset:
    """``train_dir/<class id>/<image>``: every file inside a class folder is a candidate sample."""
    root = sources.require(train_dir, "folder", "training folder")
    class_ids = _sort_ids(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    nested = root / "train"
    if "train" in class_ids and any(p.is_dir() for p in nested.iterdir()):
        raise InvalidInput(f"{str(root)!r} holds a train/ folder of class folders (the Kaggle layout's root): "
                           f"pass {str(nested)!r}")
    if not class_ids:
        raise InvalidInput(f"training folder {str(root)!r} has no class folders (expected train/<class>/<image>)")
    samples = [
        Sample(path=str(f.resolve()), rel=f"{cid}/{f.name}", label=label)
        for label, cid in enumerate(class_ids)
        for f in sorted((root / cid).iterdir())
        if f.is_file() and not f.name.startswith(".")
    ]
    return Dataset(str(root.resolve()), class_ids, load_class_names(classes, class_ids), samples)


def read_csv_layout(csv_path: str | os.PathLike, images_dir: str | os.PathLike,
                    classes: str | os.PathLike | None = None) -> Dataset:
    """A CSV ``Id,Category`` listing files of ``images_dir`` and their category ids."""
    csv_file = sources.require(csv_path, "file", "label CSV")
    root = sources.require(images_dir, "folder", "image folder")
    with csv_file.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"Id", "Category"} <= set(reader.fieldnames):
            raise ConfigError(f"expected columns Id,Category, received {reader.fieldnames}", source=str(csv_file))
        rows = [(str(r["Id"] or "").strip(), str(r["Category"] or "").strip()) for r in reader]
    first_row: dict[str, int] = {}
    for line, (name, category) in enumerate(rows, start=2):  # line 1 is the header
        if not name or not category:
            raise ConfigError(f"line {line}: Id and Category must both be given, received {name!r},{category!r}",
                              source=str(csv_file))
        if name in first_row:
            before = rows[first_row[name] - 2][1]
            also = "again" if before == category else f"with category {before!r} and {category!r}"
            raise ConfigError(f"{name!r} is listed twice (lines {first_row[name]} and {line}, {also}): each photo "
                              "needs one label", source=str(csv_file))
        first_row[name] = line
    class_ids = _sort_ids({c for _, c in rows})
    index = {c: i for i, c in enumerate(class_ids)}
    samples = [Sample(path=str((root / name).resolve()), rel=name, label=index[c]) for name, c in sorted(rows)]
    return Dataset(str(root.resolve()), class_ids, load_class_names(classes, class_ids), samples)


def read_dataset(data) -> Dataset:
    """From a recipe's DataConfig (either layout)."""
    if data.train:
        return read_folder_layout(data.train, data.classes)
    return read_csv_layout(data.csv, data.images, data.classes)


# ---------------------------------------------------------------------------------------------
# Scan
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileInfo:
    rel: str
    label: int
    width: int
    height: int
    format: str
    mode: str
    bytes: int


@dataclass
class ScanReport:
    """Files that decode (with their sizes) and files to skip (with the reason)."""

    root: str
    good: list[FileInfo] = field(default_factory=list)
    bad: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"root": self.root, "num_good": len(self.good), "num_bad": len(self.bad), "bad": self.bad,
                "good": [asdict(g) for g in self.good]}


def check_image_file(path: str | os.PathLike, min_side: int = 32):
    """ImageInfo of a file that fully decodes with the product's decoder, else raise InvalidInput why not."""
    return check_image_bytes(Path(path).read_bytes(), min_side)


def check_image_bytes(data: bytes, min_side: int = 32):
    """``check_image_file`` for bytes already read: the header's limits, then a full decode (a truncated JPEG
    has a valid header)."""
    info = imaging.probe_image(data, min_side=min_side)
    pixels = imaging.decode_checked(data)
    if min(int(pixels.shape[0]), int(pixels.shape[1])) < min_side:
        raise InvalidInput(f"decodes to {pixels.shape[1]}x{pixels.shape[0]}, smaller than {min_side} px")
    return info


def scan_dataset(dataset: Dataset, min_side: int = 32, progress: bool = False) -> ScanReport:
    """Decode every sample once; unreadable, truncated, empty, non-image and tiny files go to ``bad``."""
    report = ScanReport(root=dataset.root)
    items: Iterable[Sample] = dataset.samples
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="scan", unit="img")
    for s in items:
        try:
            info = check_image_file(s.path, min_side=min_side)
        except InvalidInput as exc:
            report.bad.append({"file": s.rel, "reason": exc.message})
            continue
        except OSError as exc:
            report.bad.append({"file": s.rel, "reason": f"unreadable: {exc.strerror or exc}"})
            continue
        report.good.append(FileInfo(s.rel, s.label, info.width, info.height, info.format, info.mode,
                                    os.path.getsize(s.path)))
    return report


def clean_samples(dataset: Dataset, report: ScanReport) -> list[Sample]:
    good = {g.rel for g in report.good}
    return [s for s in dataset.samples if s.rel in good]


# ---------------------------------------------------------------------------------------------
# EDA
# ---------------------------------------------------------------------------------------------

def eda_summary(dataset: Dataset, report: ScanReport) -> dict[str, Any]:
    """Class counts and the image-size distribution of the usable files."""
    counts = Counter(g.label for g in report.good)
    widths = np.array([g.width for g in report.good] or [0])
    heights = np.array([g.height for g in report.good] or [0])

    def stats(values: np.ndarray) -> dict[str, float]:
        return {k: float(v) for k, v in zip(("min", "p10", "median", "p90", "max"),
                                            np.percentile(values, [0, 10, 50, 90, 100]), strict=True)}

    return {
        "root": dataset.root,
        "num_images": len(report.good),
        "num_bad": len(report.bad),
        "class_counts": {dataset.class_ids[i]: counts.get(i, 0) for i in range(dataset.num_classes)},
        "class_names": dict(zip(dataset.class_ids, dataset.class_names, strict=True)),
        "width": stats(widths),
        "height": stats(heights),
        "aspect_ratio": stats(widths / np.maximum(heights, 1)),
        "formats": dict(Counter(g.format for g in report.good)),
        "modes": dict(Counter(g.mode for g in report.good)),
        "megabytes": round(sum(g.bytes for g in report.good) / 1e6, 2),
    }


# ---------------------------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------------------------

@dataclass
class Split:
    train: list[Sample]
    val: list[Sample]
    seed: int
    val_fraction: float
    folds: int = 0  # k of a k-fold split (0: a hold-out split by val_fraction)
    fold: int = 0   # which of the k folds is the validation part
    extra: list[Sample] = field(default_factory=list)  # photos from data.extra_train: training only

    def fingerprint(self) -> str:
        """Hash of the validation file list: equal for runs that validate on the same photos."""
        text = "\n".join(sorted(f"{s.rel}\t{s.label}" for s in self.val))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "val_fraction": self.val_fraction, "folds": self.folds, "fold": self.fold,
            "val_fingerprint": self.fingerprint(),
            "train": [[s.rel, s.label] for s in self.train], "val": [[s.rel, s.label] for s in self.val],
            "extra_train": [[s.path, s.label] for s in self.extra],
        }

    @property
    def training(self) -> list[Sample]:
        """What the model trains on: the split's training part, then the extra training photos."""
        return self.train + self.extra


def stratified_split(samples: Sequence[Sample], val_fraction: float, seed: int, *, folds: int = 0,
                     fold: int = 0) -> Split:
    """Per class, a seeded shuffle of the sorted files.

    Hold-out (``folds == 0``): round(fraction * n) of each class (at least one when the class has two or
    more files and the fraction is positive) go to validation.
    k-fold (``folds >= 2``): the shuffled files of each class are dealt to the k folds in turn, each class
    starting where the previous one stopped, so folds differ in size by at most one photo overall and by at
    most one per class; fold ``fold`` is validation. The k splits of one seed validate on disjoint sets that
    together cover every photo once.
    """
    if folds == 1 or folds < 0:
        raise InvalidInput(f"folds must be 0 (hold-out) or at least 2, received {folds}")
    if folds and not 0 <= fold < folds:
        raise InvalidInput(f"fold must be in [0, {folds}), received {fold}")
    by_class: dict[int, list[Sample]] = {}
    for s in sorted(samples, key=lambda s: (s.label, s.rel)):
        by_class.setdefault(s.label, []).append(s)
    if folds and folds > len(samples):
        raise InvalidInput(f"split.folds {folds} is more than the {len(samples)} usable photos: some folds would "
                           f"have no validation photo (choose at most {len(samples)} folds)")
    if folds and by_class:
        smallest = min(by_class, key=lambda label: (len(by_class[label]), label))
        if len(by_class[smallest]) < folds:
            log.warning("the class of %s has %d usable photos, fewer than the %d folds: some folds validate "
                        "without it", by_class[smallest][0].rel, len(by_class[smallest]), folds)
    train: list[Sample] = []
    val: list[Sample] = []
    dealt = 0  # photos dealt to folds so far, over all classes
    for label in sorted(by_class):
        items = by_class[label]
        rng = np.random.default_rng([seed, label])  # independent of other classes and of file order
        order = rng.permutation(len(items))
        if folds:
            chosen = [int(i) for rank, i in enumerate(order) if (dealt + rank) % folds == fold]
            dealt += len(items)
        else:
            n_val = int(round(val_fraction * len(items)))
            if val_fraction > 0 and len(items) >= 2:
                n_val = min(max(n_val, 1), len(items) - 1)
            chosen = [int(i) for i in order[:n_val]]
        held = set(chosen)
        val.extend(items[i] for i in sorted(held))
        train.extend(items[i] for i in range(len(items)) if i not in held)
    fraction = len(val) / max(1, len(val) + len(train)) if folds else val_fraction
    return Split(train=train, val=val, seed=seed, val_fraction=round(fraction, 4), folds=folds, fold=fold)


def save_split(split: Split, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(split.to_dict(), indent=1), encoding="utf-8")


def load_split(path: str | os.PathLike, dataset: Dataset) -> Split:
    """Read split.json back against ``dataset`` (files must still be there, labels must agree). A file that
    cannot be read or is not a split (``save_split``'s layout) is a ConfigError naming the file and the fault."""
    source = str(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the split file: {exc.strerror or exc}", source=source) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"is not a split file (not valid JSON: {exc})", source=source) from None
    if not isinstance(data, dict):
        raise ConfigError(f"is not a split file: expected a JSON object with \"train\" and \"val\" lists, found "
                          f"a {type(data).__name__}", source=source)
    by_rel = {s.rel: s for s in dataset.samples}

    def rows(part: str, default: list | None = None) -> list[tuple[str, int]]:
        """The ``[file, label]`` rows of ``part``."""
        if part not in data and default is None:
            raise ConfigError("missing: expected a list of [file, label] rows", source=source, field=part)
        value = data.get(part, default)
        if not isinstance(value, list):
            raise ConfigError(f"expected a list of [file, label] rows, found {value!r:.60}", source=source,
                              field=part)
        out = []
        for i, row in enumerate(value):
            try:
                if not isinstance(row, list) or len(row) != 2 or not isinstance(row[0], str):
                    raise TypeError
                out.append((row[0], int(row[1])))
            except (TypeError, ValueError):
                raise ConfigError(f"expected [file, label], found {row!r:.60}", source=source,
                                  field=f"{part}[{i}]") from None
        return out

    def number(key: str, kind: type, default: Any = None) -> Any:
        value = data.get(key, default)
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"expected a number, found {value!r:.60}" if key in data else "missing",
                              source=source, field=key) from None

    def resolve(part: str) -> list[Sample]:
        out = []
        for rel, label in rows(part):
            s = by_rel.get(rel)
            if s is None or s.label != label:
                raise ConfigError(f"{part} file {rel!r} (label {label}) is not in the data at {dataset.root}",
                                  source=source)
            out.append(s)
        return out

    extra = []
    for file, label in rows("extra_train", []):
        if not Path(file).is_file():
            raise ConfigError(f"extra training photo {file!r} no longer exists", source=source)
        extra.append(Sample(path=file, rel=file, label=label))
    return Split(resolve("train"), resolve("val"), number("seed", int), number("val_fraction", float),
                 number("folds", int, 0), number("fold", int, 0), extra)


def extra_training_samples(extra_sources: Sequence[Any], dataset: Dataset, split: Split,
                           min_side: int = 32) -> tuple[list[Sample], list[dict[str, str]]]:
    """The photos of ``data.extra_train`` (``recipe.ExtraSource``), labelled with ``dataset``'s classes.

    Each CSV names its categories by class id; an id the dataset does not have is an error, and so is an image
    folder that holds none of the photos a CSV lists (the wrong folder: training would go on without them). A
    photo whose bytes equal a validation photo's is refused: training on it would leak that photo's label into
    the score. Copies of training photos and files that do not decode are skipped, and returned as
    ``{"file", "reason"}`` so the run can list them.
    """
    def digest(path: str) -> str:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    val_digests = {digest(s.path): s.rel for s in split.val}
    train_digests = {digest(s.path) for s in split.train}
    index = {cid: i for i, cid in enumerate(dataset.class_ids)}
    samples: list[Sample] = []
    skipped: list[dict[str, str]] = []
    for i, source in enumerate(extra_sources):
        where = f"data.extra_train[{i}]"
        extra = read_csv_layout(source.csv_for(split.fold), source.images)
        if extra.samples and not any(Path(s.path).is_file() for s in extra.samples):
            raise ConfigError(f"none of the {len(extra.samples)} photos it lists is in {source.images!r} (the first: "
                              f"{extra.samples[0].rel!r}); give the folder that holds them",
                              source=source.csv_for(split.fold), field=f"{where}.images")
        unknown = [cid for cid in extra.class_ids if cid not in index]
        if unknown:
            raise ConfigError(f"names categories {unknown} that the training data does not have "
                              f"({dataset.class_ids})", source=source.csv_for(split.fold), field=f"{where}.csv")
        report = scan_dataset(extra, min_side)
        skipped += [{"file": bad["file"], "reason": f"{where}: {bad['reason']}"} for bad in report.bad]
        for s in clean_samples(extra, report):
            fingerprint = digest(s.path)
            if fingerprint in val_digests:
                raise InvalidInput(f"{where}: {s.rel} is the validation photo {val_digests[fingerprint]!r}; "
                                   "a photo must not both train and validate")
            if fingerprint in train_digests:
                skipped.append({"file": s.rel, "reason": f"{where}: already a training photo"})
                continue
            train_digests.add(fingerprint)
            samples.append(Sample(path=s.path, rel=s.path, label=index[extra.class_ids[s.label]]))
    return samples, skipped


def list_photos(folder: str | os.PathLike, warn: bool = True) -> list[Path]:
    """Image files of a folder (a Kaggle test_upload), sorted by name; with ``warn``, its other files are named
    in a warning (they get no row)."""
    root = Path(folder)
    if root.is_file():
        raise InvalidInput(f"{str(root)!r} is a file; give the folder of photos")
    if not root.is_dir():
        raise NotFound(f"photo folder {str(root)!r} does not exist")
    photos, others = imaging.photo_files(root)
    if not photos:
        raise InvalidInput(imaging.no_photos(folder))
    if others and warn:
        log.warning("%s", imaging.left_out(folder, others))
    return photos
