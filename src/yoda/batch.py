"""Translate every subject of a manifest: skip finished ones, shard over ranks, report failures."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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


def _differences(
    sidecar: Path, wanted: dict[str, Any], origin: dict[str, Any] | None = None
) -> str | None:
    """Why the output beside ``sidecar`` is not what this run makes: the settings it records
    that differ from ``wanted``, or that the sidecar is not one of ours; "" where it records
    all of them alike; None (make it again) where the sidecar is missing (a run stopped
    between the image and its sidecar) or lacks some settings but agrees on the others (an
    earlier version's). A sidecar without the weights' SHA-256 (an earlier version's) must
    name the model of ``origin`` (model path and EMA or raw weights) to be made again."""
    if not sidecar.exists():
        return None
    try:
        recorded = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = None
    present = [key for key in wanted if isinstance(recorded, dict) and key in recorded]
    if not present:
        return f"a sidecar {sidecar.name} that yoda translate did not write"
    compared = dict(wanted)
    if "weights_sha256" in wanted and "weights_sha256" not in present:
        known = {k: v for k, v in (origin or {}).items() if v is not None and k in recorded}
        compared.update(known)
    differences = ", ".join(
        f"{key} {recorded[key]!r} (this run: {compared[key]!r})"
        for key in compared
        if key in recorded and recorded[key] != compared[key]
    )
    if not differences and len(present) < len(wanted):
        return None
    return differences


@dataclass
class _Job:
    """One claimed subject: its output path, its lock and its preparation (a future)."""

    subject: Any
    path: Path
    lock: contextlib.ExitStack
    prepared: Future | None


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
    overlap: bool | None = None,
    replace_other: bool = False,
) -> CohortResult:
    """Translate the subjects of ``manifest`` (one split, or all) into ``out_dir``.

    Subjects whose output and sidecar exist are skipped unless ``force``, when the sidecar
    records this run's settings (the weights' SHA-256, target and its normalization, mode,
    views, N_Ex, timesteps, slice correction and its slices, the subject's seed, the output's
    dtype and saved samples). An output
    made with other settings, or whose sidecar is not one of ours, fails the subject with the
    reason, or is translated again with ``replace_other``; an output without a sidecar, or
    whose sidecar lacks some settings but agrees on the others (and, without the weights'
    SHA-256, names this model's path and weights), is translated again. Under
    torchrun each
    rank takes every world-size-th subject. A subject that fails is recorded with its reason
    and the others go on. Each subject is locked from its preparation until its output is
    written, so that runs sharing ``out_dir`` never write the same file at once.

    With ``overlap`` the next subject is read and normalized, and the previous one written, in
    background threads while the current one samples, which hides that work behind a GPU's
    sampling. The default overlaps when the translator runs on CUDA only: on the CPU the
    threads would take cores from the network (a 128^3 cohort with ``tiny`` on 2 cores: 6 %
    slower). The outputs are the same either way.

    Sampling options that ``translator.check_options`` refuses raise :class:`ConfigError`
    before any subject is read.
    """
    from tqdm import tqdm

    from yoda.data.io import sidecar_path
    from yoda.translate import check_output_dtype, subject_seed

    subjects = manifest.split(split).subjects
    if not subjects:
        splits = ", ".join(sorted(manifest.splits))
        raise InputError(f"no subjects in split {split!r} of the manifest (it has {splits})")
    options = dict(options)
    resample = bool(options.pop("resample", False))
    # one error now rather than one per subject, and before the output folder is made
    settings = translator.check_options(seed=seed, **options)
    check_output_dtype(dtype, translator.card.target_normalization)
    saved = (settings.get("n_ex") or 0) if extras and settings.get("mode") == "expa" else 0
    settings.update(dtype=dtype, saved_samples=saved)
    origin = {
        "model": getattr(translator, "model_dir", None),
        "weights": getattr(translator, "weights", None),
    }
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create the output folder {out_dir}: {err}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise InputError(f"output folder {out_dir} is not writable")
    rank, world = distributed_rank()
    mine = subjects[rank::world]
    result = CohortResult()
    if overlap is None:
        overlap = getattr(getattr(translator, "device", None), "type", "cpu") == "cuda"
    bar = tqdm(total=len(mine), desc="translate", unit="subject", disable=not progress or rank != 0)

    def prepare(subject: Any) -> Any:
        missing = [s for s in translator.sources if s not in subject.images]
        if missing:
            raise InputError(f"manifest has no {', '.join(missing)} for this subject")
        sources = {name: subject.images[name] for name in translator.sources}
        return translator.prepare(sources, mask=subject.mask, resample=resample)

    def claim(subject: Any) -> _Job | None:
        """Lock ``subject`` and start preparing it; None (and the reason recorded) if it is
        not this run's to translate."""
        try:
            path = output_path(out_dir, subject.id, translator.card.target)
        except InputError as exc:
            result.failed[subject.id] = str(exc)
            return None
        wanted = dict(settings, seed=subject_seed(seed, subject.id))

        def finished() -> bool:
            """Whether the subject is done (skipped, or failed for other settings)."""
            if force or not path.exists():
                return False
            differences = _differences(sidecar_path(path), wanted, origin)
            if differences is None or (differences and replace_other):
                return False
            if differences:
                result.failed[subject.id] = (
                    f"{path.name} exists, made with {differences}; --force replaces it"
                )
            else:
                result.skipped.append(subject.id)
            return True

        if finished():
            return None
        # the lock is released at the end if the run stops early
        lock = locks.enter_context(contextlib.ExitStack())
        if not lock.enter_context(subject_lock(path)):
            lock.close()
            result.busy.append(subject.id)
            return None
        if finished():  # finished while we looked
            lock.close()
            return None
        return _Job(subject, path, lock, reader.submit(prepare, subject))

    def claims() -> Iterator[_Job]:
        for subject in mine:
            job = claim(subject)
            bar.update(job is None)
            if job is not None:
                yield job

    def save(job: _Job, res: Any) -> None:
        with job.lock:
            res.save(job.path, dtype=dtype, overwrite=True, extras=extras)

    def sample(job: _Job) -> Any:
        """The subject's translation; None (and the reason recorded) if it failed."""
        try:
            prepared, job.prepared = job.prepared.result(), None  # not kept while writing
            res = translator.translate(
                prepared,
                seed=subject_seed(seed, job.subject.id),
                keep_samples=extras,
                **options,
            )
        except YodaError as exc:
            result.failed[job.subject.id] = str(exc)
            job.lock.close()
            bar.update()
            return None
        res.info["subject"] = job.subject.id
        return res

    def finish(job: _Job, saved: Future, warnings: list[str] | None) -> None:
        try:
            saved.result()
            result.done.append(job.subject.id)
            if warnings:
                result.warnings[job.subject.id] = warnings
        except YodaError as exc:
            result.failed[job.subject.id] = str(exc)
        bar.update()

    # one reader and one writer, so subjects are prepared and written in order; on the way
    # out the threads finish their file before the locks go
    with (
        contextlib.ExitStack() as locks,
        ThreadPoolExecutor(1, thread_name_prefix="yoda-read") as reader,
        ThreadPoolExecutor(1, thread_name_prefix="yoda-write") as writer,
    ):
        locks.callback(bar.close)
        queue = claims()
        job = next(queue, None)
        writing: tuple[_Job, Future, list[str] | None] | None = None
        try:
            while job is not None:
                bar.set_postfix_str(job.subject.id)
                upcoming = next(queue, None) if overlap else None  # prepared while `job` samples
                res = sample(job)
                if res is not None:
                    if writing is not None:
                        finish(*writing)
                    writing = (job, writer.submit(save, job, res), res.info.get("warnings"))
                    if not overlap:
                        finish(*writing)
                        writing = None
                job = upcoming if overlap else next(queue, None)
            if writing is not None:
                finish(*writing)
        except BaseException:
            reader.shutdown(wait=False, cancel_futures=True)  # no new subject is read
            raise
    # failures are recorded as they surface; report them in the manifest's order
    result.failed = {s.id: result.failed[s.id] for s in mine if s.id in result.failed}
    return result
