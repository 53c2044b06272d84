"""`yoda train`: train a 2.5D diffusion (or T=1 regression) model on a manifest.

Configuration precedence: defaults < ``--config`` YAML (or, with ``--resume`` and no
``--config``, the run's own config.yaml) < ``--set KEY=VALUE`` < the dedicated flags below.
Several processes: ``torchrun --nproc_per_node N -m yoda train ...`` (effective batch =
micro_batch x accumulation x N = batch_size).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

#: (flags, config key, argparse keyword arguments) of the dedicated flags.
FLAGS: list[tuple[tuple[str, ...], str, dict[str, Any]]] = [
    (("--data",), "data.manifest", {"metavar": "MANIFEST", "help": "manifest (CSV or JSON)"}),
    (
        ("--sources",),
        "data.sources",
        {"nargs": "+", "metavar": "NAME", "help": "source modalities in order (e.g. t1w t2w)"},
    ),
    (("--target",), "data.target", {"metavar": "NAME", "help": "target modality (e.g. flair)"}),
    (("--out",), "run.out", {"metavar": "RUN_DIR", "help": "run directory"}),
    (("--preset",), "model.preset", {"help": "network preset: tiny, small (default), large"}),
    (("--n-slices",), "model.n_slices", {"type": int, "help": "slab thickness n (default 5)"}),
    (("--prediction",), "model.prediction", {"help": "v (default), eps or x0"}),
    (("--schedule",), "model.schedule", {"help": "linear (default) or cosine"}),
    (("--T",), "model.T", {"type": int, "help": "diffusion steps (default 1000; 1: regression)"}),
    (
        ("--init",),
        "model.init",
        {"metavar": "MODEL_DIR", "help": "fine-tune: start from this model directory's weights"},
    ),
    (
        ("--steps",),
        "run.steps",
        {"type": int, "help": "optimizer steps (default: from --samples-per-volume)"},
    ),
    (("--samples-per-volume",), "data.samples_per_volume", {"type": int, "help": "default 20000"}),
    (("--batch-size",), "optim.batch_size", {"type": int, "help": "effective batch (default 96)"}),
    (
        ("--micro-batch",),
        "optim.micro_batch",
        {"type": int, "help": "slabs per pass; gradients accumulate"},
    ),
    (("--lr",), "optim.lr", {"type": float, "help": "Adam learning rate (default 1e-4)"}),
    (
        ("--lr-final",),
        "optim.lr_final",
        {"type": float, "help": "decay the lr to this value (departure)"},
    ),
    (("--lr-decay",), "optim.lr_decay", {"help": "cosine (default) or step"}),
    (("--ema-decay",), "optim.ema_decay", {"type": float, "help": "default 0.999"}),
    (
        ("--ema-warmup",),
        "optim.ema_warmup",
        {"action": argparse.BooleanOptionalAction, "help": "EMA warm-up (default on)"},
    ),
    (("--grad-clip",), "optim.grad_clip", {"type": float, "help": "clip the gradient norm"}),
    (
        ("--high-t-share",),
        "optim.high_t_share",
        {"type": float, "help": "share of t = T-1 samples (departure)"},
    ),
    (("--normalization",), "data.normalization", {"help": "tissue (default), percentile, ct"}),
    (
        ("--mask-weighting",),
        "data.mask_weighting",
        {"action": argparse.BooleanOptionalAction, "help": "weight 0.01 outside the brain mask"},
    ),
    (
        ("--views",),
        "data.views",
        {"nargs": "+", "metavar": "VIEW", "help": "views drawn uniformly (default all three)"},
    ),
    (("--num-workers",), "data.num_workers", {"type": int, "help": "DataLoader workers"}),
    (("--cache-dir",), "data.cache_dir", {"help": "array cache (default RUN_DIR/cache)"}),
    (("--device",), "run.device", {"help": "auto (default), cpu, cuda or cuda:N"}),
    (
        ("--precision",),
        "run.precision",
        {
            "help": "auto (default: bf16 on CUDA where supported, else fp16; fp32 on the CPU), "
            "fp32, bf16, fp16"
        },
    ),
    (("--seed",), "run.seed", {"type": int, "help": "default 0"}),
    (
        ("--threads",),
        "run.threads",
        {"type": int, "help": "CPU threads per process (default: the CPUs / local processes)"},
    ),
    (
        ("--log-every",),
        "run.log_every",
        {"type": int, "help": "steps between log entries (default: 50)"},
    ),
    (
        ("--checkpoint-every",),
        "run.checkpoint_every",
        {"type": int, "help": "steps between checkpoints (default: 1000)"},
    ),
    (
        ("--val-every",),
        "run.val_every",
        {"type": int, "help": "steps between validations (default: 1000; 0: none)"},
    ),
    (("--notes",), "run.notes", {"help": "free-form notes for the model card"}),
]


def _dest(key: str) -> str:
    return "cfg__" + key.replace(".", "__")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand."""
    p = subparsers.add_parser(
        "train",
        help="train a model on a manifest of co-registered volumes",
        description="Train YODA's 2.5D denoiser (Adam, EMA, mixed precision on CUDA, DDP "
        "under torchrun). Every option is a field of yoda.config.TrainConfig; a YAML file "
        "(--config) sets any of them, --set KEY=VALUE and the flags below override it. "
        "The run directory receives config.yaml, metrics.jsonl, checkpoint/ and model/.",
    )
    p.add_argument("--config", metavar="YAML", help="training config file")
    p.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any config field, e.g. --set optim.lr_step_at=0.5 (repeatable)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint (its config.yaml is the base)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for flags, key, kwargs in FLAGS:
        if "action" not in kwargs:
            kwargs = {"metavar": key.split(".")[1].upper(), **kwargs}
        p.add_argument(*flags, dest=_dest(key), default=None, **kwargs)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> Any:
    """The TrainConfig described by parsed arguments (not yet validated)."""
    from yoda.config import (
        TrainConfig,
        apply_overrides,
        load_config,
        parse_assignment,
    )

    if args.config:
        config = load_config(args.config)
    else:
        out = getattr(args, _dest("run.out"))
        saved = Path(out).expanduser() / "config.yaml" if out else None
        if args.resume and saved is not None and saved.is_file():
            config = load_config(saved)
        else:
            config = TrainConfig()
    overrides: dict[str, Any] = {}
    for text in args.assignments:
        key, value = parse_assignment(text)
        overrides[key] = value
    for _flags, key, _kwargs in FLAGS:
        value = getattr(args, _dest(key))
        if value is not None:
            overrides[key] = value
    for key in ("data.sources", "data.target"):
        value = overrides.get(key)
        if isinstance(value, list | tuple):
            overrides[key] = [str(v).lower() for v in value]
        elif isinstance(value, str):
            overrides[key] = value.lower()
    return apply_overrides(config, overrides) if overrides else config


def run(args: argparse.Namespace) -> int:
    """Train; print where the model directory was written."""
    from yoda.config import validate
    from yoda.train import train

    config = validate(config_from_args(args))
    model_dir = train(config, progress=not args.no_progress, resume=args.resume)
    import os

    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"model written to {model_dir}", flush=True)
    return 0
