"""``carclf predict`` against the embedded server: printed answers, the submission CSV, clear errors."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from carclf import cli
from carclf.clients import connect
from carclf.errors import InvalidInput
from tests.clients.predict_stubs import Refusal, backbone_answer, own_lines, stub_prediction_service
from tests.ensemble.servers import grpc_url, rest_url

REPO = Path(__file__).resolve().parents[2]


def carclf(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "carclf", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env)


def test_photos_print_top_k_and_member_votes(tiny_ensemble_server, photos):
    chosen = [str(p) for p in photos[:3]]
    run = carclf("predict", *chosen, "--server", grpc_url(tiny_ensemble_server), "--model", "tiny_ensemble",
                 "--top-k", "2", "--verbose", "--json")
    assert run.returncode == 0, run.stderr
    answers = [json.loads(line) for line in run.stdout.splitlines()]
    with connect(rest_url(tiny_ensemble_server)) as client:
        want = client.predict("tiny_ensemble", images=[Path(p).read_bytes() for p in chosen])
    for i, answer in enumerate(answers):
        assert answer["photo"] == chosen[i] and answer["model"] == "tiny_ensemble" and answer["version"] == 1
        assert [t["label"] for t in answer["top_k"]] == [name for name, _ in want.top_k(2)[i]]
        assert [t["probability"] for t in answer["top_k"]] == pytest.approx([p for _, p in want.top_k(2)[i]], abs=1e-6)
        assert [(m["model"], m["version"], m["label"]) for m in answer["members"]] == [
            ("tiny_a", 2, want.outputs["member_labels"][i][0]), ("tiny_b", 1, want.outputs["member_labels"][i][1])]
        assert answer["degraded"] is False


def test_text_output_and_a_folder_submission(tiny_ensemble_server, sample_dir, tmp_path):
    folder = sample_dir / "test_upload"
    out = tmp_path / "sub" / "submission.csv"
    run = carclf("predict", str(folder), "--server", rest_url(tiny_ensemble_server), "--model", "tiny_ensemble",
                 "--output", str(out), "--batch-size", "4", "--classes", str(sample_dir / "classes.json"))
    assert run.returncode == 0, run.stderr
    assert "wrote 10 predictions" in run.stdout and "photo" in run.stderr  # the tqdm bar
    rows = list(csv.reader(out.open()))
    photos = sorted(folder.glob("*.jpg"))
    assert rows[0] == ["Id", "Category"] and [r[0] for r in rows[1:]] == [p.name for p in photos]
    with connect(grpc_url(tiny_ensemble_server)) as client:
        ids = client.predict("tiny_ensemble", images=[p.read_bytes() for p in photos]).outputs["class_id"]
    classes = json.loads((sample_dir / "classes.json").read_text())
    names = [classes[k] for k in sorted(classes, key=int)]
    assert [r[1] for r in rows[1:]] == [next(k for k, v in classes.items() if v == names[i]) for i in np.asarray(ids)]

    text = carclf("predict", str(photos[0]), "--server", grpc_url(tiny_ensemble_server), "--model", "tiny_a",
                  "--top-k", "3", "--classes", str(sample_dir / "classes.json"))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"{photos[0]}  (tiny_a v2, ") and len(lines) == 4
    assert lines[1].strip().startswith("1. ") and lines[1].strip().endswith("%")


def test_bad_photo_gets_one_clear_line_and_the_others_are_classified(tiny_ensemble_server, tmp_path, photos):
    bad = tmp_path / "notes.jpg"
    bad.write_text("these are not pixels")
    run = carclf("predict", str(photos[0]), str(bad), "--server", grpc_url(tiny_ensemble_server),
                 "--model", "tiny_ensemble")
    assert run.returncode == 1
    assert run.stdout.startswith(f"{photos[0]}  (tiny_ensemble v1, ")  # the good photo is answered
    assert own_lines(run.stderr) == [
        f"carclf predict: error: {bad}: data is not a recognised image (20 bytes; first bytes b'these ar')",
        "carclf predict: 1 of 2 photos could not be classified (see above)"]


@pytest.mark.parametrize("model", ["tiny_ensemble", "tiny_a"])
def test_a_truncated_photo_the_server_refuses_is_named_and_the_rest_stillanswer(tiny_ensemble_server, tmp_path,
                                                                                 photos, sample_dir, model):
    """The header reads fine locally; only decoding on the server fails. Its batch is sent again photo by
    photo, so the file is named and every other photo gets its answer (printed, and in the CSV)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    good = [folder / p.name for p in photos[:4]]
    for source, target in zip(photos[:4], good, strict=True):
        target.write_bytes(source.read_bytes())
    cut = folder / "cut.jpg"
    cut.write_bytes(photos[4].read_bytes()[:photos[4].stat().st_size // 3])
    chosen = [str(good[0]), str(cut), *map(str, good[1:])]
    run = carclf("predict", *chosen, "--server", rest_url(tiny_ensemble_server), "--model", model,
                 "--batch-size", "3", "--json")
    assert run.returncode == 1, run.stderr
    answers = [json.loads(line) for line in run.stdout.splitlines()]
    assert [a["photo"] for a in answers] == [str(p) for p in good]
    with connect(grpc_url(tiny_ensemble_server)) as client:
        want = client.predict(model, images=[p.read_bytes() for p in good])
    assert [a["top_k"][0]["label"] for a in answers] == [name for (name, _), *_ in want.top_k(3)]
    errors = own_lines(run.stderr)
    assert len(errors) == 2 and errors[0].startswith(f"carclf predict: error: {cut}: ")
    assert "jpeg" in errors[0].lower() and "Detected at" not in run.stderr and "Traceback" not in run.stderr
    assert errors[1] == "carclf predict: 1 of 5 photos could not be classified (see above)"

    out = tmp_path / "submission.csv"
    folder_run = carclf("predict", str(folder), "--server", grpc_url(tiny_ensemble_server), "--model", model,
                        "--output", str(out), "--batch-size", "8", "--classes", str(sample_dir / "classes.json"))
    assert folder_run.returncode == 1, folder_run.stderr
    assert "wrote 4 predictions" in folder_run.stdout and "1 photo missing" in folder_run.stdout
    assert f"carclf predict: error: {cut}: " in folder_run.stderr
    assert sorted(row[0] for row in list(csv.reader(out.open()))[1:]) == sorted(p.name for p in good)


def test_a_batch_above_the_servers_limit_falls_back_to_one_photo_per_request(tiny_ensemble_server, photos):
    from carclf.ensemble.config import load_config

    limit = load_config(tiny_ensemble_server.options.ensemble_config_file[0]).max_batch_size
    many = [str(photos[i % len(photos)]) for i in range(limit + 1)]
    run = carclf("predict", *many, "--server", grpc_url(tiny_ensemble_server), "--model", "tiny_ensemble",
                 "--batch-size", str(limit + 1), "--json", timeout=300)
    assert run.returncode == 0, run.stderr
    assert [json.loads(line)["photo"] for line in run.stdout.splitlines()] == many
    assert f"the server refused {limit + 1} photos in one request" in run.stderr
    assert "sending one photo per request from now on" in run.stderr


@pytest.mark.parametrize("args,message", [
    (["missing.jpg"], "no such photo or folder: 'missing.jpg'"),
    (["{photo}", "--server", "tcp://x:1"], "server address must start with grpc://"),
    (["{photo}", "--top-k", "0"], "--top-k must be >= 1"),
    (["{photo}", "--timeout", "0"], "--timeout must be > 0 seconds and at most 86400, received 0.0"),
    (["{photo}", "--retries", "-1"], "--retries must be 0..10, received -1"),
    (["{photo}", "--retries", "11"], "--retries must be 0..10, received 11"),
    (["{photo}", "--server", "{grpc}", "--model", "tiny_a", "--batch-size", "0"], "--batch-size must be >= 1, "
                                                                                  "received 0"),
    (["{photo}", "--server", "{grpc}", "--model", "nope"], "Servable not found for request: Latest(nope)"),
    (["{photo}", "--server", "{rest}", "--model", "nope"], "Servable not found for request: Latest(nope)"),
    (["{photo}", "--server", "{rest}", "--version-label", "nolabel", "--model", "tiny_a"],
     "Unrecognized servable version label: nolabel"),
    (["{photo}", "--classes", "{missing_classes}"], "does not exist"),
    (["{empty_folder}"], "has no photos"),
    (["{nested_folder}"], "has no photos (.jpg, .jpeg, .png, .bmp, .gif, .webp); its folder 'inner' has them: pass "
                          "'{nested_folder}/inner'"),
    (["{photo}", "--json", "--verbose", "--output", "{out}"],
     "--json and --verbose print each photo, --output writes a submission CSV: give one or the other"),
])
def test_user_errors_are_one_line(tiny_ensemble_server, photos, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "nested" / "inner").mkdir(parents=True)
    (tmp_path / "nested" / "inner" / photos[0].name).write_bytes(photos[0].read_bytes())
    values = {"photo": str(photos[0]), "grpc": grpc_url(tiny_ensemble_server), "rest": rest_url(tiny_ensemble_server),
              "missing_classes": str(tmp_path / "classes.json"), "empty_folder": str(tmp_path / "empty"),
              "nested_folder": str(tmp_path / "nested"), "out": str(tmp_path / "out.csv")}
    assert cli.main(["predict", *[a.format(**values) for a in args]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("carclf predict: error: ") and message.format(**values) in err[0], err


def test_server_down_is_one_line(capsys, photos):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli.main(["predict", str(photos[0]), "--server", f"http://127.0.0.1:{port}", "--timeout", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach" in err[0] and "connection refused" in err[0]  # not tried again


def test_a_backbone_without_classes_names_its_top_class_and_says_how_to_name_the_rest(tiny_ensemble_server,
                                                                                      photos):
    run = carclf("predict", str(photos[0]), "--server", grpc_url(tiny_ensemble_server), "--model", "tiny_a",
                 "--top-k", "2")
    assert run.returncode == 0, run.stderr
    with connect(grpc_url(tiny_ensemble_server)) as client:
        answer = client.predict("tiny_a", images=[photos[0].read_bytes()])
    second = int(np.argsort(-answer.probabilities[0], kind="stable")[1])
    lines = run.stdout.splitlines()
    assert lines[1].strip().startswith(f"1. {answer.labels[0]} ")
    assert lines[2].strip().startswith(f"2. class {second} ")
    assert own_lines(run.stderr) == ["carclf predict: note: tiny_a names only its top class; give --classes "
                                     "classes.json to name the other ranks"]


def write_classes(path: Path, names: list[str]) -> Path:
    path.write_text(json.dumps({str(i): name for i, name in enumerate(names)}), encoding="utf-8")
    return path


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("carclf predict: error: "), err
    return err[0]


def test_the_servers_names_win_over_a_classes_file(tiny_ensemble_server, photos, labels, tmp_path, capsys):
    """A classes file in another order than the model's labels names no rank the server named: the
    ensemble's top_k_labels and a backbone's top label are printed as the server sent them. Where the file
    would name other ranks by class index, its order is checked and a wrong one refused, naming the file."""
    reordered = write_classes(tmp_path / "reordered.json", labels[::-1])
    url = grpc_url(tiny_ensemble_server)
    with connect(url) as client:
        want = {m: client.predict(m, images=[photos[0].read_bytes()]) for m in ("tiny_ensemble", "tiny_a")}
    for model, k in (("tiny_ensemble", "3"), ("tiny_a", "1")):
        code = cli.main(["predict", str(photos[0]), "--server", url, "--model", model, "--top-k", k, "--json",
                         "--classes", str(reordered)])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert [t["label"] for t in json.loads(out)["top_k"]] == [n for n, _ in want[model].top_k(int(k))[0]]

    assert cli.main(["predict", str(photos[0]), "--server", url, "--model", "tiny_a", "--top-k", "3",
                     "--classes", str(reordered)]) == 2
    line = one_error(capsys)
    assert str(reordered) in line and "must list the model's classes in its order" in line

    right = write_classes(tmp_path / "classes.json", labels)  # the model's order: the file names ranks 2 and 3
    assert cli.main(["predict", str(photos[0]), "--server", url, "--model", "tiny_a", "--top-k", "3", "--json",
                     "--classes", str(right)]) == 0
    out, err = capsys.readouterr()
    order = np.argsort(-want["tiny_a"].probabilities[0], kind="stable")[:3]
    assert [t["label"] for t in json.loads(out)["top_k"]] == [labels[int(i)] for i in order] and err == ""


@pytest.mark.parametrize("model", ["tiny_ensemble", "tiny_a"])
def test_a_classes_file_without_the_servers_label_is_refused_in_print_mode_too(tiny_ensemble_server, photos,
                                                                              labels, tmp_path, capsys, model):
    url = rest_url(tiny_ensemble_server)
    with connect(url) as client:
        label = client.predict(model, images=[photos[0].read_bytes()]).labels[0]
    lacking = write_classes(tmp_path / "classes.json", [n if n != label else "Not A Car 1900" for n in labels])
    assert cli.main(["predict", str(photos[0]), "--server", url, "--model", model, "--top-k", "1",
                     "--classes", str(lacking)]) == 2
    assert one_error(capsys) == (f"carclf predict: error: {lacking}: the server's label {label!r} is not in the "
                                 "classes file")
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / photos[0].name).write_bytes(photos[0].read_bytes())
    out = tmp_path / "submission.csv"
    assert cli.main(["predict", str(folder), "--server", url, "--model", model, "--classes", str(lacking),
                     "--output", str(out)]) == 2  # folder mode: the same refusal
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("is not in the classes file")
    assert not out.exists() and not (tmp_path / "submission.csv.tmp").exists()


def test_a_classes_file_with_fewer_classes_than_the_model_is_one_line(tiny_ensemble_server, photos, labels,
                                                                     tmp_path, capsys):
    url = grpc_url(tiny_ensemble_server)
    with connect(url) as client:
        result = client.predict("tiny_a", images=[photos[0].read_bytes()])
    short = write_classes(tmp_path / "classes.json", [result.labels[0], "Not A Car 1900"])
    assert cli.main(["predict", str(photos[0]), "--server", url, "--model", "tiny_a", "--top-k", "3",
                     "--classes", str(short)]) == 2
    assert one_error(capsys) == f"carclf predict: error: {short}: holds 2 classes, the model answers 10"
    with pytest.raises(InvalidInput, match="2 class names given, the model answers 10 classes"):
        result.top_k(3, ["a", "b"])


def test_an_unusable_output_is_refused_before_any_photo_is_sent(tiny_ensemble_server, sample_dir, tmp_path,
                                                                 capsys):
    folder, url = sample_dir / "test_upload", grpc_url(tiny_ensemble_server)
    taken = tmp_path / "results"
    taken.mkdir()
    assert cli.main(["predict", str(folder), "--server", url, "--model", "tiny_a", "--output", str(taken)]) == 2
    line = one_error(capsys)  # one line: no progress bar, nothing was classified
    assert line.startswith(f"carclf predict: error: --output {str(taken)!r} is a folder")
    assert list(taken.iterdir()) == [] and not (tmp_path / "results.tmp").exists()

    note = tmp_path / "notes.txt"
    note.write_text("a file")
    under = note / "submission.csv"
    assert cli.main(["predict", str(folder), "--server", url, "--model", "tiny_a", "--output", str(under)]) == 2
    assert one_error(capsys) == (f"carclf predict: error: --output {str(under)!r} cannot be created: "
                                 f"{str(note)!r} is a file, not a folder")
    assert note.read_text() == "a file" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "results"]


def test_write_submission_leaves_nothing_half_written_and_names_the_given_path(tmp_path):
    from carclf.submission import write_submission

    taken = tmp_path / "taken"
    taken.mkdir()
    with pytest.raises(InvalidInput, match="submission '.*taken' is a folder"):
        write_submission(taken, [("a.jpg", "1")])
    out = tmp_path / "sub.csv"

    def rows():  # the destination becomes a folder while the rows are written: the final rename fails
        yield "a.jpg", "1"
        out.mkdir()
        yield "b.jpg", "2"

    with pytest.raises(OSError) as caught:
        write_submission(out, rows())
    assert caught.value.filename == str(out) and "cannot write the submission" in caught.value.strerror
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.csv", "taken"] and list(out.iterdir()) == []


def test_photos_with_output_write_the_csv(tiny_ensemble_server, photos, sample_dir, tmp_path, capsys):
    chosen, out = photos[:3], tmp_path / "x.csv"
    assert cli.main(["predict", *map(str, chosen), "--server", rest_url(tiny_ensemble_server), "--model",
                     "tiny_ensemble", "--output", str(out), "--classes", str(sample_dir / "classes.json")]) == 0
    assert f"wrote 3 predictions to {out}" in capsys.readouterr().out
    with connect(grpc_url(tiny_ensemble_server)) as client:
        ids = client.predict("tiny_ensemble", images=[p.read_bytes() for p in chosen]).outputs["class_id"]
    rows = list(csv.reader(out.open()))
    assert rows == [["Id", "Category"], *([p.name, str(int(i))] for p, i in zip(chosen, ids, strict=True))]
    assert [p.name for p in tmp_path.iterdir()] == ["x.csv"]


def test_ranks_past_the_ensembles_names_get_the_note_and_k_stops_at_the_class_count(tiny_ensemble_server, photos,
                                                                                   labels, tmp_path, capsys):
    url = grpc_url(tiny_ensemble_server)
    assert cli.main(["predict", str(photos[0]), "--server", url, "--model", "tiny_ensemble", "--top-k", "100"]) == 0
    out, err = capsys.readouterr()
    ranks = out.splitlines()[1:]
    with connect(url) as client:
        want = client.predict("tiny_ensemble", images=[photos[0].read_bytes()])
    order = np.argsort(-want.probabilities[0], kind="stable")
    assert len(ranks) == 10 and [r.split(". ", 1)[1].rsplit("  ", 1)[0].strip() for r in ranks] == [
        *(str(x) for x in want.outputs["top_k_labels"][0]), *(f"class {int(i)}" for i in order[3:])]
    assert err.splitlines() == ["carclf predict: note: tiny_ensemble names only its top 3 classes; give --classes "
                                "classes.json to name the other ranks"]

    classes = write_classes(tmp_path / "classes.json", labels)
    assert cli.main(["predict", str(photos[0]), "--server", url, "--model", "tiny_ensemble", "--top-k", "100",
                     "--classes", str(classes), "--json"]) == 0
    out, err = capsys.readouterr()
    assert [t["label"] for t in json.loads(out)["top_k"]] == [labels[int(i)] for i in order] and err == ""


def test_a_root_cert_that_is_not_pem_is_refused_before_connecting(tiny_ensemble_server, photos, tmp_path):
    bad = tmp_path / "ca.der"
    bad.write_bytes(b"\x30\x82\x01\x0a not a PEM file")
    port = grpc_url(tiny_ensemble_server).rsplit(":", 1)[1]
    run = carclf("predict", str(photos[0]), "--server", f"grpcs://127.0.0.1:{port}", "--model", "tiny_a",
                 "--root-cert", str(bad), "--timeout", "5")
    assert run.returncode == 2
    assert own_lines(run.stderr) == [f"carclf predict: error: --root-cert {str(bad)!r} holds no PEM certificate "
                                     "(no '-----BEGIN CERTIFICATE-----' line)"]
    assert "handshaker" not in run.stderr and "Traceback" not in run.stderr


def test_a_folder_never_replaces_a_submission_nobody_named(tmp_path, photos, monkeypatch, capsys):
    """A folder without --output writes submission.csv in the working folder, but not over an existing one:
    that is refused before anything is sent, and the file is left as it was."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / photos[0].name).write_bytes(photos[0].read_bytes())
    monkeypatch.chdir(tmp_path)
    precious = tmp_path / "submission.csv"
    precious.write_text("Id,Category\nmine.jpg,3\n")
    assert cli.main(["predict", str(folder), "--server", "grpc://127.0.0.1:9"]) == 2  # no server is needed
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == ("carclf predict: error: submission.csv exists: give --output PATH for the submission of a "
                    "folder (--output submission.csv replaces it)")
    assert precious.read_text() == "Id,Category\nmine.jpg,3\n"


@pytest.mark.parametrize("asked", [("--version", "1"), ("--version-label", "canary")], ids=["version", "label"])
@pytest.mark.parametrize("transport", ["grpc", "rest"])
def test_the_version_asked_for_is_the_version_that_answers(tiny_ensemble_server, photos, capsys, transport, asked):
    """tiny_a serves versions 1 and 2, which answer differently: --version 1, or --version-label canary (the
    shared server's label of version 1; stable is 2, the latest), gets version 1's probabilities (and, over gRPC,
    whose answers name their version, says version 1)."""
    from tests.ensemble.servers import TINY_LABELS

    if asked[0] == "--version-label":
        assert TINY_LABELS["tiny_a"][asked[1]] == 1  # the label names the version that is not the latest
    url = grpc_url(tiny_ensemble_server) if transport == "grpc" else rest_url(tiny_ensemble_server)
    assert cli.main(["predict", str(photos[0]), "--server", url, "--model", "tiny_a", "--json", "--top-k", "10",
                     *asked]) == 0
    answer = json.loads(capsys.readouterr().out.splitlines()[0])
    got = [t["probability"] for t in answer["top_k"]]  # ranked
    with connect(grpc_url(tiny_ensemble_server)) as client:
        by_version = {v: client.predict("tiny_a", images=[photos[0].read_bytes()], version=v) for v in (1, 2)}
    want = {v: np.sort(r.probabilities[0])[::-1] for v, r in by_version.items()}
    assert np.abs(want[1] - want[2]).max() > 1e-4  # the versions can be told apart
    np.testing.assert_allclose(got, want[1], atol=1e-6)
    if transport == "grpc":
        assert answer["version"] == 1


def test_a_folder_with_json_prints_its_photos_and_writes_no_submission(tiny_ensemble_server, sample_dir, tmp_path):
    """--json (or --verbose) asks to print: a folder then prints one JSON object per photo, in the folder's
    order, instead of writing submission.csv (which used to happen, the flag dropped without a word)."""
    folder = sample_dir / "test_upload"
    run = subprocess.run([sys.executable, "-m", "carclf", "predict", str(folder), "--server",
                          grpc_url(tiny_ensemble_server), "--model", "tiny_ensemble", "--json"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    answers = [json.loads(line) for line in run.stdout.splitlines()]
    photos = sorted(folder.glob("*.jpg"))
    assert [a["photo"] for a in answers] == [str(p) for p in photos]
    with connect(grpc_url(tiny_ensemble_server)) as client:
        want = client.predict("tiny_ensemble", images=[p.read_bytes() for p in photos])
    assert [a["top_k"][0]["label"] for a in answers] == list(want.labels)
    assert not (tmp_path / "submission.csv").exists()


def test_a_member_that_did_not_answer_has_no_version_or_label_in_json(tiny_repository_template, photos, tmp_path,
                                                                      capsys):
    """--json of a degraded answer: the member that did not answer reads version and label null (the tensors
    hold 0 and "" there), not version 0 and label ""."""
    from carclf.ensemble.config import render
    from tests.ensemble.servers import TINY_ENSEMBLE_PARAMETERS, embedded_server

    config = tmp_path / "degraded" / "config.pbtxt"
    config.parent.mkdir()
    parameters = {k: v for k, v in TINY_ENSEMBLE_PARAMETERS.items() if k != "weight.tiny_b"}
    config.write_text(render("degraded", ["tiny_a", "tiny_gone"], parameters=parameters))
    with embedded_server(tiny_repository_template, tmp_path / "server", ensembles=[config]) as server:
        assert cli.main(["predict", str(photos[0]), "--server", grpc_url(server), "--model", "degraded",
                         "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["degraded"] is True
    (present, missing) = answer["members"]
    assert present["answered"] is True and present["version"] == 2 and present["label"]
    assert missing == {"model": "tiny_gone", "answered": False, "version": None, "label": None,
                       "probability": None, "latency_ms": missing["latency_ms"]}


@pytest.mark.parametrize("scheme", ["grpc", "http"])
def test_a_server_that_never_answers_ends_the_run_after_the_timeout_in_one_line(capsys, photos, scheme):
    """--timeout is the time each request may take: a server that accepts the connection and then says nothing
    ends the run in one line naming it and the time waited, soon after --timeout, not after the 30 s default."""
    import socket
    import time

    with socket.socket() as listener:  # accepts connections (the kernel's backlog) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        started = time.monotonic()
        code = cli.main(["predict", str(photos[0]), "--server", f"{scheme}://127.0.0.1:{port}", "--model", "tiny_a",
                         "--timeout", "0.5"])
        waited = time.monotonic() - started
    assert code == 2
    target = f"127.0.0.1:{port}" if scheme == "grpc" else f"http://127.0.0.1:{port}"
    assert one_error(capsys) == f"carclf predict: error: no answer from {target} within 0.5 s"
    assert waited < 20  # a generous bound: well under the 30 s default


def test_a_classes_file_saved_with_a_byte_order_mark_reads(tmp_path):
    """A classes.json that an editor saved with a UTF-8 byte order mark names the classes like one without."""
    from carclf.clients.commands.predict import read_classes

    plain, marked = tmp_path / "plain.json", tmp_path / "marked.json"
    plain.write_text(json.dumps({"0": "GMC Savana", "1": "Jaguar F-Type"}))
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert read_classes(marked) == read_classes(plain) == (["GMC Savana", "Jaguar F-Type"],
                                                           {"GMC Savana": "0", "Jaguar F-Type": "1"})


def test_a_classes_file_key_of_other_digits_reads_as_a_name_not_a_traceback(tmp_path):
    """'²' passes ``str.isdigit`` but not ``int``: the classes file ended in a ValueError traceback. Category ids
    made of ASCII digits come first, in their numeric order; other keys after them."""
    from carclf.clients.commands.predict import read_classes

    path = tmp_path / "classes.json"
    path.write_text(json.dumps({"\u00b2": "Squared", "10": "Ten", "2": "Two"}))
    assert read_classes(path) == (["Two", "Ten", "Squared"], {"Two": "2", "Ten": "10", "Squared": "\u00b2"})


OTHER_OUTPUTS = {  # what a server might answer for the photos sent: none of it is what `carclf predict` can show
    "another_models_outputs": lambda sent: {"scores": np.full((len(sent), 2), 0.5, dtype=np.float32),
                                            "classes": np.zeros((len(sent), 2), dtype=np.int64)},
    "no_class_id": lambda sent: backbone_answer(len(sent), drop=("class_id",)),
    "no_probabilities": lambda sent: backbone_answer(len(sent), drop=("probabilities",)),
    "one_row_for_three_photos": lambda sent: backbone_answer(len(sent), rows=1),
    "probabilities_as_text": lambda sent: backbone_answer(
        len(sent), probabilities=lambda rows: np.array([[b"high", b"low"]] * rows, dtype=object)),
    "probabilities_one_dimensional": lambda sent: backbone_answer(
        len(sent), probabilities=lambda rows: np.full(rows, 0.75, dtype=np.float32)),
    "probabilities_cut_short": lambda sent: {**backbone_answer(len(sent)), "probabilities": _cut_short(len(sent))},
}


def _cut_short(rows: int):
    """A float TensorProto of shape [rows, 2] whose content holds 5 bytes instead of rows * 8."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=rows),
                                                   tensor_shape_pb2.TensorShapeProto.Dim(size=2)])
    return tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=shape, tensor_content=b"\x00" * 5)


# print mode shows probabilities and labels; the CSV needs class_id and label
@pytest.mark.parametrize("answer,mode", [
    ("another_models_outputs", "print"), ("another_models_outputs", "csv"), ("no_class_id", "csv"),
    ("no_probabilities", "print"), ("one_row_for_three_photos", "print"), ("one_row_for_three_photos", "csv"),
    ("probabilities_as_text", "print"), ("probabilities_one_dimensional", "print"),
    ("probabilities_cut_short", "print"),
])
def test_an_answer_without_the_outputs_a_photo_needs_is_one_line_and_exit_2(photos, tmp_path, capsys, answer,
                                                                            mode):
    """--model naming a model that takes photos but answers other outputs (another team's classifier on the
    same TF Serving: scores/classes), or a server answering fewer rows or other dtypes than asked: the run
    stops in one line naming what is missing, exit 2 (an error that is not about one photo), not a KeyError /
    IndexError / ValueError traceback with exit 1 (which reads as "some photos could not be classified"), and
    not one error line per photo blaming each file for the server's answer (a TensorProto cut short read as
    "photo.jpg: input 'probabilities': tensor parsing error", after sending every photo again alone)."""
    chosen = [str(p) for p in photos[:3]]
    output = ["--output", str(tmp_path / "out.csv")] if mode == "csv" else []
    with stub_prediction_service(OTHER_OUTPUTS[answer]) as url:
        code = cli.main(["predict", *chosen, "--server", url, "--model", "other", *output])
    assert code == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if "photo/s]" not in line]  # no bar
    assert len(lines) == 1 and lines[0].startswith("carclf predict: error: model 'other'" if mode == "csv" and
                                                   answer != "one_row_for_three_photos"
                                                   else "carclf predict: error: the answer of "), lines
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("url", [grpc_url, rest_url], ids=["grpc", "rest"])
def test_a_request_refused_for_its_bytes_goes_on_one_photo_per_request(tiny_repository_template, photos, tmp_path,
                                                                      capsys, url):
    """Every photo fits the server's --max_request_bytes, but --batch-size of them together do not (8 phone
    photos of 7.5 MB, 80 MB as REST's base64, against the default 64 MiB): as for a request refused for its
    photo count, the rest go one photo per request with a note, and every photo is answered. The run used to
    stop at the first request (413 over REST, RESOURCE_EXHAUSTED over gRPC), exit 2, with no photo answered."""
    from tests.ensemble.servers import embedded_server

    chosen = photos[:4]
    largest = max(p.stat().st_size for p in chosen)
    limit = largest * 2 + 4096  # one photo per request passes, as base64 JSON too; four together do not
    assert sum(p.stat().st_size for p in chosen) > limit
    with embedded_server(tiny_repository_template, tmp_path / "server", models=["tiny_a"],
                         max_request_bytes=limit) as server:
        code = cli.main(["predict", *map(str, chosen), "--server", url(server), "--model", "tiny_a", "--json",
                         "--batch-size", "4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert [json.loads(line)["photo"] for line in captured.out.splitlines()] == [str(p) for p in chosen]
    assert "sending one photo per request from now on" in captured.err


@pytest.mark.parametrize("url", [grpc_url, rest_url], ids=["grpc", "rest"])
@pytest.mark.parametrize("timeout", ["inf", "1e300"])
def test_a_timeout_too_large_to_be_a_deadline_is_refused_or_means_no_limit(tiny_ensemble_server, photos, capsys,
                                                                          url, timeout):
    """--timeout inf (a natural way to ask for no limit) or a huge number: the photo is classified, or the flag
    is refused in one line naming it, as --timeout 0 is. gRPC said at once "no answer from ... within inf s"
    (no request had waited); REST ended in an OverflowError traceback from the socket layer."""
    code = cli.main(["predict", str(photos[0]), "--server", url(tiny_ensemble_server), "--model", "tiny_a",
                     "--timeout", timeout])
    captured = capsys.readouterr()
    if code == 0:
        assert captured.out.startswith(f"{photos[0]}  (tiny_a v2, ")
    else:
        assert code == 2
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("carclf predict: error: --timeout "), err


def test_a_file_name_that_is_not_utf8_does_not_lose_the_folders_submission(tiny_ensemble_server, photos, tmp_path,
                                                                           capsys):
    """A folder unpacked from an old archive holds `Citro\\xebn.jpg` (Latin-1, not UTF-8): every photo was
    classified, then writing the CSV ended in a UnicodeEncodeError traceback, exit 1, and no submission at all.
    One odd name must not cost the other photos their rows (the name written as it is on disk, or the photo
    named on stderr as not classifiable), and never a traceback."""
    import shutil

    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copyfile(photos[0], os.path.join(os.fsencode(folder), b"Citro\xebn.jpg"))
    shutil.copyfile(photos[1], folder / "plain.jpg")
    out = tmp_path / "submission.csv"
    code = cli.main(["predict", str(folder), "--server", grpc_url(tiny_ensemble_server), "--model", "tiny_a",
                     "--output", str(out)])
    assert code in (0, 1), capsys.readouterr().err
    assert out.exists()
    rows = out.read_bytes().splitlines()
    assert rows[0] == b"Id,Category" and any(row.startswith(b"plain.jpg,") for row in rows[1:]), rows


def test_a_server_lost_mid_folder_keeps_the_rows_answered_so_far(photos, tmp_path, capsys):
    """The server goes away at the third request of a three-photo run: the run still stops (exit 2, one line),
    but the two photos it had answered are written to <output>.partial.csv, named in that line, instead of
    being lost with the whole run; the submission itself is not written, being incomplete."""
    calls = []

    def answers(sent: list[bytes]) -> dict:
        calls.append(len(sent))
        if len(calls) > 2:
            raise RuntimeError("the server is going down")
        return backbone_answer(len(sent))

    chosen = [str(p) for p in photos[:3]]
    out = tmp_path / "out.csv"
    with stub_prediction_service(answers) as url:
        code = cli.main(["predict", *chosen, "--server", url, "--model", "other", "--batch-size", "1",
                         "--output", str(out)])
    assert code == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if "photo/s]" not in line]
    partial = tmp_path / "out.partial.csv"
    assert len(lines) == 1 and lines[0].endswith(f"the 2 of 3 photos answered so far are in {partial} (not a whole "
                                                 f"submission; {out} was not written): the same command with "
                                                 "--resume sends only the others"), lines
    assert not out.exists()
    expected = [f"{Path(p).name},{int(backbone_answer(1)['class_id'][0])}" for p in chosen[:2]]
    assert partial.read_text().splitlines() == ["# carclf predict --model other", "Id,Category", *expected]


def test_a_photo_error_during_a_csv_run_starts_its_own_line(tiny_ensemble_server, tmp_path, photos):
    """The progress bar of a CSV run stays on its line; a photo's error printed meanwhile begins a line of its
    own (it was printed after the bar's text, on the bar's line, where neither can be read in a terminal)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for source in photos[:3]:
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "0_not_a_photo.jpg").write_bytes(b"plain text, named like a photo")
    run = carclf("predict", str(folder), "--server", grpc_url(tiny_ensemble_server), "--model", "tiny_a",
                 "--output", str(tmp_path / "out.csv"))
    assert run.returncode == 1, run.stderr
    assert "carclf predict: error: " in run.stderr
    glued = re.findall(r"[^\n\r]carclf predict: error: ", run.stderr)
    assert not glued, repr(run.stderr[-600:])


def test_a_reader_that_stops_reading_ends_the_run_quietly(tiny_ensemble_server, photos):
    """`carclf predict ... --json | head -1`: once the reader has gone, the run stops with SIGPIPE's status (141)
    and says nothing, as Unix tools do; it printed "error: Broken pipe" (exit 2), or a traceback at exit."""
    process = subprocess.Popen([sys.executable, "-m", "carclf", "predict", *map(str, photos[:4]), "--server",
                                grpc_url(tiny_ensemble_server), "--model", "tiny_a", "--json", "--batch-size", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                               env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    process.stdout.close()  # the reader is gone before the first line
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141, stderr
    assert not own_lines(stderr) and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_a_request_the_server_refuses_for_now_is_tried_again(photos, tmp_path, capsys):
    """UNAVAILABLE (a replica shutting down in a rolling update), RESOURCE_EXHAUSTED for a full queue and a
    CANCELLED the client did not ask for (a call sent as the server's shutdown began), once the server has
    answered: the request is tried again after 0.5 s, 1 s, then 2 s, each retry on a line of its own, and the
    run ends whole (exit 0, every photo in the CSV); it stopped at the first such answer (exit 2)."""
    refusals = [Refusal("UNAVAILABLE", "shutting down; try another replica"),
                Refusal("RESOURCE_EXHAUSTED", "the batching queue of model other is full; try again later"),
                Refusal("CANCELLED", "the server ended the call")]
    calls = []

    def answers(sent: list[bytes]) -> dict:
        calls.append(len(sent))
        if len(calls) == 2 and refusals:  # the second photo's request, three times
            calls.pop()
            raise refusals.pop(0)
        return backbone_answer(len(sent))

    chosen = [str(p) for p in photos[:3]]
    out = tmp_path / "out.csv"
    with stub_prediction_service(answers) as url:
        started = time.monotonic()
        code = cli.main(["predict", *chosen, "--server", url, "--model", "other", "--batch-size", "1",
                         "--output", str(out)])
        took = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 0, err
    assert len(out.read_text().splitlines()) == 1 + 3
    retries = [line for line in err.splitlines() if "trying again" in line]
    assert len(retries) == 3, err
    assert re.fullmatch(r"carclf predict: UNAVAILABLE: shutting down; try another replica \(server 127\.0\.0\.1:\d+\); "
                        r"trying again in 0\.5 s \(retry 1 of 3\)", retries[0]), retries
    assert retries[1] == ("carclf predict: RESOURCE_EXHAUSTED: the batching queue of model other is full; try again "
                          "later; trying again in 1 s (retry 2 of 3)"), retries
    assert re.fullmatch(r"carclf predict: UNAVAILABLE: 127\.0\.0\.1:\d+ ended the call before answering it \(the "
                        r"server ended the call\), .*; send it again; trying again in 2 s \(retry 3 of 3\)",
                        retries[2]), retries
    assert took >= 3.5  # the waits were waited


@pytest.mark.parametrize("retries", ["0", "1"])
def test_a_server_still_refusing_after_the_retries_stops_the_run_with_what_was_answered(photos, tmp_path, capsys,
                                                                                     retries):
    """--retries N: after N retries the refusal stops the run as before (exit 2, the rows answered kept in
    <output>.partial.csv); --retries 0 never tries again."""
    calls = []

    def answers(sent: list[bytes]) -> dict:
        calls.append(len(sent))
        if len(calls) > 1:
            raise Refusal("UNAVAILABLE", "shutting down")
        return backbone_answer(len(sent))

    out = tmp_path / "out.csv"
    with stub_prediction_service(answers) as url:
        code = cli.main(["predict", *[str(p) for p in photos[:2]], "--server", url, "--model", "other",
                         "--batch-size", "1", "--output", str(out), "--retries", retries])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(calls) == 2 + int(retries)  # the first photo's request, then the second's tries
    assert sum("trying again" in line for line in err.splitlines()) == int(retries)
    assert (tmp_path / "out.partial.csv").is_file() and not out.exists()



@pytest.fixture
def slim_ensemble_server(tiny_repository_template, tmp_path):
    """An ensemble whose config lists only some outputs (allowed): no top-k probabilities, no member versions,
    probabilities or latencies."""
    from tests.ensemble.servers import SLIM_OUTPUTS, embedded_server, write_ensemble_config

    config = write_ensemble_config(tmp_path, name="slim", outputs=SLIM_OUTPUTS)
    with embedded_server(tiny_repository_template, tmp_path / "server", ensembles=[config]) as server:
        yield server


@pytest.mark.parametrize("url", [grpc_url, rest_url], ids=["grpc", "rest"])
def test_verbose_votes_of_an_ensemble_without_some_member_outputs_print_what_it_answered(slim_ensemble_server, photos,
                                                                                          capsys, url):
    """--verbose printed None's format for a member output the ensemble does not list, and ended in a
    traceback: each vote line shows what the ensemble answered (the member's label) and nothing made up."""
    assert cli.main(["predict", str(photos[0]), "--server", url(slim_ensemble_server), "--model", "slim",
                     "--verbose"]) == 0
    votes = [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("vote ")]
    with connect(grpc_url(slim_ensemble_server)) as client:
        out = client.predict("slim", images=[photos[0].read_bytes()]).outputs
    assert votes == [f"vote {name}: {label}" for name, label in zip(out["member_names"][0], out["member_labels"][0],
                                                                     strict=True)]


@pytest.mark.parametrize("url", [grpc_url, rest_url], ids=["grpc", "rest"])
def test_an_output_filter_naming_an_output_the_signature_lacks_is_refused_on_both_transports(
        tiny_repository_template, photos, tmp_path, url):
    """A one-output model answers REST without the output's name; the REST client took the name the caller
    filtered for, so asking a probabilities-only model for ``label`` returned its probabilities as ``label``.
    Both clients refuse it as the server's gRPC does, refuse a repeated name, and name the one output right."""
    from tests.ensemble.servers import embedded_server, write_ensemble_config

    config = write_ensemble_config(tmp_path, name="only_probs", outputs=("probabilities",))
    image = [photos[0].read_bytes()]
    with embedded_server(tiny_repository_template, tmp_path / "server", ensembles=[config]) as server, \
            connect(url(server)) as client:
        for wrong in (["label"], ["class_id"]):
            with pytest.raises(InvalidInput, match=f"output tensor alias not found in signature: {wrong[0]}"):
                client.predict("only_probs", images=image, output_filter=wrong)
        with pytest.raises(InvalidInput, match="duplicate output tensor alias: probabilities"):
            client.predict("only_probs", images=image, output_filter=["probabilities", "probabilities"])
        answer = client.predict("only_probs", images=image, output_filter=["probabilities"]).outputs
        assert list(answer) == ["probabilities"] and answer["probabilities"].shape[0] == 1
        whole = client.predict("only_probs", images=image).outputs
        assert list(whole) == ["probabilities"]
        np.testing.assert_allclose(whole["probabilities"], answer["probabilities"])


def test_a_photo_name_that_is_not_utf8_prints_as_its_bytes_under_a_strict_utf8_stdout(tiny_ensemble_server, photos,
                                                                                      tmp_path):
    """Under a UTF-8 locale Python's stdout is strict: printing a Latin-1 name (`caf\\xe9.jpg`) ended in a
    UnicodeEncodeError traceback. It prints as its bytes on disk, as the submission CSV writes it."""
    import shutil

    name = os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg")
    shutil.copyfile(photos[0], name)
    run = subprocess.run([sys.executable, "-m", "carclf", "predict", os.fsdecode(name), "--server",
                          grpc_url(tiny_ensemble_server), "--model", "tiny_a", "--top-k", "1"],
                         capture_output=True, timeout=120, cwd=REPO,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONIOENCODING": "utf-8:strict"})
    assert run.returncode == 0, run.stderr.decode("utf-8", "replace")
    first = run.stdout.splitlines()[0]
    assert first.startswith(name + b"  (tiny_a v2, "), first


def test_files_of_a_folder_that_are_not_photos_are_named_not_left_out_silently(tiny_ensemble_server, photos, tmp_path,
                                                                                capsys):
    """A folder's .tif scan, a text file and a broken link named like a photo have no row in the submission:
    one line says how many were left out and names them, so a short CSV does not go unnoticed."""
    import shutil

    from carclf import imaging

    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in photos[:2]:
        shutil.copyfile(photo, folder / photo.name)
    (folder / "notes.txt").write_text("not a photo")
    (folder / "scan.tif").write_bytes(b"II*\x00")
    (folder / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (folder / ".DS_Store").write_bytes(b"\x00")  # hidden: not worth a word
    (folder / "sub").mkdir()
    out = tmp_path / "submission.csv"
    assert cli.main(["predict", str(folder), "--server", grpc_url(tiny_ensemble_server), "--model", "tiny_a",
                     "--output", str(out)]) == 0
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "left out" in line]
    assert said == [f"carclf predict: {folder}: 3 files are not readable photo files and are left out ('gone.jpg', "
                    f"'notes.txt', 'scan.tif'); photos are {', '.join(imaging.PHOTO_SUFFIXES)} files"], err
    assert [row[0] for row in csv.reader(out.open())][1:] == sorted(p.name for p in photos[:2])
    (folder / "gone.jpg").unlink()
    (folder / "scan.tif").unlink()  # one left: said in the singular
    assert cli.main(["predict", str(folder), "--server", grpc_url(tiny_ensemble_server), "--model", "tiny_a",
                     "--output", str(out)]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "left out" in line]
    assert said == [f"carclf predict: {folder}: 1 file is not a readable photo file and is left out ('notes.txt'); "
                    f"photos are {', '.join(imaging.PHOTO_SUFFIXES)} files"]
