"""Robustness to noisy inputs (paper Fig. 10): add Rician noise to the sources, translate, score.

For every subject and input-noise level ``sigma`` (in % of the source's range, as in the
paper's Fig. 10: the range of the network's input is the 0-255 scale), each source image gets
Rician noise (Eq. 1) of standard deviation ``s = sigma / 100 * 255`` *on that source's own 0-255
scale*: with the source's intensity fit ``x255 = (raw - offset) * scale`` (the model's
normalization of that source, fitted inside the brain mask), the noise is added in raw units
with the standard deviation ``s / scale``: ``noisy = |raw - offset + n_re + i n_im| + offset``,
``n ~ N(0, (s / scale)^2)``. The noisy sources are translated (the brain mask is passed on,
so the ROI does not change with the noise) and the output is scored against the acquired
target (and the clean target of a phantom): SSIM and PSNR inside the brain mask and the
output's noise level sigma_WM (Eq. 14). Level 0 translates the sources as they are.

The noise of one subject, level and source comes from a generator seeded by ``(seed, subject
index, level index, source index)``, and every translation of a subject uses one sampling seed,
so differences between levels come from the input noise alone.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from yoda.data.io import check_same_grid, load_image
from yoda.data.manifest import Manifest
from yoda.data.normalize import fit_intensity
from yoda.data.subject import resolve_normalization
from yoda.errors import ConfigError, InputError
from yoda.evaluate import metrics as M
from yoda.evaluate import stats as S
from yoda.evaluate.evaluation import _load_manifest, _load_reference, _scores, prediction_to_255

__all__ = ["ROBUSTNESS_METRICS", "Robustness", "parse_levels", "robustness"]

ROBUSTNESS_METRICS = ("ssim_acq", "psnr_acq", "ssim_clean", "psnr_clean", "sigma_wm")
"""Metrics of the translated image per input-noise level."""


@dataclass
class Robustness:
    """Results of the input-noise experiment.

    Attributes
    ----------
    mode : sampling mode used.
    target : target modality.
    normalization : intensity method of the model's target (the acquired target's scale).
    levels : input-noise standard deviations (% of the 0-255 range of each source).
    rows : one dict per subject x level: subject, sigma_in, seconds and
        :data:`ROBUSTNESS_METRICS` (nan where undefined).
    summary : one dict per level: sigma_in, n and ``<metric>_mean`` / ``<metric>_std``.
    acquired_sigma_wm, clean_sigma_wm : mean noise level of the acquired and the clean target.
    subjects : subject ids evaluated.
    failed : "<subject> sigma <s>" -> reason.
    notes : messages for the report.
    """

    mode: str
    target: str
    normalization: str
    levels: list[float]
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    acquired_sigma_wm: float = math.nan
    clean_sigma_wm: float = math.nan
    subjects: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def parse_levels(text: str | Sequence[float]) -> list[float]:
    """Input-noise levels from "0,2,4,6" (or a sequence): non-negative, unique, sorted."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(
                f"input-noise levels {text!r}: expected numbers separated by commas, e.g. 0,2,4,6"
            ) from None
    else:
        try:
            values = [float(v) for v in text]
        except (TypeError, ValueError):
            raise ConfigError(f"input-noise levels {text!r}: expected numbers") from None
    if not values:
        raise ConfigError("input-noise levels: give at least one level, e.g. 0,2,4,6")
    bad = [v for v in values if not math.isfinite(v) or v < 0]
    if bad:
        raise ConfigError(f"input-noise levels must be finite and >= 0, got {bad}")
    return sorted(set(values))


