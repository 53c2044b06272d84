"""Atomic file writes: write to a temporary file beside the target, then rename over it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _suffix(path: Path) -> str:
    """The full suffix that format-sniffing writers need (``.nii.gz`` stays ``.nii.gz``)."""
    name = path.name
    for double in (".nii.gz", ".tar.gz"):
        if name.endswith(double):
            return double
    return path.suffix


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the body succeeds, move it onto ``path``.

    The temporary file keeps the target's suffix so that writers choosing the format by the
    file name (nibabel, numpy, safetensors) behave as for the real name. Its data are flushed
    to disk (``fsync``) before the rename, so that a crash leaves the old file or the new one,
    never a torn one. If the body raises, the temporary file is removed and ``path`` is left
    untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=f".tmp{_suffix(path)}", dir=path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600, and some writers (safetensors) recreate the file: give the
        # result the mode of a plainly created file
        os.chmod(tmp_path, 0o666 & ~_umask())
        if fsync:
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, creating its folder; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def can_create(path: str | os.PathLike) -> bool:
    """Whether ``path`` (and any missing folders above it) can be created: its nearest
    existing ancestor is a folder this process may write to."""
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)
