"""Where diffnas may write: a folder or file whose existing ancestors are all folders.

Checked before anything is opened or written, so that ``--results``, ``--storage``,
``--out`` or ``--plot`` under a regular file is one line naming the path, not a
``NotADirectoryError`` after a study was created.
"""

from __future__ import annotations

from pathlib import Path


class PathError(ValueError):
    """A path diffnas cannot write to; the message names the flag and the path."""


def check_dir(path: Path, what: str) -> Path:
    """``path``, which is a folder or can be created as one.

    Args:
        path: the folder.
        what: what names it to the user, e.g. ``--results``.

    Raises:
        PathError: ``path`` or one of its ancestors is not a folder.
    """
    if path.exists() and not path.is_dir():
        raise PathError(f"{what} {path}: is a file, not a folder")
    _check_ancestors(path, what)
    return path


def check_file(path: Path, what: str) -> Path:
    """``path``, which is a file or can be created as one (its folders included).

    Raises:
        PathError: ``path`` is a folder, or one of its ancestors is not a folder.
    """
    if path.is_dir():
        raise PathError(f"{what} {path}: is a folder, not a file")
    _check_ancestors(path, what)
    return path


def _check_ancestors(path: Path, what: str) -> None:
    """The nearest existing ancestor must be a folder (creating the rest then works)."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise PathError(f"{what} {path}: {parent} is a file, not a folder")
            return
