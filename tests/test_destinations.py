"""Every command that writes checks where it will write before it does any work: a destination that cannot be
written is refused in one line naming the flag, before the model, photos or runs named beside it are read."""

from __future__ import annotations

from pathlib import Path

import pytest

from carclf import destinations
from carclf.cli import main as carclf_main
from carclf.errors import InvalidInput

MISSING = "no-such-input"  # every other argument names nothing: the destination must be refused first

# (command line with {out} for the destination, the flag, whether the destination is a folder)
COMMANDS = [
    (["submit", MISSING, MISSING, "--out", "{out}"], "--out", False),
    (["pseudo-label", MISSING, MISSING, "--out", "{out}"], "--out", False),
    (["crossval", MISSING, "--out", "{out}"], "--out", False),
    (["serving-config", "--repository", MISSING, "--output", "{out}"], "--output", False),
    (["predict", MISSING, "--output", "{out}"], "--output", False),
    (["evaluate", MISSING, "--out", "{out}"], "--out", True),
    (["scan", MISSING, "--out", "{out}"], "--out", True),
    (["export", MISSING, "--repository", "{out}"], "--repository", True),
    (["train", "demo_mobilenet_v2", "--runs", "{out}"], "--runs", True),
]


def _unwritable(tmp_path: Path, kind: str) -> tuple[str, str]:
    """A destination of ``kind`` and the words its refusal must hold."""
    if kind == "under_a_file":
        blocker = tmp_path / "a_file"
        blocker.write_text("keep me")
        return str(blocker / "out" / "x.csv"), f"{str(blocker)!r} is a file, not a folder"
    return "/proc/carclf-cannot-write-here/x.csv", "files cannot be created in '/proc'"  # not even as root


@pytest.mark.parametrize("kind", ["under_a_file", "no_file_can_be_created"])
@pytest.mark.parametrize("argv,flag,folder", COMMANDS, ids=[c[0][0] for c in COMMANDS])
def test_an_unwritable_destination_is_refused_first_naming_the_flag(tmp_path, capsys, argv, flag, folder, kind):
    out, words = _unwritable(tmp_path, kind)
    code = carclf_main([arg.replace("{out}", out) for arg in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert f"{flag} {out!r} cannot be" in line and words in line, line
    assert "Traceback" not in err and MISSING not in line
    if kind == "under_a_file":
        assert (tmp_path / "a_file").read_text() == "keep me" and sorted(tmp_path.iterdir()) == [tmp_path / "a_file"]


def test_a_file_where_a_folder_is_wanted_and_the_reverse(tmp_path):
    a_file, a_folder = tmp_path / "report.json", tmp_path / "reports"
    a_file.write_text("{}")
    a_folder.mkdir()
    with pytest.raises(InvalidInput, match=r"--out '.*report\.json' is a file; give a folder"):
        destinations.check_folder(a_file, "--out")
    with pytest.raises(InvalidInput, match=r"--out '.*reports' is a folder; give a file path"):
        destinations.check_file(a_folder, "--out")
    with pytest.raises(InvalidInput, match="--out is empty"):
        destinations.check_file("", "--out")
    destinations.check_file(a_file, "--out")  # an existing file may be replaced
    destinations.check_file(tmp_path / "new" / "deeper" / "x.csv", "--out")  # folders are made when written
    destinations.check_folder(tmp_path / "new_folder", "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "reports"]  # the checks wrote nothing


def test_write_json_leaves_no_temporary_file_when_it_fails(tmp_path):
    from carclf.train.runs import write_json

    taken = tmp_path / "summary.json"
    taken.mkdir()  # the rename over it fails
    with pytest.raises(OSError):
        write_json(taken, {"accuracy": 1.0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"] and list(taken.iterdir()) == []


@pytest.mark.parametrize("argv,flag", [(["submit", MISSING, MISSING, "--out", "  "], "--out"),
                                       (["scan", MISSING, "--out", " "], "--out")], ids=["file", "folder"])
def test_a_blank_destination_is_refused_as_empty(tmp_path, monkeypatch, capsys, argv, flag):
    """A destination of spaces only (an unset shell variable in quotes, a stray space) is refused as empty, not
    written as a file or folder named by spaces in the working folder."""
    monkeypatch.chdir(tmp_path)
    assert carclf_main(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{flag} is empty" in line and MISSING not in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,flag,folder", [c for c in COMMANDS if c[0][0] != "serving-config"],
                         ids=[c[0][0] for c in COMMANDS if c[0][0] != "serving-config"])
def test_a_dash_for_standard_output_is_refused_where_a_command_cannot_print(tmp_path, monkeypatch, capsys, argv,
                                                                            flag, folder):
    """'-' is standard output by convention; a command that writes a file or folder refuses it by name instead
    of creating one named '-' in the working folder. (serving-config and ensemble-config do print for '-'.)"""
    monkeypatch.chdir(tmp_path)
    assert carclf_main([arg.replace("{out}", "-") for arg in argv]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{flag} '-' asks for standard output" in line and MISSING not in line, line
    assert ("a folder" if folder else "a file path") in line
    assert list(tmp_path.iterdir()) == []


def test_commands_that_print_for_a_dash_still_do(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert carclf_main(["ensemble-config", "mobilenet_v2", "xception", "--output", "-"]) == 0
    printed = capsys.readouterr().out
    assert 'name: "car_ensemble"' in printed and 'model_name: "xception"' in printed
    assert list(tmp_path.iterdir()) == []

