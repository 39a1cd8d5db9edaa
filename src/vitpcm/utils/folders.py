"""Output folders that are not left behind empty when a stage fails before writing.

A stage that stops early (a bad item, a wrong checkpoint, a full disk) should leave the
disk as it found it: :func:`output_folders` creates the folders a stage writes into and,
when the stage raises, removes again every folder it created that is still empty (its
parents too, when it created them). Folders that existed before are never touched; one
that holds any file is kept. Standard library only.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, List, Sequence, Union

from vitpcm.atomic import disk_error

PathLike = Union[str, Path]


def make_folders(folders: Sequence[PathLike]) -> List[Path]:
    """``mkdir -p`` each folder; returns the folders this call created (parents included),
    deepest first. A full disk or a read-only / forbidden place raises one line
    (:func:`vitpcm.atomic.disk_error`)."""
    created: List[Path] = []
    for folder in folders:
        folder = Path(folder)
        missing = []
        p = folder
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            err = disk_error(exc, Path(exc.filename) if exc.filename else folder)
            if err is None:
                raise
            raise err from None
        created.extend(m for m in missing if m not in created)
    return sorted(created, key=lambda p: len(p.parts), reverse=True)


def remove_if_empty(folders: Sequence[Path]) -> None:
    """Remove each folder that is empty (deepest first); others stay."""
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()  # fails (and is kept) when it holds anything


@contextlib.contextmanager
def output_folders(*folders: PathLike) -> Iterator[List[Path]]:
    """Create ``folders``; if the body raises, remove those of them (and of their parents)
    that this call created and that are still empty. Yields the created folders."""
    created = make_folders(folders)
    try:
        yield created
    except BaseException:
        remove_if_empty(created)
        raise
