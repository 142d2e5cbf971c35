"""``carclf predict``: classify photos through a running server, over gRPC or REST.

    carclf predict PHOTO... --server grpc://localhost:8500 --model car_ensemble --top-k 3 [--verbose]
    carclf predict FOLDER --server http://localhost:8501 --output submission.csv

Photos print their top-k car models (and, with --verbose, each ensemble member's vote, version and
latency), named by the server; --classes names only the ranks the server does not. A folder, or photos
given with --output, becomes a Kaggle submission CSV (Id,Category) with a progress bar; a folder with --json
or --verbose prints its photos instead.

A photo that cannot be classified does not stop the others: every file is checked locally before its
request is sent (header only), and when the server refuses a request as invalid (a truncated JPEG, say) its photos are sent again
one by one to find the culprit. Each such photo gets one line on stderr naming the file; the rest are
printed (or written to the CSV) and the exit status is 1. Errors that are not about a photo (unknown model,
server down) stop the run with status 2. Once the server has answered, a request it refuses as UNAVAILABLE
(shutting down, a replica rotating out) or RESOURCE_EXHAUSTED for a full queue is tried again, --retries
times, after 0.5, 1, 2, 4, 4 ... s, so that a long run outlives a rolling update; a server that never
answered fails at once.

A CSV run keeps the rows answered so far in <output>.partial.csv as they come, so a run stopped by any means
(the server gone, Ctrl-C, a killed process) loses none of them: the same command with --resume sends only
the photos that file lacks, then writes the whole submission and removes it. The file records the model,
version and classes its rows were answered with, and a run resumed with others is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from carclf import contract, imaging
from carclf.destinations import check_file
from carclf.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    RequestTooLarge,
    ResourceExhausted,
    Unavailable,
)
from carclf.partial import PartialSubmission, RunLine, one_line

DEFAULT_SUBMISSION = Path("submission.csv")  # where a folder's predictions go when --output is not given
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 4.0  # waits before the retries of a request: 0.5, 1, 2, 4, 4 ... s
MAX_RETRIES = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PHOTO|FOLDER", help="photo files, or folders of photos")
    parser.add_argument("--server", default="grpc://127.0.0.1:8500",
                        help="grpc://host:8500, grpcs://host:port, http://host:8501 or https://... "
                             "(default %(default)s)")
    parser.add_argument("--model", default="car_ensemble", help="car_ensemble or a backbone (default %(default)s)")
    parser.add_argument("--top-k", type=int, default=3, help="car models to print per photo (default %(default)s)")
    parser.add_argument("--verbose", action="store_true", help="also print each ensemble member's vote")
    parser.add_argument("--output", "--out", type=Path, default=None,
                        help="write the submission CSV (Id,Category) here instead of printing; a folder writes "
                             "one to submission.csv when not given (never replacing an existing one), unless "
                             "--json or --verbose asks to print its photos")
    parser.add_argument("--resume", action="store_true",
                        help="continue a CSV run that stopped: the photos answered in <output>.partial.csv are "
                             "not sent again")
    parser.add_argument("--classes", type=Path, default=None,
                        help="classes.json ({category id: name}): the CSV gets category ids, and printed ranks "
                             "the server does not name get names")
    parser.add_argument("--version", type=int, default=None, help="model version to ask for")
    parser.add_argument("--version-label", default=None, help="model version label to ask for (e.g. canary)")
    parser.add_argument("--batch-size", type=int, default=8, help="photos per request (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default %(default)s)")
    parser.add_argument("--retries", type=int, default=3,
                        help="times a request is tried again when the server answers UNAVAILABLE or that its "
                             "queue is full, waiting 0.5, 1, 2, then 4 s between tries (0: never; default %(default)s)")
    parser.add_argument("--root-cert", type=Path, default=None, help="PEM root certificates for TLS")
    parser.add_argument("--json", action="store_true", help="print one JSON object per photo instead of text")


def collect(paths: Sequence[str]) -> tuple[list[Path], bool]:
    """Photo files named directly or found in folders (sorted), and whether any folder was given."""
    photos: list[Path] = []
    folder_given = False
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            folder_given = True
            found, others = imaging.photo_files(path)
            if not found:
                raise InvalidInput(imaging.no_photos(raw, "folder"))
            if others:  # a submission without their rows must not go unnoticed
                note(imaging.left_out(raw, others))
            photos.extend(found)
        elif path.is_file():
            photos.append(path)
        else:
            raise NotFound(f"no such photo or folder: {raw!r}")
    return photos, folder_given


def read_photo(path: Path) -> bytes:
    """The file's bytes, refused with a clear message when it is not a usable image."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot be read: {exc.strerror or exc}") from None
    imaging.probe_image(data)
    return data


