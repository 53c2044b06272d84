"""`yoda demo`: the paper's story on simulated data, on a laptop, in minutes."""

from __future__ import annotations

import argparse

from yoda.demo import DEMO_SEED, PREVIEW_STEPS


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    p = subparsers.add_parser(
        "demo",
        help="simulate subjects, translate them in every mode, evaluate, write a report",
        description=(
            "Simulates fresh phantom subjects (T1w, T2w, FLAIR with a known noise-free truth), "
            "translates T1w + T2w -> FLAIR with the bundled model by regression, diffusion and "
            "ExpA (N_Ex = 4 and 10), evaluates every mode and writes an HTML report. Diffusion "
            "uses a short preview of the timesteps (evenly spaced in log-SNR) unless --full is "
            "given."
        ),
    )
    p.add_argument("--out", default="yoda-demo", help="output folder (default: ./yoda-demo)")
    p.add_argument("--subjects", type=int, default=3, help="phantom test subjects (default 3)")
    p.add_argument("--seed", type=int, default=DEMO_SEED, help=f"default {DEMO_SEED}")
    p.add_argument(
        "--full", action="store_true", help="the paper's truncated sampler (251 NFE per sample)"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"timesteps of the preview, at least 2 (default {PREVIEW_STEPS}; not with --full)",
    )
    p.add_argument("--train", action="store_true", help="train a tiny model from scratch instead")
    p.add_argument(
        "--train-steps", type=int, default=600, help="training steps of --train (default 600)"
    )
    p.add_argument("--model", default=None, help="use this model directory instead")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="translation precision (as for yoda translate; default auto)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``yoda demo``."""
    from yoda.demo import format_summary, run_demo

    res = run_demo(
        args.out,
        subjects=args.subjects,
        seed=args.seed,
        full=args.full,
        steps=args.steps,
        train=args.train,
        train_steps=args.train_steps,
        model_dir=args.model,
        device=args.device,
        precision=args.precision,
        progress=not args.no_progress,
    )
    print()
    print(format_summary(res.summary))
    print()
    print(f"report: {res.report}  ({res.seconds:.0f} s in all)")
    return 0
