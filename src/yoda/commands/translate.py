"""`yoda translate`: source scans in, the target contrast out, in the first source's grid."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from yoda.errors import ConfigError, InputError

MODES = ("regression", "diffusion", "expa")
CORRECTIONS = ("none", "gamma", "linear", "simple")


def _steps(text: str) -> str | int:
    if text in ("truncated", "full"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--steps must be 'truncated', 'full' or a number of steps; got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--steps must be >= 1; got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``translate`` subcommand."""
    p = subparsers.add_parser(
        "translate",
        allow_abbrev=False,
        help="translate source scans into the target contrast",
        description=(
            "Translate one subject (one flag per source named in the model card, e.g. "
            "--t1w a.nii.gz --t2w b.nii.gz --out flair.nii.gz) or a whole manifest "
            "(--data MANIFEST --out-dir DIR). Unknown --<name> PATH pairs name sources."
        ),
    )
    p.add_argument("--model", required=True, help="model directory (model.json + weights)")
    p.add_argument("--out", help="output NIfTI (one subject)")
    p.add_argument("--data", help="manifest (CSV/JSON) for batch mode")
    p.add_argument(
        "--split",
        default=None,
        help="manifest split in batch mode, or all (default: test; every subject where the "
        "manifest gives no splits)",
    )
    p.add_argument("--out-dir", help="output folder in batch mode")
    p.add_argument(
        "--mode", choices=MODES, default="regression", help="sampling mode (default: regression)"
    )
    p.add_argument("--n-ex", type=int, default=None, help="ExpA samples (default: 4)")
    p.add_argument(
        "--views",
        choices=("axial", "coronal", "sagittal", "all"),
        default="all",
        help="regression: views averaged (default: all); diffusion/ExpA: all = orthogonal",
    )
    p.add_argument(
        "--steps",
        type=_steps,
        default=None,
        help="diffusion timesteps: truncated (default, 251 at T=1000), full, or a number N "
        "(a preview: T-1, then N-1 steps evenly spaced in log-SNR)",
    )
    p.add_argument(
        "--slice-correction",
        choices=CORRECTIONS,
        default="none",
        help="homogenize adjacent slices (Eq. 12-13): those of the view translated, axial ones "
        "with several views (default: none)",
    )
    p.add_argument("--mask", help="brain mask (default: automatic foreground mask)")
    p.add_argument(
        "--resample", action="store_true", help="resample inputs onto the first source's grid"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of every random draw (default: 0); batch mode derives each subject's seed "
        "from it and the subject id",
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="slices per network call (default: by slice size, e.g. 32 of 256x256 on CUDA, 8 on "
        "the CPU)",
    )
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="network precision: auto (default) is fp16 autocast on CUDA, fp32 on the CPU; "
        "bf16 or (CUDA) fp16 autocast is faster, within reduced-precision rounding of fp32",
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="channels-last (NHWC) network inputs; the same output up to float32 rounding",
    )
    p.add_argument(
        "--compile",
        metavar="MODE",
        default=None,
        help="torch.compile the network: default, reduce-overhead (CUDA graphs) or "
        "max-autotune; the first calls of each slice size compile, later calls are faster",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "uint8"),
        default="float32",
        help="output data type (default: float32; uint8 rounds the 0-255 scale)",
    )
    p.add_argument(
        "--save-samples",
        action="store_true",
        help="ExpA: also write each sample and the per-voxel std",
    )
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run, accepts_extra=True)


def _source_flags(extra: list[str]) -> dict[str, str]:
    sources: dict[str, str] = {}
    it = iter(extra)
    for token in it:
        if not token.startswith("--") or len(token) < 3:
            raise ConfigError(f"unexpected argument {token!r}")
        name, eq, value = token[2:].partition("=")
        if not eq:
            value = next(it, None)
        if not value or value.startswith("--"):
            raise ConfigError(f"--{name} needs a file path")
        name = name.replace("-", "_").lower()
        if name in sources:
            raise ConfigError(f"--{name} is given twice")
        sources[name] = value
    return sources


