"""The demo: fresh phantom subjects, every sampling mode, an evaluation and its report.

It shows, on data with a known noise-free truth, that one-step regression sampling matches or
beats diffusion sampling at a fraction of the cost (the paper's main finding).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from yoda.errors import ConfigError, InputError, ModelError, YodaError

#: The bundled model's folder inside the package (T1w + T2w -> FLAIR, phantom at 3 mm).
BUNDLED_MODEL = "phantom-flair"
#: ExpA sample counts run by the demo.
EXPA_SIZES = (4, 10)
#: Diffusion timesteps of the demo's preview, evenly spaced in log-SNR (``full=True``: the
#: paper's 251).
PREVIEW_STEPS = 5
#: Seed of the demo's phantom subjects (and of its sampling).
DEMO_SEED = 2024


def bundled_model_dir() -> Path:
    """Path of the model shipped with the package (safetensors + JSON)."""
    path = Path(str(resources.files("yoda") / "assets" / BUNDLED_MODEL))
    if not (path / "model.json").is_file():
        raise ModelError(
            f"the bundled model is missing from {path}; reinstall yoda or pass --train"
        )
    return path


@dataclass
class DemoResult:
    """Where the demo wrote its outputs, and the rows of its summary table."""

    out_dir: Path
    report: Path
    manifest: Path
    model_dir: Path
    methods: dict[str, dict[str, Any]]
    summary: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def methods_for(
    full: bool, steps: int | None = None, expa_sizes: tuple[int, ...] = EXPA_SIZES
) -> dict[str, dict[str, Any]]:
    """Sampling modes of the demo: name -> options of :meth:`Translator.translate`."""
    diffusion_steps = "truncated" if full else (steps or PREVIEW_STEPS)
    methods: dict[str, dict[str, Any]] = {"regression": {"mode": "regression", "views": "all"}}
    methods["diffusion"] = {"mode": "diffusion", "steps": diffusion_steps}
    for n in expa_sizes:
        methods[f"expa-{n}"] = {"mode": "expa", "n_ex": n, "steps": diffusion_steps}
    return methods


def run_demo(
    out_dir: str | os.PathLike,
    *,
    subjects: int = 3,
    voxel_size: float = 3.0,
    seed: int = DEMO_SEED,
    full: bool = False,
    steps: int | None = None,
    train: bool = False,
    train_steps: int = 600,
    model_dir: str | os.PathLike | None = None,
    device: str = "auto",
    precision: str = "auto",
    expa_sizes: tuple[int, ...] = EXPA_SIZES,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Simulate test subjects, translate them in every mode, evaluate, write the report.

    Parameters
    ----------
    out_dir : path
        Output folder (phantom/, predictions/<method>/, report/).
    subjects : int
        Fresh phantom test subjects (seeded apart from the bundled model's training data).
    voxel_size : float
        Phantom voxel size in mm (the bundled model was trained at 3 mm).
    full : bool
        Run the paper's truncated sampler (251 NFE) instead of the preview.
    steps : int, optional
        Timesteps of the preview (default :data:`PREVIEW_STEPS`), chosen by
        :func:`yoda.diffusion.sampling.timesteps_preview`.
    train : bool
        Train a tiny model from scratch (``train_steps`` steps) instead of the bundled one.
    model_dir : path, optional
        Use this model instead of the bundled one.
    device, precision : str
        Where and in which precision to translate (as ``yoda translate``; "auto": CUDA when
        available, in fp16 there).
    """
    from yoda.batch import translate_cohort
    from yoda.config import check_seed
    from yoda.data.manifest import read_manifest
    from yoda.data.phantom import make_phantom
    from yoda.evaluate.evaluation import evaluate
    from yoda.evaluate.report import write_report
    from yoda.translate import Translator

    if subjects < 1:
        raise ConfigError(f"--subjects must be >= 1; got {subjects}")
    if steps is not None and steps < 2:
        raise ConfigError(f"--steps must be >= 2; got {steps}")
    if steps is not None and full:
        raise ConfigError("--full runs the paper's 251 timesteps; give --full or --steps")
    if train and train_steps < 1:
        raise ConfigError(f"--train-steps must be >= 1; got {train_steps}")
    check_seed(seed, "--seed")
    start = time.perf_counter()
    methods = methods_for(full, steps, expa_sizes)
    # the model and every mode's options are checked before anything is written
    translator = None
    if model_dir is not None or not train:
        model = Path(model_dir) if model_dir is not None else bundled_model_dir()
        translator = Translator.load(model, device=device, precision=precision)
        for options in methods.values():
            translator.check_options(**options)
    else:  # the model trained below has the schedule of TrainConfig's defaults
        from yoda.config import ModelConfig
        from yoda.diffusion.sampling import timesteps_for
        from yoda.diffusion.schedule import make_schedule

        schedule = make_schedule(ModelConfig.schedule, ModelConfig.T)
        for options in methods.values():
            timesteps_for(schedule, options.get("steps"))
        trained = _earlier_training(Path(out_dir) / "train", train_steps)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create the demo folder {out}: {err}") from None
    n_train = 4 if train else 0
    counts = (n_train, 1 if train else 0, subjects)
    phantom_dir = out / "phantom"
    manifest_path = phantom_dir / "manifest.csv"
    if manifest_path.exists():
        _check_phantom(phantom_dir, voxel_size, seed, counts)
        log(f"[1/4] reusing the phantom in {phantom_dir}")
    else:
        log(f"[1/4] simulating {subjects} phantom test subjects at {voxel_size:g} mm")
        make_phantom(
            phantom_dir,
            sum(counts),
            voxel_size=voxel_size,
            seed=seed,
            counts=counts,
            progress=progress,
        )
    if translator is None:
        if trained is not None:
            model = trained
            log(f"      reusing the model trained in {model.parent}")
        else:
            model = _train_from_scratch(
                manifest_path, out / "train", train_steps, device, progress, log
            )
        translator = Translator.load(model, device=device, precision=precision)
    log(f"[2/4] translating with {model}")
    manifest = read_manifest(manifest_path)
    pred_dirs: dict[str, Path] = {}
    for name, options in methods.items():
        t0 = time.perf_counter()
        res = translate_cohort(
            translator,
            manifest,
            split="test",
            out_dir=out / "predictions" / name,
            options=options,
            seed=seed,
            progress=progress,
            replace_other=True,  # a rerun with other options replaces the demo's own outputs
        )
        if res.failed:
            raise ModelError(f"{name}: translation failed: {res.failed}")
        pred_dirs[name] = out / "predictions" / name
        took = f"{time.perf_counter() - t0:6.1f} s" if res.done else "reused"
        log(f"      {name:<11} {took}")
    log("[3/4] evaluating")
    ev = evaluate(
        pred_dirs,
        manifest,
        split="test",
        normalization=translator.card.target_normalization,
        progress=progress,
    )
    log("[4/4] writing the report")
    report = write_report(ev, out / "report")
    return DemoResult(
        out_dir=out,
        report=report,
        manifest=manifest_path,
        model_dir=model,
        methods=methods,
        summary=ev.summary,
        seconds=time.perf_counter() - start,
    )