def _translation_seed(seed: int, subject_id: str) -> int:
    digest = hashlib.sha256(f"robustness:{seed}:{subject_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _card_value(card: Any, name: str) -> Any:
    if isinstance(card, Mapping):
        return card.get(name)
    return getattr(card, name, None)


def robustness(
    translator: Any,
    manifest: Manifest | str | os.PathLike,
    split: str | None = "test",
    levels: Sequence[float] | str = (0.0, 2.0, 4.0, 6.0),
    mode: str = "regression",
    seed: int = 0,
    *,
    max_subjects: int | None = None,
    options: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Robustness:
    """Translate noisy copies of the sources and score the outputs (Fig. 10).

    Parameters
    ----------
    translator : a :class:`yoda.translate.Translator` or any object with ``sources`` (names in
        channel order), ``card`` (``target`` and ``normalization`` = {"method": ...}) and
        ``translate(sources, *, mode, mask, seed, **options)`` returning an object with
        ``.image`` (canonical array on the output scale).
    manifest : manifest path or :class:`~yoda.data.manifest.Manifest`.
    split : split whose subjects are used (None: all).
    levels : input-noise standard deviations in % of each source's 0-255 range, or "0,2,4,6".
    mode : sampling mode passed to ``translate``.
    seed : seed of the added noise and of the sampling.
    max_subjects : use at most this many subjects (in manifest order).
    options : further keyword arguments of ``translate`` (e.g. ``steps``, ``n_ex``).
    progress : show a progress bar.

    Raises
    ------
    ConfigError for bad levels or options; InputError when no subject can be evaluated.
    """
    from tqdm import tqdm

    lv = parse_levels(levels)
    man, _ = _load_manifest(manifest)
    card = translator.card
    target = str(_card_value(card, "target"))
    sources = list(translator.sources)
    fits = resolve_normalization(_card_value(card, "normalization"), [*sources, target])
    norm = fits[target]["method"]
    if max_subjects is not None and (isinstance(max_subjects, bool) or int(max_subjects) < 1):
        raise ConfigError(f"max_subjects must be >= 1, got {max_subjects!r}")
    subjects = man.split(split).subjects
    usable = [s for s in subjects if target in s.images and all(n in s.images for n in sources)]
    notes: list[str] = []
    if len(usable) < len(subjects):
        notes.append(
            f"{len(subjects) - len(usable)} subject(s) of split {split!r} lack the target "
            f"{target} or a source ({', '.join(sources)}) and are left out"
        )
    if max_subjects is not None and len(usable) > int(max_subjects):
        usable = usable[: int(max_subjects)]
        notes.append(f"input-noise experiment on the first {len(usable)} subjects")
    if not usable:
        raise InputError(
            f"no subject of split {split!r} has the target {target} and the sources "
            f"{', '.join(sources)}"
        )
    extra = dict(options or {})
    rows: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    acq_noise: list[float] = []
    clean_noise: list[float] = []
    done: list[str] = []
    bar = tqdm(total=len(usable) * len(lv), desc="input noise", unit="run", disable=not progress)
    for si, subject in enumerate(usable):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", M.MetricWarning)
            try:
                ref = _load_reference(subject, target)
                raw = {}
                for name in sources:
                    arr, geom = load_image(subject.images[name], name=f"{subject.id} {name}")
                    check_same_grid({"target": ref.geometry, name: geom})
                    fit = fit_intensity(arr, ref.mask, name=f"{subject.id} {name}", **fits[name])
                    raw[name] = (arr, fit)
            except InputError as exc:
                failed[subject.id] = str(exc)
                bar.update(len(lv))
                continue
            acq, clean = ref.on_scale(norm)
            if ref.wm is not None:
                acq_noise.append(M.noise_level(acq, ref.wm))
                if clean is not None:
                    clean_noise.append(M.noise_level(clean, ref.wm))
            affine = ref.geometry.canonical_affine
            mask = (ref.mask.astype(np.uint8), affine)
            tseed = _translation_seed(seed, subject.id)
            for li, sigma in enumerate(lv):
                bar.set_postfix_str(f"{subject.id} sigma {sigma:g}")
                noisy = {}
                for ci, name in enumerate(sources):
                    arr, fit = raw[name]
                    if sigma > 0:
                        rng = np.random.default_rng([int(seed), si, li, ci])
                        std = sigma / 100.0 * 255.0 / fit.scale
                        arr = (M.rician_noise(arr - fit.offset, std, rng) + fit.offset).astype(
                            np.float32
                        )
                    noisy[name] = (arr, affine)
                try:
                    res = translator.translate(noisy, mode=mode, mask=mask, seed=tseed, **extra)
                    img = prediction_to_255(np.asarray(res.image), norm)
                    if img.shape != ref.raw.shape:
                        raise InputError(
                            f"the translation has shape {img.shape}, the target {ref.raw.shape}"
                        )
                    scores = _scores(ref, img, norm, lesion_metrics=False)
                except InputError as exc:
                    failed[f"{subject.id} sigma {sigma:g}"] = str(exc)
                    bar.update(1)
                    continue
                info = getattr(res, "info", None) or {}
                seconds = info.get("seconds") if isinstance(info, Mapping) else None
                rows.append(
                    {
                        "subject": subject.id,
                        "sigma_in": sigma,
                        "seconds": float(seconds)
                        if isinstance(seconds, (int, float))
                        else math.nan,
                        **{k: float(scores[k]) for k in ROBUSTNESS_METRICS},
                    }
                )
                bar.update(1)
            done.append(subject.id)
    bar.close()
    if not rows:
        details = "; ".join(f"{k}: {v}" for k, v in list(failed.items())[:3])
        raise InputError(f"the input-noise experiment produced no result ({details})")
    for key, reason in failed.items():
        notes.append(f"input noise: not evaluated: {key}: {reason}")
    summary = []
    for sigma in lv:
        sel = [r for r in rows if r["sigma_in"] == sigma]
        entry: dict[str, Any] = {"sigma_in": sigma, "n": len(sel)}
        for key in (*ROBUSTNESS_METRICS, "seconds"):
            entry[f"{key}_mean"], entry[f"{key}_std"] = S.mean_std([r[key] for r in sel])
        summary.append(entry)
    return Robustness(
        mode=mode,
        target=target,
        normalization=str(norm),
        levels=lv,
        rows=rows,
        summary=summary,
        acquired_sigma_wm=S.mean_std(acq_noise)[0],
        clean_sigma_wm=S.mean_std(clean_noise)[0],
        subjects=done,
        failed=failed,
        notes=notes,
    )