def note(message: str) -> None:
    """One line on stderr: tqdm.write puts it above a CSV run's progress bar (a plain print when none is shown)."""
    from tqdm import tqdm

    tqdm.write(f"carclf predict: {message}", file=sys.stderr)
    sys.stderr.flush()


class Failures(list):
    """Photos that could not be classified: (path, why)."""

    def report(self, path: Path, message: str) -> None:
        self.append((path, message))
        note(f"error: {path}: {message}")


PRINTED = (contract.OUTPUT_PROBABILITIES,)  # what printing a photo needs; the CSV needs its output_filter
ALIAS_NOT_FOUND = "output tensor alias not found"  # TF Serving's refusal of an output_filter name


def check_model(client, args, needed: Sequence[str]) -> None:
    """Before any photo: the model (version, label) must exist, take photos as ``image_bytes`` and (where its
    metadata lists outputs, as TF Serving's does) answer the ``needed`` outputs, so that a refused Predict
    afterwards is about its photos."""
    metadata = client.metadata(args.model, version=args.version, version_label=args.version_label)
    signature = metadata.signatures.get(contract.SIGNATURE_BYTES)
    if signature is None or contract.INPUT_IMAGE_BYTES not in signature.inputs:
        takes = ", ".join(signature.inputs) if signature else f"no {contract.SIGNATURE_BYTES} signature"
        raise InvalidInput(f"model {args.model!r} does not take photos as {contract.INPUT_IMAGE_BYTES!r} in "
                           f"{contract.SIGNATURE_BYTES} (it takes {takes})")
    missing = [name for name in needed if signature.outputs and name not in signature.outputs]
    if missing:
        raise FailedPrecondition(f"model {args.model!r} does not answer {', '.join(map(repr, missing))} (it "
                                 f"answers {', '.join(signature.outputs)}): not a car classifier of this project")


def check_answer(result, args, photos: int, needed: Sequence[str]) -> None:
    """The server's answer must hold the ``needed`` outputs, one row per photo sent (probabilities as a
    [photos, classes] matrix of numbers); otherwise the run stops, since no photo is to blame."""
    outputs = result.outputs
    missing = [name for name in needed if name not in outputs]
    if missing:
        raise FailedPrecondition(f"the answer of model {args.model!r} has no {', '.join(map(repr, missing))} "
                                 f"(it has {', '.join(outputs) or 'no output'}): not a car classifier of this "
                                 "project")
    for name in needed:
        value = np.asarray(outputs[name])
        rows = value.shape[0] if value.ndim else 0
        matrix = name != contract.OUTPUT_PROBABILITIES or (value.ndim == 2 and value.dtype.kind in "fiu")
        if rows != photos or not matrix:
            raise FailedPrecondition(f"the answer of model {args.model!r} has {name!r} of shape {value.shape} and "
                                     f"type {value.dtype} for {photos} photos: not a car classifier's answer")


