"""Publishing files so that they survive a crash of the machine, not only of the process.

Every file the product keeps (checkpoints, run logs, submissions, exported versions) is written aside and
renamed into place, so a process killed mid-write leaves the old file or the new one. A power cut or a kernel
crash is another matter: the filesystem may have stored the rename but not yet the data it points to (ext4
orders the two only for a rename over an existing file in its default mode; others, XFS among them, promise
nothing), and the last good checkpoint is replaced by an empty one. So the data is synced before the rename
and the folder after it, the usual write-sync-rename-sync order. Appends (the rows of a partial submission)
are flushed, not synced: a lost tail is answered again on ``--resume``.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

StrPath = str | os.PathLike


def sync(path: StrPath) -> None:
    """Flush ``path`` to disk: a file's data, or a folder's entries (the names renamed into it). A folder is
    skipped where it cannot be synced: on Windows (it cannot be opened; NTFS journals its renames) and on
    filesystems that refuse an fsync of a folder with EINVAL or EBADF (as PostgreSQL does); a file's sync
    failing is an error."""
    folder = os.path.isdir(path)
    if folder and os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (folder and exc.errno in (errno.EINVAL, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def replace(source: StrPath, target: StrPath) -> None:
    """``os.replace(source, target)`` that a crash of the machine cannot turn into an empty ``target``:
    ``source`` is synced before, ``target``'s folder after."""
    sync(source)
    os.replace(source, target)
    sync(Path(target).parent)


def sync_tree(root: StrPath) -> None:
    """Sync every file under ``root`` and then every folder, deepest first: before a rename publishes the
    tree (an exported SavedModel version)."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            sync(os.path.join(folder, name))
        sync(folder)
