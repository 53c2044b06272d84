"""`yoda bench`: performance figures measured as ratios in one run (table and JSON)."""

from __future__ import annotations

import argparse


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bench`` subcommand."""
    p = subparsers.add_parser(
        "bench",
        help="measure performance figures (network efficiency, overheads, memory) as ratios",
        description=(
            "Measure, in one run and on synthetic data with a random-weight model: the "
            "network's FLOP rate against a dense matmul, translate overhead against pure "
            "network time, ExpA batching, training-step and data-loader overheads, peak memory "
            "and per-slice cost at growing volume sizes. Prints a table; --json writes "
            "everything, absolute times included."
        ),
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument(
        "--preset", choices=("tiny", "small", "large"), default="tiny", help="network preset"
    )
    p.add_argument("--json", metavar="FILE", help="write the full result as JSON")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes (seconds): checks that everything runs, figures are not meaningful",
    )
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="inference precision of the sampling measurements (default auto, as yoda "
        "translate: fp16 on CUDA, fp32 on the CPU)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive,
        default=None,
        help="slices per network call (default: by slice size, as translate)",
    )
    p.add_argument(
        "--threads", type=_positive, default=None, help="CPU threads (default: all cores)"
    )
    p.add_argument(
        "--channels-last", action="store_true", help="channels-last network inputs (as translate)"
    )
    p.add_argument(
        "--compile",
        metavar="MODE",
        default=None,
        help="torch.compile the network (as translate); also measures compile_speedup",
    )
    p.add_argument("--no-progress", action="store_true", help="do not print the stages")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table, optionally write the JSON."""
    from yoda.bench import format_report, run_bench

    result = run_bench(
        args.device,
        args.preset,
        size="tiny" if args.quick else "default",
        json_path=args.json,
        progress=not args.no_progress,
        precision=args.precision,
        batch_size=args.batch_size,
        threads=args.threads,
        channels_last=args.channels_last,
        compile=args.compile,
    )
    print(format_report(result), flush=True)
    if args.json:
        print(f"\nwrote {args.json}", flush=True)
    return 0