def _check_output(out: Path, *, force: bool, samples: int) -> None:
    """Refuse an output (with its sidecar and ``samples`` ExpA samples and their std) that
    cannot be written before any work is done."""
    from yoda.data.io import IMAGE_SUFFIXES, sidecar_path, split_image_suffix
    from yoda.translate import extra_path

    if not split_image_suffix(out)[1]:
        raise InputError(f"output {out} must end in {', '.join(IMAGE_SUFFIXES)}")
    if out.is_dir():
        raise InputError(f"output {out} is a directory, expected a file name")
    labels = [f"sample-{k + 1}" for k in range(samples)] + (["std"] if samples else [])
    extras = [extra_path(out, label) for label in labels]
    for path in (out, sidecar_path(out), *extras):
        if path.exists() and not force:
            raise InputError(f"{path} exists; pass --force to overwrite it")
    folder = out.parent
    if not folder.exists():
        raise InputError(f"output folder {folder} does not exist")
    if not folder.is_dir():
        raise InputError(f"output folder {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"output folder {folder} is not writable")


def run(args: argparse.Namespace) -> int:
    """Run ``yoda translate``."""
    sources = _source_flags(getattr(args, "extra", []))
    if args.n_ex is not None and args.mode != "expa":
        raise ConfigError("--n-ex sets the number of ExpA samples: give --mode expa")
    n_ex = 4 if args.n_ex is None else args.n_ex
    if n_ex < 1:
        raise ConfigError(f"--n-ex must be >= 1; got {n_ex}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.mode == "regression" and args.steps is not None:
        raise ConfigError("--steps sets the diffusion timesteps: give --mode diffusion or expa")
    if args.save_samples and args.mode != "expa":
        raise ConfigError("--save-samples writes the ExpA samples: give --mode expa")
    batch = args.data is not None
    if not batch and (args.out_dir is not None or args.split is not None):
        raise ConfigError("--out-dir and --split are for batch mode (--data)")
    if batch:
        if args.out_dir is None or args.out is not None or sources:
            raise ConfigError("batch mode takes --data and --out-dir (no --out, no source flags)")
        if args.mask is not None:
            raise ConfigError("batch mode takes each subject's mask from the manifest, not --mask")
    else:
        if args.out is None:
            raise ConfigError("give --out (one subject) or --data with --out-dir (batch mode)")
        samples = n_ex if args.save_samples else 0  # --save-samples is refused outside ExpA
        _check_output(Path(args.out), force=args.force, samples=samples)

    from yoda.translate import Translator, check_output_dtype

    translator = Translator.load(
        args.model,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        channels_last=args.channels_last,
        compile=args.compile,
    )
    check_output_dtype(args.dtype, translator.card.target_normalization)
    options = dict(
        mode=args.mode,
        n_ex=n_ex,
        views=args.views,
        steps=args.steps,
        slice_correction=args.slice_correction,
        resample=args.resample,
    )
    if batch:
        return _run_batch(args, translator, options)
    return _run_one(args, translator, options, sources)


def _run_one(args, translator, options, sources) -> int:
    from tqdm import tqdm

    options = dict(options)
    resample = options.pop("resample")
    settings = translator.check_options(seed=args.seed, **options)
    # read and checked before the progress bar shows, so that bad input gives one line
    prepared = translator.prepare(sources, mask=args.mask, resample=resample)
    # the sampler reports views (regression) or timesteps (all ExpA samples in one batch)
    steps = len(settings["views"]) if settings["mode"] == "regression" else settings["timesteps"]
    bar = tqdm(total=steps, desc=f"translate ({args.mode})", unit="step", disable=args.no_progress)

    def progress(k: int, n: int) -> None:
        bar.total = n
        bar.n = k
        bar.refresh()

    try:
        res = translator.translate(
            prepared,
            seed=args.seed,
            keep_samples=args.save_samples,
            progress=progress,
            **options,
        )
    finally:
        bar.close()
    path = res.save(args.out, dtype=args.dtype, overwrite=args.force, extras=args.save_samples)
    info = res.info
    print(f"wrote {path} ({info['mode']}, NFE {info['nfe']}, {info['seconds']:.1f} s)")
    for warning in info["warnings"]:
        print(f"yoda translate: warning: {warning}", file=sys.stderr)
    return 0


def _run_batch(args, translator, options) -> int:
    from yoda.batch import translate_cohort
    from yoda.data.manifest import read_manifest

    manifest = read_manifest(args.data)
    split = manifest.split_for(args.split)
    if split is None and args.split is None:
        print(
            f"yoda translate: note: {args.data} gives no splits: translating every subject",
            file=sys.stderr,
        )
    result = translate_cohort(
        translator,
        manifest,
        split=split,
        out_dir=args.out_dir,
        options=options,
        seed=args.seed,
        force=args.force,
        dtype=args.dtype,
        extras=args.save_samples,
        progress=not args.no_progress,
    )
    print(
        f"translated {len(result.done)}, skipped {len(result.skipped)} already done, "
        f"{len(result.busy)} busy in another run, {len(result.failed)} failed -> {args.out_dir}"
    )
    for sid, warnings in result.warnings.items():
        for warning in warnings:
            print(f"  warning {sid}: {warning}", file=sys.stderr)
    for sid, reason in result.failed.items():
        print(f"  failed {sid}: {reason}", file=sys.stderr)
    return 1 if result.failed else 0
