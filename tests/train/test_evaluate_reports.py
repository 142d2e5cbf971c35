"""Where ``carclf evaluate`` writes a SavedModel's report when no --out is given: one folder per model version,
so that evaluating one model's version 1 never overwrites another's."""

from __future__ import annotations

import json

from carclf.cli import main as carclf_main


def test_each_model_version_gets_its_own_report_folder(tiny_repository_template, sample_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    targets = {"tiny_a/1": "tiny_a/1", "tiny_b/1": "tiny_b/1", "tiny_a": "tiny_a/2"}  # a model folder: its latest
    for given, folder in targets.items():
        args = ["evaluate", str(tiny_repository_template / given), "--tta", "none", "--all",
                "--data", str(sample_dir / "train")]
        assert carclf_main(args) == 0
        report = json.loads((tmp_path / "reports" / "evaluate" / folder / "eval.json").read_text())
        assert report["model"] == str(tiny_repository_template / folder)
    written = sorted(str(p.parent.relative_to(tmp_path / "reports" / "evaluate"))
                     for p in (tmp_path / "reports" / "evaluate").rglob("eval.json"))
    assert written == sorted(targets.values())


def test_data_whose_class_ids_differ_from_the_models_is_refused(tiny_repository_template, sample_dir, tmp_path,
                                                                 capsys):
    """Class folders numbered 1..10 for a model of classes 0..9: as many classes, other ids. The accuracy would
    compare each photo with another class's output, so the command refuses, naming both lists, and writes nothing."""
    import shutil

    data = tmp_path / "train"
    for folder in sorted((sample_dir / "train").iterdir()):
        shutil.copytree(folder, data / str(int(folder.name) + 1))
    out = tmp_path / "report"
    code = carclf_main(["evaluate", str(tiny_repository_template / "tiny_a"), "--tta", "none", "--all",
                        "--data", str(data), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "has classes ['1', '2'," in err and "the model has ['0', '1'," in err
    assert not out.exists()


def test_data_of_the_same_ids_named_as_other_cars_is_refused(tiny_repository_template, sample_dir, tmp_path, capsys):
    """Another data set numbered 0..9 too (the competition's class 0 is a Lada Priora, cars10's a GMC van): the
    classes.json beside --data tells them apart, so the accuracy is not taken of one set's photos against the
    other's classes; the same names (or no names file) evaluate as before."""
    import shutil

    from carclf.train import evaluate

    data = tmp_path / "other"
    shutil.copytree(sample_dir / "train", data / "train")
    names = json.loads((sample_dir / "classes.json").read_text())
    model = evaluate.load_model(tiny_repository_template / "tiny_a")
    assert model.class_names == [names[cid] for cid in model.class_ids]  # trained on data/sample, named by it
    names["3"] = "Lada Priora"
    (data / "classes.json").write_text(json.dumps(names))
    out = tmp_path / "report"
    args = ["evaluate", str(tiny_repository_template / "tiny_a"), "--tta", "none", "--all",
            "--data", str(data / "train"), "--out", str(out)]
    assert carclf_main(args) == 2
    assert (f"{data / 'classes.json'} names class 3 'Lada Priora', the model {model.class_names[3]!r}: --data holds "
            "another data set's classes under the same ids") in capsys.readouterr().err
    assert not out.exists()
    (data / "classes.json").unlink()
    assert carclf_main(args) == 0 and (out / "eval.json").is_file()
