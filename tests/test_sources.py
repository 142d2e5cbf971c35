"""carclf.sources: a path a command reads from is either the kind it wants, missing, or of another kind, and
the message says which."""

from __future__ import annotations

import os

import pytest

from carclf import sources
from carclf.errors import InvalidInput, NotFound


def test_each_kind_of_path_gets_its_own_reason(tmp_path):
    folder, file = tmp_path / "photos", tmp_path / "labels.csv"
    folder.mkdir()
    file.write_text("Id,Category\n")
    assert sources.why_not(folder, "folder") is None and sources.why_not(file, "file") is None
    assert sources.why_not(tmp_path / "nope", "folder") == sources.why_not(tmp_path / "nope", "file") == \
        "does not exist"
    assert sources.why_not(file, "folder") == "is a file, not a folder"
    assert sources.why_not(folder, "file") == "is a folder, not a file"
    if os.path.exists("/dev/null"):
        assert sources.why_not("/dev/null", "file") == "is not a regular file"


def test_require_raises_not_found_for_a_missing_path_and_invalid_input_for_another_kind(tmp_path):
    (tmp_path / "a.csv").write_text("x")
    assert sources.require(tmp_path, "folder", "photo folder") == tmp_path
    with pytest.raises(NotFound) as missing:
        sources.require(tmp_path / "b", "folder", "photo folder")
    assert missing.value.message == f"photo folder {str(tmp_path / 'b')!r} does not exist"
    with pytest.raises(InvalidInput) as other:
        sources.require(tmp_path / "a.csv", "folder", "photo folder")
    assert other.value.message == f"photo folder {str(tmp_path / 'a.csv')!r} is a file, not a folder"
    assert not isinstance(other.value, NotFound)
