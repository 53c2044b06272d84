"""Device and precision options shared by training, translation and benchmarks."""

from __future__ import annotations

import os

import torch

from yoda.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
#: Translation precisions: ``auto`` is fp16 autocast on CUDA and fp32 on the CPU.
INFERENCE_PRECISIONS = ("auto", *PRECISIONS)


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity where the system tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def array_threads(size: int, parts: int, workers: int | None = None) -> int:
    """Threads for work on an array of ``size`` values split in at most ``parts`` parts:
    ``workers`` when given, else one per usable core (at most 8) for 2^21 values or more and
    1 below; always between 1 and ``parts``."""
    if workers is None:
        workers = min(usable_cpus(), 8) if size >= 2**21 else 1
    return max(1, min(int(workers), parts))


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a usable device.

    Raises
    ------
    ConfigError
        For an unknown spelling, or CUDA asked for where none (or not that index) exists.
    """
    text = str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    kind, _, index = text.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N; got {spec!r}")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} was asked for, but CUDA is not available here")
    if index and int(index) >= torch.cuda.device_count():
        raise ConfigError(
            f"device {spec!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible"
        )
    return torch.device(text)


def inference_precision(precision: str, device: torch.device) -> str:
    """The precision a translation runs in: ``auto`` is fp16 on CUDA (there 3x faster than
    strict fp32, and about 8x closer to it than bf16), fp32 on the CPU."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {INFERENCE_PRECISIONS}; got {precision!r}")
    return precision


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision option on a device (None: plain fp32).

    fp16 is offered on CUDA only; bf16 on CUDA where supported and on CPU.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError("precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU does not support bf16; use fp16 or fp32")
    return torch.bfloat16
