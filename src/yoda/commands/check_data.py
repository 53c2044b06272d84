"""`yoda check-data`: build a manifest from a dataset folder and verify every subject."""

from __future__ import annotations

import argparse
from pathlib import Path

from yoda.errors import InputError

#: File suffixes of a manifest that ``--data`` accepts.
MANIFEST_SUFFIXES = (".csv", ".tsv", ".json")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``check-data`` subcommand."""
    from yoda.data.manifest import DEFAULT_FRACTIONS, LAYOUTS

    p = subparsers.add_parser(
        "check-data",
        help="verify a dataset (readable, co-registered, finite, non-empty masks); "
        "optionally write its manifest",
        description="Read a manifest (CSV/JSON) or a dataset folder (BIDS, BraTS 2023, IXI, "
        "phantom), verify every subject and report all problems at once (one line each, then a "
        "summary). Exit code 1 if any problem was found, 0 otherwise.",
    )
    p.add_argument(
        "--data", required=True, help="manifest file (.csv, .tsv or .json) or dataset folder"
    )
    p.add_argument(
        "--layout", default="auto", choices=LAYOUTS, help="dataset layout (default: auto-detect)"
    )
    p.add_argument(
        "--modalities",
        nargs="+",
        default=None,
        metavar="NAME",
        help="modalities every subject must have (default: check whatever each subject has)",
    )
    p.add_argument(
        "--write-manifest",
        default=None,
        metavar="OUT",
        help="write the manifest (.csv or .json); an existing file only with --force",
    )
    p.add_argument("--force", action="store_true", help="replace an existing --write-manifest file")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the split shuffle for layouts without splits"
    )
    p.add_argument(
        "--fractions",
        type=float,
        nargs=3,
        default=list(DEFAULT_FRACTIONS),
        metavar=("TRAIN", "VAL", "TEST"),
        help="split fractions for layouts without splits (default: 0.8 0.1 0.1)",
    )
    p.add_argument("--no-verify", action="store_true", help="only build (and write) the manifest")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def check_paths(args: argparse.Namespace) -> None:
    """Refuse a ``--data`` file that is no manifest and a ``--write-manifest`` that cannot be
    written (or exists, without ``--force``) before any work."""
    data = Path(args.data).expanduser()
    if (
        args.layout in ("auto", "manifest")
        and data.is_file()
        and data.suffix.lower() not in MANIFEST_SUFFIXES
    ):
        raise InputError(
            f"--data {data} is not a manifest (.csv, .tsv or .json) or a dataset folder"
        )
    if args.write_manifest is None:
        return
    out = Path(args.write_manifest).expanduser()
    if out.suffix.lower() not in (".csv", ".json"):
        raise InputError(
            f"--write-manifest {out}: unknown format {out.suffix!r} (use .csv or .json)"
        )
    if out.is_dir():
        raise InputError(f"--write-manifest {out} is a folder, expected a file name")
    if out.exists() and not args.force:
        raise InputError(f"--write-manifest {out} exists; pass --force to replace it")


def run(args: argparse.Namespace) -> int:
    """Build the manifest, optionally write it, verify all subjects; 1 if any problem."""
    from yoda.data.manifest import check_data, load_manifest, write_manifest

    check_paths(args)
    modalities = [m.lower() for m in args.modalities] if args.modalities else None
    manifest = load_manifest(
        args.data, args.layout, seed=args.seed, fractions=tuple(args.fractions)
    )
    splits = ", ".join(f"{k} {v}" for k, v in sorted(manifest.splits.items()))
    print(
        f"{len(manifest)} subjects ({splits}); modalities: {', '.join(manifest.modalities)}",
        flush=True,
    )
    if args.write_manifest:
        out = write_manifest(manifest, args.write_manifest)
        print(f"wrote manifest {out}", flush=True)
    if args.no_verify:
        return 0
    problems = check_data(manifest, modalities, progress=not args.quiet)
    for line in problems:
        print(line)
    bad = {line.split(": ", 1)[0] for line in problems}
    n_bad = sum(sid in bad for sid in manifest.ids)
    if problems:
        print(
            f"check-data: {len(problems)} problem(s) in {n_bad} of {len(manifest)} subject(s)",
            flush=True,
        )
        return 1
    print(f"check-data: all {len(manifest)} subjects OK", flush=True)
    return 0