def classify(client, args, photos: Sequence[Path], failures: Failures,
             output_filter: Sequence[str] = ()) -> Iterator[tuple[list[Path], object]]:
    """(paths, result) per request the server answered, ``args.batch_size`` photos at a time; photos refused
    locally or by the server as invalid go to ``failures`` and the others go on. A request refused for its
    size (photo count or bytes) goes on one photo per request."""
    needed = tuple(output_filter) or PRINTED
    check_model(client, args, needed)

    def readable() -> Iterator[tuple[Path, bytes]]:  # read lazily: a folder may not fit in memory at once
        for path in photos:
            try:
                yield path, read_photo(path)
            except InvalidInput as exc:
                failures.report(path, exc.message)

    def send(batch):
        for attempt in itertools.count(1):
            try:
                result = client.predict(args.model, images=[data for _, data in batch], version=args.version,
                                        version_label=args.version_label, output_filter=output_filter)
            except InvalidInput as exc:
                if exc.message.startswith(ALIAS_NOT_FOUND):  # about the model, not the photos
                    raise FailedPrecondition(f"model {args.model!r}: {exc.message}") from None
                raise
            except (Unavailable, ResourceExhausted) as exc:  # the server, for now; not the request's own size
                if isinstance(exc, RequestTooLarge) or attempt > args.retries:
                    raise
                wait = min(RETRY_FIRST_S * 2 ** (attempt - 1), RETRY_MAX_S)
                note(f"{exc.code}: {exc.message}; trying again in {wait:g} s (retry {attempt} of {args.retries})")
                time.sleep(wait)
                continue
            check_answer(result, args, len(batch), needed)
            return result

    pending, size = readable(), args.batch_size
    while batch := list(itertools.islice(pending, size)):
        try:
            result = send(batch)
        except (InvalidInput, RequestTooLarge) as exc:
            refused = exc
        else:
            yield [path for path, _ in batch], result
            continue
        if len(batch) == 1:
            failures.report(batch[0][0], refused.message)
            continue
        answered, errors = [], []
        for item in batch:  # which photo did the server refuse? ask for each alone
            try:
                answered.append(([item[0]], send([item])))
            except (InvalidInput, RequestTooLarge) as exc:
                errors.append((item[0], exc.message))
        if not errors:  # the request was refused, none of its photos: its size (above max_batch_size, say)
            note(f"the server refused {len(batch)} photos in one request ({refused.message}); sending one photo "
                 "per request from now on (a smaller --batch-size avoids this)")
            size = 1
        for path, message in errors:
            failures.report(path, message)
        yield from answered


