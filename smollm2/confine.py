"""Keeping every read inside one folder: app.py serves only what lies under --checkpoint_dir.

A name is resolved with every `..` and symbolic link on the way followed, and refused when its real path lies outside
the folder; checkpoint.files_to_load(path) lists every file a load will open (a run's newest checkpoint, a sharded
checkpoint's shards, a Hugging Face folder's config and weights), and each of them must pass, so a link anywhere on
the way never leads a load elsewhere. Names that cannot be paths (a NUL byte, text that is not UTF-8, a link loop, a
name too long) are refused in one message too.
"""

import os
from pathlib import Path

from smollm2.errors import CheckpointError


def resolve_under(root: Path, name: str) -> Path:
    """A checkpoint named relative to root (itself resolved) -> its real path; whatever lies outside root is refused."""
    if not isinstance(name, str) or not name.strip():
        raise CheckpointError("no checkpoint picked: choose one from the list")
    path = real_path(root / name, name)   # `..`, an absolute name and symlinks are all resolved before the check
    if not path.is_relative_to(root):
        raise CheckpointError(f"{name!r} is outside the checkpoint directory: refused (this app loads only what lies "
                              "under --checkpoint_dir)")
    if not path.exists():
        raise CheckpointError(f"{name}: no such checkpoint under the checkpoint directory")
    return path


def real_path(path: Path, name: str) -> Path:
    """path with every `..` and link on the way resolved; a name that cannot be a path is a CheckpointError."""
    shown = name if len(name) <= 80 else name[:80] + "..."
    if "\0" in name:
        raise CheckpointError(f"{shown!r}: a name with a NUL byte is not a path")
    try:
        os.fsencode(name)   # file names from disk that are not UTF-8 arrive surrogate-escaped and pass
    except UnicodeEncodeError:
        raise CheckpointError(f"{shown!r}: not valid UTF-8, so not a file name") from None
    try:
        path = path.resolve()
        path.exists()   # raises for a name the file system refuses (too long, ...)
    except RuntimeError:   # Python 3.11 reports a link that leads back to itself this way
        raise CheckpointError(f"{shown}: a symbolic link loop") from None
    except OSError as e:
        raise CheckpointError(f"{shown}: not a usable path ({e.strerror})") from None
    return path


def files_inside(root: Path, files: list[Path]) -> list[Path]:
    """The real path of each file (every `..` and link on the way followed), refusing any that lies outside root, the
    resolved checkpoint directory: given files_to_load(path), a link inside root never leads a load elsewhere."""
    real = []
    for f in files:
        r = real_path(f, str(f))
        if not r.is_relative_to(root):
            shown = f.relative_to(root) if f.is_relative_to(root) else f
            raise CheckpointError(f"{shown} leads outside the checkpoint directory through a link: refused")
        real.append(r)
    return real


def all_inside(root: Path, files: list[Path]) -> bool:
    """files_inside as a yes/no, for listings."""
    try:
        files_inside(root, files)
    except CheckpointError:
        return False
    return True