def _check_phantom(
    folder: Path, voxel_size: float, seed: int, counts: tuple[int, int, int]
) -> None:
    """Refuse to reuse a demo's phantom made with other subjects, voxel size or seed."""
    try:
        made = json.loads((folder / "phantom.json").read_text(encoding="utf-8"))
        found = (
            float(made["voxel_size"]),
            int(made["seed"]),
            tuple(int(made["counts"][s]) for s in ("train", "val", "test")),
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(
            f"{folder} is not a phantom of the demo ({err}); choose another --out"
        ) from None
    if found != (float(voxel_size), int(seed), tuple(counts)):
        raise ConfigError(
            f"{folder} holds {found[2][2]} test subject(s) at {found[0]:g} mm (seed {found[1]}, "
            f"{found[2][0]} for training); this demo asks for {counts[2]} at {voxel_size:g} mm "
            f"(seed {seed}, {counts[0]} for training): choose another --out or remove the folder"
        )


def _earlier_training(run_dir: Path, steps: int) -> Path | None:
    """The model an earlier ``--train`` demo trained in ``run_dir`` for ``steps`` steps; None
    if there is no run; refuse any other run there."""
    from yoda.model.checkpoint import read_card

    if not run_dir.exists():
        return None
    model = run_dir / "model"
    try:
        if read_card(model).steps == steps:
            return model
    except YodaError:
        pass
    raise ConfigError(
        f"{run_dir} holds no model trained by --train for {steps} steps (another or an "
        "unfinished run); choose another --out or remove the folder"
    )


def _train_from_scratch(
    manifest: Path, run_dir: Path, steps: int, device: str, progress: bool, log: Callable
) -> Path:
    from yoda.config import TrainConfig, validate
    from yoda.train import train

    log(f"      training a tiny model from scratch ({steps} steps) in {run_dir}")
    cfg = TrainConfig()
    cfg.data.manifest = str(manifest)
    cfg.data.sources = ("t1w", "t2w")
    cfg.data.target = "flair"
    cfg.data.normalization = "tissue"
    cfg.model.preset = "tiny"
    cfg.optim.batch_size = 16
    cfg.optim.lr = 1e-3
    cfg.optim.high_t_share = 0.3
    cfg.run.out = str(run_dir)
    cfg.run.steps = steps
    cfg.run.device = device
    cfg.run.checkpoint_every = 0
    cfg.run.val_every = 0
    return train(validate(cfg), progress=progress)


def format_summary(summary: list[dict[str, Any]]) -> str:
    """A short plain-text table of the demo's summary rows."""
    cols = [
        ("method", "method", "{}"),
        ("time_s_mean", "time/subj (s)", "{:.1f}"),
        ("nfe", "NFE", "{:.4g}"),
        ("ssim_acq_mean", "SSIM acq (%)", "{:.2f}"),
        ("psnr_acq_mean", "PSNR acq (dB)", "{:.2f}"),
        ("ssim_clean_mean", "SSIM clean (%)", "{:.2f}"),
        ("psnr_clean_mean", "PSNR clean (dB)", "{:.2f}"),
        ("sigma_wm_mean", "noise sigma_WM", "{:.2f}"),
    ]
    rows = [[title for _, title, _ in cols]]
    for entry in summary:
        row = []
        for key, _, fmt in cols:
            value = entry.get(key)
            if key.startswith("ssim") and isinstance(value, float):
                value = 100.0 * value
            if value is None or (isinstance(value, float) and value != value):
                row.append("-")
            else:
                row.append(fmt.format(value))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