def read_classes(path: Path | None) -> tuple[list[str] | None, dict[str, str] | None]:
    """Class names (index order) and name -> category id from a classes.json."""
    if path is None:
        return None, None
    try:
        mapping = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise NotFound(f"classes file {str(path)!r} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"is not a readable JSON object of category id -> name: {exc}", source=str(path)) from None
    if not isinstance(mapping, dict) or not mapping:
        raise ConfigError("expected a JSON object {\"0\": \"name\", ...}", source=str(path))
    ids = sorted(mapping, key=lambda k: (not contract.ascii_digits(k), int(k) if contract.ascii_digits(k) else 0, k))
    names = [str(mapping[k]) for k in ids]
    return names, {str(mapping[k]): k for k in ids}


def category_for(label: str, category_of: dict[str, str], source: Path) -> str:
    """The classes file's category id of a label the server named; a file without it is refused."""
    if label not in category_of:
        raise ConfigError(f"the server's label {label!r} is not in the classes file", source=str(source))
    return category_of[label]


def check_classes(result, args, class_names: list[str], category_of: dict[str, str]) -> None:
    """The classes file must hold every top label the server names and, where it names the other ranks (by
    class index), hold as many classes as the model, in the model's order."""
    labels = result.labels if contract.OUTPUT_LABEL in result.outputs else []
    for label in labels:
        category_for(label, category_of, args.classes)
    classes = result.probabilities.shape[-1]
    if min(args.top_k, classes) <= result.named_ranks:
        return
    if len(class_names) < classes:
        raise ConfigError(f"holds {len(class_names)} classes, the model answers {classes}",
                          source=str(args.classes))
    ids = np.asarray(result.outputs.get(contract.OUTPUT_CLASS_ID, [])).reshape(-1)
    for cid, label in zip(ids, labels, strict=False):  # a model answering labels without ids: nothing to check
        if class_names[int(cid)] != label:
            raise ConfigError(f"class {int(cid)} is {class_names[int(cid)]!r} here but {label!r} for the model: "
                              "to name ranks by class index the file must list the model's classes in its "
                              "order", source=str(args.classes))


def run(args: argparse.Namespace) -> int:
    from carclf.clients.base import checked_timeout, connect, read_root_cert

    if args.top_k < 1:
        raise InvalidInput(f"--top-k must be >= 1, received {args.top_k}")
    if args.batch_size < 1:
        raise InvalidInput(f"--batch-size must be >= 1, received {args.batch_size}")
    if not 0 <= args.retries <= MAX_RETRIES:
        raise InvalidInput(f"--retries must be 0..{MAX_RETRIES}, received {args.retries}")
    checked_timeout(args.timeout, "--timeout")
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:  # a photo's name that is not UTF-8 prints as its bytes on disk, as the CSV holds it
        reconfigure(errors="surrogateescape")
    printing = [flag for flag, given in (("--json", args.json), ("--verbose", args.verbose)) if given]
    if args.output is not None and printing:
        raise InvalidInput(f"{' and '.join(printing)} print each photo, --output writes a submission CSV: give "
                           "one or the other")
    if args.output is not None:
        check_file(args.output, what="--output")  # before anything is read or sent
    photos, folder_given = collect(args.paths)
    class_names, category_of = read_classes(args.classes)
    root_cert = read_root_cert(args.root_cert, "--root-cert")
    output = args.output
    if output is None and folder_given and not printing:
        output = DEFAULT_SUBMISSION
        if output.exists():  # never replace a file nobody named
            raise InvalidInput(f"{output} exists: give --output PATH for the submission of a folder "
                               f"(--output {output} replaces it)")
        check_file(output, what="the submission")
    if output is None and args.resume:
        raise InvalidInput("--resume continues a submission run: give --output (or a folder) with it")
    kept = None
    if output is not None:
        check_submission_ids(photos)
        kept = PartialSubmission(output, photos, describe_run(args.model, args.version, args.version_label,
                                                              category_of), resume=args.resume)
        if kept.resuming:
            note(kept.resuming)
    failures = Failures()
    with connect(args.server, timeout=args.timeout, root_certificates=root_cert) as client:
        if kept is not None:
            write_submission(client, args, kept, category_of, failures)
        else:
            named: int | None = None  # ranks the server names, once some printed rank went unnamed
            for batch, result in classify(client, args, photos, failures):
                if class_names is not None:
                    check_classes(result, args, class_names, category_of)
                for i, path in enumerate(batch):
                    if print_photo(path, result, i, args, class_names):
                        named = result.named_ranks
            if named is not None:
                what = f"its top {named} classes" if named > 1 else "its top class" if named else "no class"
                print(f"carclf predict: note: {args.model} names only {what}; give --classes classes.json to "
                      "name the other ranks", file=sys.stderr)
    if failures:
        print(f"carclf predict: {len(failures)} of {len(photos)} photos could not be classified (see above)",
              file=sys.stderr)
        return 1
    return 0


def check_submission_ids(photos: Sequence[Path]) -> None:
    """A submission's Ids are the photos' file names: two photos of one name (from two folders) are refused."""
    seen: dict[str, Path] = {}
    for photo in photos:
        if photo.name in seen:
            raise InvalidInput(f"two photos are named {photo.name!r} ({seen[photo.name]} and {photo}): a "
                               "submission's Ids (the file names) must differ")
        seen[photo.name] = photo


def describe_run(model: str, version: int | None, version_label: str | None,
                 category_of: dict[str, str] | None) -> RunLine:
    """The options that decide a run's rows, as its partial file's first line records them: the model, the
    version or label asked for, and the classes file's mapping (its digest: the rows hold its category ids)."""
    words = [f"--model {model}"]
    if version is not None:
        words.append(f"--version {version}")
    if version_label is not None:
        words.append(f"--version-label {version_label}")
    if category_of is not None:
        digest = hashlib.sha256(json.dumps(category_of, sort_keys=True).encode()).hexdigest()[:12]
        words.append(f"--classes sha256:{digest}")
    return RunLine("carclf predict", one_line(" ".join(words)), named="--model, --version, --version-label and "
                   "--classes", output_flag="--output", verb="send")


def write_submission(client, args, kept: PartialSubmission, category_of: dict[str, str] | None,
                     failures: Failures) -> None:
    """Classify the photos ``kept`` lacks (an earlier run's rows), keeping each answer in its partial file as it
    comes; once all are answered, write the submission whole and remove the partial file."""
    from tqdm import tqdm

    rest = kept.rest
    answers = (classify(client, args, rest, failures, output_filter=(contract.OUTPUT_CLASS_ID, contract.OUTPUT_LABEL))
               if rest else iter(()))  # all answered before a kill: not even the model is asked for
    with kept.keeping(note), tqdm(total=len(kept.photos), initial=kept.resumed, desc=f"predict {args.model}",
                                   unit="photo", file=sys.stderr) as bar:
        for batch, result in answers:
            ids = np.asarray(result.outputs[contract.OUTPUT_CLASS_ID]).reshape(-1)
            rows = []
            for path, class_id, label in zip(batch, ids, result.labels, strict=True):
                category = (str(int(class_id)) if category_of is None
                            else category_for(label, category_of, args.classes))
                rows.append((path.name, category))
            kept.add(rows)
            bar.update(len(batch))
        bar.update(len(failures))  # done with too, though not classified
    count = kept.finish()
    photos = "1 photo" if len(failures) == 1 else f"{len(failures)} photos"
    missing = f"; {photos} missing, see the errors above" if failures else ""
    print(f"wrote {count} predictions to {kept.output}{missing}")


def print_photo(path: Path, result, i: int, args, class_names: list[str] | None) -> bool:
    """Print one photo's answer; True when some rank could only be shown as ``class <id>``."""
    top = result.top_k(args.top_k, class_names)[i]
    unnamed = class_names is None and len(top) > result.named_ranks
    outputs = result.outputs
    members = []
    if "member_names" in outputs:
        for j, name in enumerate(outputs["member_names"][i]):
            answered = bool(outputs["member_answered"][i][j]) if "member_answered" in outputs else True
            probs = np.asarray(outputs["member_probabilities"][i][j]) if "member_probabilities" in outputs else None
            members.append({
                "model": str(name),
                "answered": answered,
                # a member that did not answer has no version or label (the tensors hold 0 and "" there)
                "version": int(outputs["member_versions"][i][j]) if answered and "member_versions" in outputs
                else None,
                "label": str(outputs["member_labels"][i][j]) if answered and "member_labels" in outputs else None,
                "probability": float(probs.max()) if answered and probs is not None else None,
                "latency_ms": round(float(outputs["member_latency_ms"][i][j]), 1)
                if "member_latency_ms" in outputs else None,
            })
    degraded = bool(np.asarray(outputs["degraded"]).reshape(-1)[i]) if "degraded" in outputs else False
    if args.json:
        print(json.dumps({"photo": str(path), "model": result.model_name, "version": result.version,
                          "top_k": [{"label": n, "probability": round(p, 6)} for n, p in top],
                          "members": members, "degraded": degraded,
                          "latency_ms": round(result.latency_ms, 1)}))
        return False
    version = f" v{result.version}" if result.version is not None else ""
    note = "  [degraded: some members did not answer]" if degraded else ""
    batch = len(result.probabilities)
    request = f"{result.latency_ms:.0f} ms" + (f" for a request of {batch} photos" if batch > 1 else "")
    print(f"{path}  ({result.model_name}{version}, {request}){note}")
    width = max(len(n) for n, _ in top)
    for rank, (name, prob) in enumerate(top, 1):
        print(f"  {rank}. {name:<{width}}  {prob:6.1%}")
    if args.verbose and members:
        for m in members:
            if m["answered"]:  # an ensemble may leave some member outputs out of its config
                version = f" v{m['version']}" if m["version"] is not None else ""
                details = [f"{m['probability']:.1%}" if m["probability"] is not None else "",
                           f"{m['latency_ms']:.0f} ms" if m["latency_ms"] is not None else ""]
                shown = ", ".join(d for d in details if d)
                print(f"     vote {m['model']}{version}: {m['label'] if m['label'] is not None else 'answered'}"
                      + (f" ({shown})" if shown else ""))
            else:
                print(f"     vote {m['model']}: no answer")
    return unnamed
