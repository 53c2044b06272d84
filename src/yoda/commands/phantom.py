"""`yoda phantom OUT`: simulate a cohort of paired multi-contrast brain MRI with lesions."""

from __future__ import annotations

import argparse

from yoda.errors import ConfigError

DEFAULT_SUBJECTS = 10


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``phantom`` subcommand to ``subparsers``."""
    p = subparsers.add_parser(
        "phantom",
        help="simulate paired T1w/T2w/PD/FLAIR brain MRI with lesions and noise-free truth",
        description=(
            "Simulate a cohort from the MNI ICBM152 tissue maps shipped with nilearn: per "
            "subject a random deformation, white-matter lesions, T1w/T2w/PD/FLAIR from MR "
            "signal equations, a bias field and Rician noise, plus the noise-free images, a "
            "brain mask, a white-matter mask and tissue/lesion labels. Writes NIfTI files and "
            "OUT/manifest.csv. Clean white matter is about 100 in every contrast."
        ),
    )
    p.add_argument("out", metavar="OUT", help="output folder")
    p.add_argument(
        "--subjects",
        type=int,
        default=None,
        metavar="N",
        help=f"number of subjects (default {DEFAULT_SUBJECTS}, or the sum of --train/--val/--test)",
    )
    p.add_argument(
        "--voxel-size",
        type=float,
        default=2.0,
        metavar="MM",
        help="isotropic voxel size in mm, at most 8 (default 2)",
    )
    p.add_argument(
        "--seed", type=int, default=0, metavar="S", help="global random seed (default: 0)"
    )
    p.add_argument(
        "--splits",
        default=None,
        metavar="F,F,F",
        help="train,val,test fractions (default 0.6,0.2,0.2)",
    )
    p.add_argument("--train", type=int, default=None, metavar="N", help="number of train subjects")
    p.add_argument("--val", type=int, default=None, metavar="N", help="number of val subjects")
    p.add_argument("--test", type=int, default=None, metavar="N", help="number of test subjects")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a phantom already written to OUT"
    )
    p.set_defaults(func=run)
    return p


def _parse_fractions(text: str) -> tuple[float, float, float]:
    parts = [t.strip() for t in text.split(",")]
    try:
        values = tuple(float(t) for t in parts)
    except ValueError:
        raise ConfigError(
            f"--splits {text!r}: expected three numbers such as 0.6,0.2,0.2"
        ) from None
    if len(values) != 3:
        raise ConfigError(f"--splits {text!r}: expected three numbers (train,val,test)")
    return values[0], values[1], values[2]


def _resolve(args) -> tuple[int, tuple[float, float, float], tuple[int, int, int] | None]:
    given = [getattr(args, k) for k in ("train", "val", "test")]
    if any(g is not None for g in given):
        if args.splits is not None:
            raise ConfigError("give either --splits or --train/--val/--test, not both")
        counts = tuple(0 if g is None else int(g) for g in given)
        if min(counts) < 0:
            raise ConfigError(f"--train/--val/--test must be >= 0, got {counts}")
        n = sum(counts) if args.subjects is None else args.subjects
        if n != sum(counts):
            raise ConfigError(
                f"--subjects {args.subjects} differs from --train + --val + --test = {sum(counts)}"
            )
        if n < 1:
            raise ConfigError("--train + --val + --test must be at least 1")
        return n, (0.6, 0.2, 0.2), (counts[0], counts[1], counts[2])
    fractions = (0.6, 0.2, 0.2) if args.splits is None else _parse_fractions(args.splits)
    n = DEFAULT_SUBJECTS if args.subjects is None else args.subjects
    if n < 1:
        raise ConfigError(f"--subjects must be at least 1, got {n}")
    return n, fractions, None


def run(args) -> int:
    """Simulate the cohort and print where the manifest is."""
    n, fractions, counts = _resolve(args)
    if not args.voxel_size > 0 or args.voxel_size > 8:
        raise ConfigError(f"--voxel-size must be in (0, 8] mm, got {args.voxel_size}")
    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}")

    from yoda.data.phantom import make_phantom

    path = make_phantom(
        args.out,
        n,
        voxel_size=args.voxel_size,
        seed=args.seed,
        splits=fractions,
        counts=counts,
        overwrite=args.overwrite,
    )
    print(f"phantom: {n} subjects at {args.voxel_size:g} mm; manifest: {path}")
    return 0
