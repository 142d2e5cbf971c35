"""``python -m carclf.loadtest.ab``: two checkouts of the serving code served side by side, every answer checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from carclf.errors import ConfigError
from carclf.loadtest.ab import shadow_tree

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_shadow_tree_imports_the_checkouts_own_code(tmp_path):
    """The baseline server must run the baseline's files, not the installed (editable) carclf."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for folder in ("carclf", "serving", "train", "ensemble", "clients", "loadtest"):
        (checkout / folder).symlink_to(REPO_ROOT / folder, target_is_directory=True)
    (checkout / "pyproject.toml").write_text((REPO_ROOT / "pyproject.toml").read_text())
    tree = shadow_tree(checkout, tmp_path / "shadow")
    probe = ("import carclf.serving.grpc_service as g, carclf.train.commands as c; "
             "print(g.__file__); print(c.__file__)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(tree)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    files = result.stdout.split()
    assert files == [str(tree / "carclf" / "serving" / "grpc_service.py"),
                     str(tree / "carclf" / "train" / "commands" / "__init__.py")]


def test_shadow_tree_refuses_a_folder_that_is_not_a_checkout(tmp_path):
    with pytest.raises(ConfigError, match="--baseline-checkout.*not a carclf checkout"):
        shadow_tree(tmp_path, tmp_path / "shadow")


@pytest.mark.slow
def test_ab_serves_both_sides_and_writes_the_paired_summary(lt_repository, tmp_path, sample_dir):
    out = tmp_path / "ab"
    result = subprocess.run(
        [sys.executable, "-m", "carclf.loadtest.ab", "--baseline-checkout", str(REPO_ROOT), "--model", "tiny_a",
         "--model-repository", str(lt_repository), "--photo-folder", str(sample_dir), "--photo-limit", "3",
         "--rounds", "2", "--slice", "0.5", "--warmup", "0.1", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((out / "ab.json").read_text())
    assert data["errors"] == 0 and len(data["per_round"]) == 2
    for row in data["per_round"]:
        for transport in ("grpc", "rest"):
            for side in ("baseline", "candidate"):
                figures = row[transport][side]
                assert figures["requests"] > 0 and figures["p50_ms"] > 0, figures
                runtime = figures["breakdown"]["runtime_ms_per_batch"]
                assert abs(figures["added_ms"] - (figures["mean_ms"] - runtime)) < 1e-2
    assert set(data["summary"]) == {"grpc", "rest"}
    for figures in data["summary"].values():
        saved = figures["saved_p50_ms"]
        assert saved["n"] == 2 and saved["min"] <= saved["median"] <= saved["max"]
    assert "| grpc | p50 latency |" in (out / "ab.md").read_text()


def test_rounds_alternate_which_side_is_measured_first(tmp_path, monkeypatch, capsys):
    """Whichever side goes first in a round may meet a warmer (or busier) machine: the order alternates, baseline
    first in one round and candidate first in the next, for every transport."""
    from carclf.loadtest import ab

    measured: list[tuple[str, str]] = []

    class Server:
        def __init__(self, side: str):
            self.side = side

        def stop(self) -> int:
            return 0

    def point(_work, transport, server, concurrency, _settings):
        assert concurrency == 1
        measured.append((transport, server.side))
        return {"errors": 0, "p50_ms": 5.0, "mean_ms": 5.0, "requests": 10, "breakdown": None}

    monkeypatch.setattr(ab.Workload, "of_photos", classmethod(lambda cls, *_a: object()))
    monkeypatch.setattr(ab, "start_servers", lambda *_a: {side: Server(side) for side in ab.SIDES})
    monkeypatch.setattr(ab, "measure_point", point)
    assert ab.main(["--baseline-checkout", str(REPO_ROOT), "--model", "m", "--rounds", "4", "--batching-config", "",
                    "--out", str(tmp_path / "ab")]) == 0
    capsys.readouterr()
    per_round = [measured[i:i + 4] for i in range(0, len(measured), 4)]
    assert len(per_round) == 4
    for number, row in enumerate(per_round):
        first, second = ("baseline", "candidate") if number % 2 == 0 else ("candidate", "baseline")
        assert row == [("grpc", first), ("grpc", second), ("rest", first), ("rest", second)], (number, row)


@pytest.mark.parametrize("pyproject,missing", [
    ("[project]\nname = 'carclf'\n", "no [tool.setuptools] package-dir table"),
    ("[tool.setuptools]\nzip-safe = false\n", "no [tool.setuptools] package-dir table"),
    ("[tool.setuptools.package-dir]\n'carclf.serving' = 'serving'\n", "no 'carclf' entry"),
    ("[tool.setuptools\n", "not valid TOML"),
], ids=["no-tool-table", "no-package-dir", "no-top-package", "bad-toml"])
def test_shadow_tree_refuses_a_checkout_whose_pyproject_maps_no_packages(tmp_path, pyproject, missing):
    """It was KeyError: 'tool' (a traceback, exit 1) for a pyproject.toml without the package map."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "pyproject.toml").write_text(pyproject)
    with pytest.raises(ConfigError) as raised:
        shadow_tree(checkout, tmp_path / "shadow")
    message = str(raised.value)
    assert message.startswith("field '--baseline-checkout': ") and str(checkout) in message, message
    assert missing in message, message
    assert not (tmp_path / "shadow").exists()


def test_ab_names_a_checkout_without_a_package_map_in_one_line_and_exits_2(tmp_path, monkeypatch, capsys):
    from carclf.loadtest import ab

    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "pyproject.toml").write_text("[project]\nname = 'carclf'\n")
    monkeypatch.setattr(ab.Workload, "of_photos", classmethod(lambda cls, *_a: object()))
    monkeypatch.setattr(ab, "start_servers", lambda *_a: pytest.fail("no server may start"))
    assert ab.main(["--baseline-checkout", str(checkout), "--model", "m", "--batching-config", "",
                    "--out", str(tmp_path / "ab")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ab: field '--baseline-checkout': "), lines
    assert str(checkout) in lines[0] and "package-dir" in lines[0], lines
