"""Translate every subject of a manifest: skip finished ones, shard over ranks, report failures."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yoda.errors import InputError, YodaError


@dataclass
class CohortResult:
    """What a batch translation did: finished, skipped and failed subjects (id -> reason), and
    the :func:`yoda.translate.domain_warnings` of finished ones."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)


def output_path(out_dir: str | os.PathLike, subject_id: str, target: str) -> Path:
    """``OUT_DIR/<id>_<target>.nii.gz``, refusing ids that would leave ``out_dir``."""
    out_dir = Path(out_dir).resolve()
    path = (out_dir / f"{subject_id}_{target}.nii.gz").resolve()
    if path.parent != out_dir or subject_id in ("", ".", ".."):
        raise InputError(f"subject id {subject_id!r} would write outside {out_dir}")
    return path


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from the torchrun environment; (0, 1) when not distributed."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        return 0, 1


@contextlib.contextmanager
def subject_lock(path: Path) -> Iterator[bool]:
    """Hold ``<path>.lock`` while a subject is translated; yield False if another run holds it.

    The lock is a file holding ``host:pid``, created atomically with its content. A lock left
    by a process that no longer runs on this host is taken over.
    """
    lock = path.with_name(path.name + ".lock")
    me = f"{socket.gethostname()}:{os.getpid()}"
    for _ in range(2):
        if not _create_with(lock, me):
            if _stale(lock):
                with contextlib.suppress(OSError):
                    lock.unlink()
                continue
            yield False
            return
        try:
            yield True
        finally:
            with contextlib.suppress(OSError):
                lock.unlink()
        return
    yield False


def _create_with(lock: Path, text: str) -> bool:
    """Create ``lock`` holding ``text`` in one step (hard link of a complete temporary file);
    False if it exists. A kill can never leave an empty lock behind."""
    fd, tmp = tempfile.mkstemp(prefix=f".{lock.name}.", dir=lock.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.link(tmp, lock)
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return True


def _stale(lock: Path) -> bool:
    try:
        host, _, pid = lock.read_text().partition(":")
    except OSError:
        return False
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def translate_cohort(
    translator: Any,
    manifest: Any,
    *,
    split: str | None,
    out_dir: str | os.PathLike,
    options: dict[str, Any],
    seed: int = 0,
    force: bool = False,
    dtype: str = "float32",
    extras: bool = False,
    progress: bool = True,
) -> CohortResult:
    """Translate the subjects of ``manifest`` (one split, or all) into ``out_dir``.

    Subjects whose output and sidecar exist are skipped unless ``force``. Under torchrun each
    rank takes every world-size-th subject. A subject that fails is recorded with its reason
    and the others go on. Each subject is locked while it is translated, so that runs sharing
    ``out_dir`` never write the same file at once.
    """
    from tqdm import tqdm

    from yoda.translate import subject_seed

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create the output folder {out_dir}: {err}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise InputError(f"output folder {out_dir} is not writable")
    subjects = manifest.split(split).subjects if split else list(manifest.subjects)
    if not subjects:
        raise InputError(f"no subjects in split {split!r} of the manifest")
    rank, world = distributed_rank()
    mine = subjects[rank::world]
    result = CohortResult()
    bar = tqdm(mine, desc="translate", unit="subject", disable=not progress or rank != 0)
    for subject in bar:
        bar.set_postfix_str(subject.id)
        try:
            path = output_path(out_dir, subject.id, translator.card.target)
        except InputError as exc:
            result.failed[subject.id] = str(exc)
            continue
        sidecar = path.with_name(path.name[: -len(".nii.gz")] + ".json")
        if not force and path.exists() and sidecar.exists():
            result.skipped.append(subject.id)
            continue
        with subject_lock(path) as mine_now:
            if not mine_now:
                result.busy.append(subject.id)
                continue
            if not force and path.exists() and sidecar.exists():
                result.skipped.append(subject.id)
                continue
            try:
                missing = [s for s in translator.sources if s not in subject.images]
                if missing:
                    raise InputError(f"manifest has no {', '.join(missing)} for this subject")
                sources = {name: subject.images[name] for name in translator.sources}
                res = translator.translate(
                    sources,
                    mask=subject.mask,
                    seed=subject_seed(seed, subject.id),
                    keep_samples=extras,
                    **options,
                )
                res.info["subject"] = subject.id
                res.save(path, dtype=dtype, overwrite=True, extras=extras)
                result.done.append(subject.id)
                if res.info.get("warnings"):
                    result.warnings[subject.id] = res.info["warnings"]
            except YodaError as exc:
                result.failed[subject.id] = str(exc)
    return result
