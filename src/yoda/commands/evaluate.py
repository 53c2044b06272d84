"""`yoda evaluate`: score translations against the acquired targets and write an HTML report."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from yoda.errors import ConfigError

if TYPE_CHECKING:
    from yoda.evaluate.evaluation import Evaluation

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+\-]*$")
NORMALIZATIONS = ("percentile", "tissue", "ct")
MODES = ("regression", "diffusion", "expa")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` subcommand."""
    p = subparsers.add_parser(
        "evaluate",
        allow_abbrev=False,
        help="metrics, paired statistics, figures and an HTML report for translated volumes",
        description=(
            "Score translated volumes <id>_<target>.nii.gz against the acquired targets of a "
            "manifest (and the noise-free targets of a phantom): SSIM, PSNR, noise level, "
            "lesion CNR, WMH segmentation Dice/HD95/ALVR, FID (with --fid-weights), paired "
            "Wilcoxon tests, ICC and Bland-Altman of WMH volumes, worst cases. --pred is a "
            "folder of predictions (one method), a folder with one subfolder per method, or "
            "NAME=DIR; give it several times to compare methods. With --input-noise and "
            "--model the sources are translated again with Rician noise added (robustness). "
            "--out must be a new or empty folder unless --force is given: then an earlier "
            "report there is replaced (the files its report.json lists are rewritten or "
            "removed) and other files are left as they are."
        ),
    )
    p.add_argument(
        "--pred",
        action="append",
        required=True,
        metavar="DIR|NAME=DIR",
        help="prediction folder (repeatable)",
    )
    p.add_argument("--data", required=True, metavar="MANIFEST", help="manifest (CSV/JSON)")
    p.add_argument(
        "--split",
        default=None,
        help="manifest split to evaluate, or all (default: test; every subject where the "
        "manifest gives no splits)",
    )
    p.add_argument(
        "--out", required=True, metavar="REPORT_DIR", help="report folder (new or empty)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --out: an earlier report there is replaced, other files "
        "are kept",
    )
    p.add_argument(
        "--target", default=None, help="target modality (default: from the prediction file names)"
    )
    p.add_argument(
        "--normalization",
        choices=NORMALIZATIONS,
        default="tissue",
        help="intensity normalization of the acquired target when the predictions' sidecars "
        "and model card do not record the model's (default: tissue; ct for a target named ct)",
    )
    p.add_argument(
        "--fid-weights",
        default=None,
        metavar="FILE",
        help="ResNet-50 state dict (.pt/.safetensors, e.g. RadImageNet) for the FID; "
        "without it the FID is skipped",
    )
    p.add_argument(
        "--input-noise",
        default=None,
        metavar="S,S,...",
        help="robustness: Rician noise levels in %% of each source's range, e.g. 0,2,4,6; "
        "needs --model",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="MODEL_DIR",
        help="model for --input-noise (translated as yoda translate does by default: "
        "regression, precision auto)",
    )
    p.add_argument(
        "--noise-mode",
        choices=MODES,
        default="regression",
        help="sampling mode of the robustness translations (default: regression)",
    )
    p.add_argument(
        "--noise-subjects",
        type=int,
        default=None,
        metavar="N",
        help="robustness on the first N subjects of the split (default: all)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (FID, --model)")
    p.add_argument("--seed", type=int, default=0, help="seed of the added noise (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def parse_pred(values: list[str]) -> list[tuple[str | None, Path]]:
    """``DIR`` or ``NAME=DIR`` arguments -> (name or None, folder)."""
    out: list[tuple[str | None, Path]] = []
    for value in values:
        name, eq, folder = value.partition("=")
        if eq and not Path(value).exists():
            if not _NAME.match(name) or not folder:
                raise ConfigError(
                    f"--pred {value!r}: expected DIR or NAME=DIR with a name of letters, "
                    "digits, '.', '_', '+' or '-'"
                )
            out.append((name, Path(folder)))
        else:
            out.append((None, Path(value)))
    return out


def check_out(out: Path, *, force: bool) -> None:
    """Refuse a report folder that exists and is not empty, unless ``force``."""
    from yoda.evaluate.report import REPORT_INDEX, report_files

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if force or not out.is_dir() or not any(out.iterdir()):
        return
    if report_files(out) is not None:
        raise ConfigError(f"--out {out} holds an earlier report; pass --force to replace it")
    raise ConfigError(
        f"--out {out} is not empty and holds no report ({REPORT_INDEX}); give a new or empty "
        "folder, or pass --force to write the report beside its files"
    )


def summary_lines(ev: Evaluation, path: Path) -> list[str]:
    """What was scored (subjects of the split, methods), what was left out and why."""
    scored = ev.scored_subjects()
    total = ev.n_split
    lines = [
        f"scored {len(scored)} of {total} subject(s) of {ev.where}"
        f"{f' ({total - len(scored)} left out)' if len(scored) < total else ''} x "
        f"{len(ev.methods)} method(s) ({', '.join(ev.method_names)}) -> {path}"
    ]
    lines += [f"left out {key}: {why}" for key, why in ev.left_out().items()]
    return lines


def run(args: argparse.Namespace) -> int:
    """Run ``yoda evaluate``."""
    from yoda.config import check_seed

    check_seed(args.seed, "--seed")
    preds = parse_pred(args.pred)
    out = Path(args.out)
    check_out(out, force=args.force)
    if (args.input_noise is None) != (args.model is None):
        raise ConfigError("--input-noise and --model go together (the robustness experiment)")
    if args.noise_subjects is not None and args.noise_subjects < 1:
        raise ConfigError(f"--noise-subjects must be >= 1, got {args.noise_subjects}")
    if args.fid_weights is not None and not Path(args.fid_weights).is_file():
        raise ConfigError(f"--fid-weights {args.fid_weights} is not a file")

    from yoda.data.manifest import read_manifest
    from yoda.evaluate.evaluation import evaluate
    from yoda.evaluate.report import write_report
    from yoda.evaluate.robustness import parse_levels, robustness

    levels = parse_levels(args.input_noise) if args.input_noise is not None else None
    manifest = read_manifest(args.data)
    split = manifest.split_for(args.split)
    device = "cpu"
    if args.fid_weights is not None or args.model is not None:
        from yoda.device import resolve_device

        device = str(resolve_device(args.device))
    ev = evaluate(
        preds,
        manifest,
        split=split,
        normalization=args.normalization,
        fid_weights=args.fid_weights,
        progress=not args.no_progress,
        target=args.target,
        seed=args.seed,
        device=device,
    )
    rob = None
    if levels is not None:
        from yoda.translate import Translator

        translator = Translator.load(args.model, device=device)
        rob = robustness(
            translator,
            manifest,
            split,
            levels,
            mode=args.noise_mode,
            seed=args.seed,
            max_subjects=args.noise_subjects,
            progress=not args.no_progress,
        )
    path = write_report(ev, out, robustness=rob)
    left_out = ev.left_out()
    named = {  # the notes of failures that the summary names as left out
        f"not evaluated: {key}: {reason}"
        for key, reason in ev.failed.items()
        if {key, key.split(" ")[0]} & left_out.keys()
    }
    for note in ev.notes:
        if note not in named:
            print(f"note: {note}", file=sys.stderr)
    print("\n".join(summary_lines(ev, path)))
    return 0
