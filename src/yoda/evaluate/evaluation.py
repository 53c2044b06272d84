"""Evaluate translated volumes: load predictions, score every subject and method, compare methods.

Predictions are NIfTI files ``<id>_<target>.nii.gz`` (as ``yoda translate --data`` writes them)
with an optional sidecar ``<id>_<target>.json`` (mode, NFE, seconds, timesteps, ...). One folder
holds the predictions of one method; :func:`find_methods` resolves a folder of predictions, a
folder of method subfolders, or explicit ``{name: folder}`` pairs.

Scales. Predictions are on the 0-255 scale the model writes (CT predictions in HU are mapped
with the fixed CT window). The acquired target is brought to the same scale with the
normalization the model used (recorded in the sidecar or the model card; else the method
passed in), fitted inside the brain mask. The noise-free target of a phantom (``clean_<target>``)
is mapped with the *acquired* target's fit, so that both references share one scale.

Per subject and method (:data:`METRICS`): SSIM and PSNR inside the brain mask (the manifest's
mask, else the target's foreground mask; data range 255, on the mask's bounding box)
against the acquired and the clean target; the noise level sigma_WM (Eq. 14) in the
white-matter mask (label "wm", else tissue label 3); the lesion CNR (Eq. 15) of the lesion
labels ("wmh", else tissue label 4); and, for FLAIR-like targets, a white-matter hyperintensity
segmentation (:func:`yoda.evaluate.metrics.segment_wmh`, the same rule for acquired and
translated images) scored against the lesion labels by Dice, HD95 and ALVR, with its volume in
ml. The acquired and the clean target are scored the same way as references.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from yoda.data.io import Geometry, check_same_grid, load_image, sidecar_path
from yoda.data.manifest import Manifest, Subject, read_manifest
from yoda.data.normalize import NORMALIZATIONS, apply_intensity, fit_intensity, foreground_mask
from yoda.data.subject import method_of
from yoda.errors import ConfigError, InputError
from yoda.evaluate import metrics as M
from yoda.evaluate import stats as S

__all__ = [
    "FLAIR_LIKE",
    "METRICS",
    "NOISE_SIGMAS",
    "QC_FRACTION",
    "REFERENCES",
    "Evaluation",
    "FeatureStats",
    "MethodPredictions",
    "MetricSpec",
    "axial_center",
    "evaluate",
    "find_methods",
    "prediction_to_255",
]

FLAIR_LIKE = ("flair", "t2f")
"""Targets on which white-matter hyperintensities are segmented (downstream task)."""
NOISE_SIGMAS = (2.0, 4.0, 6.0, 8.0)
"""Rician noise levels (0-255 scale) added to the regression output for the perception plot."""
QC_FRACTION = 0.1
"""Fraction of subjects listed as the worst cases (at least one)."""
REFERENCES = ("acquired", "clean")
"""Names of the reference rows: the acquired target and the noise-free target (phantom)."""
PRED_SUFFIXES = (".nii.gz", ".nii")
WM_TISSUE_LABEL = 3
WMH_TISSUE_LABEL = 4
TRUNCATED_PAPER = 251
"""Timesteps of the paper's truncated diffusion sampler at T = 1000."""
#: How a note names a diffusion run with fewer timesteps than the truncated sampler.
PREVIEW_LABEL = "short preview"
_MODE_RANK = {"regression": 0, "expa": 1, "diffusion": 2}


@dataclass(frozen=True)
class MetricSpec:
    """A per-subject metric: key in the rows, label, unit and how it is shown.

    ``scale`` multiplies values for display (100 for %); ``better`` is "higher", "lower" or ""
    (no preferred direction, e.g. the noise level).
    """

    key: str
    label: str
    unit: str = ""
    scale: float = 1.0
    digits: int = 2
    better: str = "higher"


METRICS = (
    MetricSpec("ssim_acq", "SSIM vs acquired", "%", 100.0, 2, "higher"),
    MetricSpec("psnr_acq", "PSNR vs acquired", "dB", 1.0, 2, "higher"),
    MetricSpec("ssim_clean", "SSIM vs clean", "%", 100.0, 2, "higher"),
    MetricSpec("psnr_clean", "PSNR vs clean", "dB", 1.0, 2, "higher"),
    MetricSpec("sigma_wm", "σ_WM", "0-255", 1.0, 2, ""),
    MetricSpec("cnr", "lesion CNR", "", 1.0, 2, "higher"),
    MetricSpec("dice", "Dice", "%", 100.0, 2, "higher"),
    MetricSpec("hd95", "HD95", "mm", 1.0, 2, "lower"),
    MetricSpec("alvr", "ALVR", "", 1.0, 3, "lower"),
    MetricSpec("lesion_ml", "WMH volume", "ml", 1.0, 2, ""),
)
METRIC_KEYS = tuple(m.key for m in METRICS)
ROW_KEYS = ("subject", "method", "mode", "time_s", "nfe", *METRIC_KEYS)


# --------------------------------------------------------------------------- predictions


@dataclass
class MethodPredictions:
    """The predictions of one method.

    Attributes
    ----------
    name : method name (folder name, sidecar mode, or given).
    folder : where the files are.
    files : subject id -> prediction file (subjects of the evaluated split only).
    sidecars : subject id -> sidecar dictionary (empty dict when there is none).
    missing : subject ids of the split without a prediction.
    mode : sampling mode from the sidecars ("regression", "diffusion", "expa") or None.
    normalization : intensity method used to put the acquired target on the model's scale.
    description : how the method was run, from its sidecars (one line).
    """

    name: str
    folder: Path
    files: dict[str, Path]
    sidecars: dict[str, dict[str, Any]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    mode: str | None = None
    normalization: str = "tissue"
    description: str = ""


def _scan(
    folder: Path, ids: Sequence[str], modalities: Sequence[str]
) -> dict[str, dict[str, Path]]:
    """Prediction files in ``folder``: modality -> {subject id -> path}."""
    try:
        names = {p.name for p in folder.iterdir() if p.is_file()}
    except OSError as exc:
        raise InputError(f"prediction folder {folder} cannot be read: {exc}") from None
    found: dict[str, dict[str, Path]] = {}
    for sid in ids:
        for mod in modalities:
            for suffix in PRED_SUFFIXES:
                name = f"{sid}_{mod}{suffix}"
                if name in names:
                    found.setdefault(mod, {})[sid] = folder / name
                    break
    return found


def _read_sidecar(path: Path, notes: list[str]) -> dict[str, Any]:
    side = sidecar_path(path)
    if not side.is_file():
        return {}
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        notes.append(f"sidecar {side} cannot be read ({exc}); its time and NFE are left out")
        return {}
    if not isinstance(data, dict):
        notes.append(f"sidecar {side} is not a JSON object; its time and NFE are left out")
        return {}
    return data


def _mode_label(sidecar: Mapping[str, Any]) -> str | None:
    mode = sidecar.get("mode")
    if not isinstance(mode, str) or not mode:
        return None
    n_ex = sidecar.get("n_ex")
    if mode == "expa" and isinstance(n_ex, int) and not isinstance(n_ex, bool):
        return f"expa-{n_ex}"
    return mode


@lru_cache(maxsize=64)
def _read_card(model_dir: str) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(model_dir) / "model.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _model_card(sidecar: Mapping[str, Any]) -> dict[str, Any] | None:
    """The model card (``model.json``) of the model named in a sidecar, if it can be read."""
    model = sidecar.get("model")
    if not isinstance(model, str) or not model:
        return None
    return _read_card(model)


def _recorded_normalization(sidecar: Mapping[str, Any]) -> str | None:
    """The target's intensity method: the sidecar's record, else the model card's (named in
    the sidecar, where it can be read; a target named ``ct`` uses the CT window whatever the
    card's default)."""
    value = sidecar.get("normalization")
    if isinstance(value, Mapping):
        value = value.get("method")
    if isinstance(value, str) and value in NORMALIZATIONS:
        return value
    card = _model_card(sidecar)
    target = card.get("target") if card is not None else None
    if isinstance(target, str) and target:
        try:
            return method_of(card.get("normalization"), target)
        except (ConfigError, TypeError, ValueError):
            pass
    return None


def _recorded_T(sidecar: Mapping[str, Any]) -> int | None:
    value = sidecar.get("T")
    if value is None:
        card = _model_card(sidecar)
        value = card.get("T") if card is not None else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return None


def _describe(method: MethodPredictions) -> tuple[str, str | None]:
    """One line on how a method was run, and a warning when diffusion was a short preview."""
    sides = [s for s in method.sidecars.values() if s]
    if not sides:
        return "no sidecars: mode, time and NFE unknown", None
    parts: list[str] = []
    modes = sorted({str(s.get("mode")) for s in sides if s.get("mode")})
    if modes:
        parts.append("mode " + "/".join(modes))
    n_ex = sorted({s["n_ex"] for s in sides if isinstance(s.get("n_ex"), int)})
    if n_ex:
        parts.append("N_Ex " + "/".join(str(n) for n in n_ex))
    views = sorted({",".join(s["views"]) for s in sides if isinstance(s.get("views"), list)})
    if views:
        parts.append("views " + " | ".join(views))
    nfe = sorted({s["nfe"] for s in sides if isinstance(s.get("nfe"), (int, float))})
    if nfe:
        parts.append("NFE " + "/".join(f"{n:g}" for n in nfe))
    warning = None
    if method.mode in ("diffusion", "expa"):
        counts = sorted(
            {int(s["timesteps"]) for s in sides if isinstance(s.get("timesteps"), (int, float))}
        )
        big_t = next((t for t in (_recorded_T(s) for s in sides) if t is not None), None)
        if counts:
            k = counts[0]
            T = big_t or 1000
            truncated = T // 4 + 1
            assumed = "" if big_t else " (T = 1000 assumed: not recorded)"
            if k < truncated:
                ref = (
                    f"the paper's {TRUNCATED_PAPER}"
                    if T == 1000
                    else f"the truncated sampler's {truncated} at T = {T}"
                )
                warning = (
                    f"{method.name}: diffusion used {k} timesteps ({PREVIEW_LABEL}), "
                    f"not {ref}{assumed}"
                )
                parts.append(f"{k} timesteps ({PREVIEW_LABEL})")
            elif k == T:
                parts.append(f"{k} timesteps (full sampler, T = {T})")
            else:
                parts.append(f"{k} timesteps (truncated sampler, T = {T}){assumed}")
    corrections = sorted(
        {
            str(s["slice_correction"])
            for s in sides
            if s.get("slice_correction") not in (None, "none")
        }
    )
    if corrections:
        parts.append("slice correction " + "/".join(corrections))
    parts.append(f"target normalization {method.normalization}")
    return "; ".join(parts), warning


def _pred_entries(preds: Any) -> list[tuple[str | None, Path]]:
    if isinstance(preds, Mapping):
        return [(str(k), Path(v)) for k, v in preds.items()]
    if isinstance(preds, (str, os.PathLike)):
        return [(None, Path(preds))]
    if isinstance(preds, Iterable):
        out: list[tuple[str | None, Path]] = []
        for item in preds:
            if isinstance(item, (str, os.PathLike)):
                out.append((None, Path(item)))
            elif isinstance(item, Sequence) and len(item) == 2:
                out.append((None if item[0] is None else str(item[0]), Path(item[1])))
            else:
                raise ConfigError(
                    f"predictions: expected paths or (name, path) pairs, got {item!r}"
                )
        return out
    raise ConfigError(
        f"predictions: expected a folder or {{name: folder}}, got {type(preds).__name__}"
    )


def find_methods(
    preds: Any,
    manifest: Manifest,
    *,
    split: str | None = "test",
    target: str | None = None,
    normalization: str = "tissue",
    notes: list[str] | None = None,
) -> tuple[str, list[MethodPredictions]]:
    """Resolve prediction folders into methods; return (target, methods), reference first.

    Parameters
    ----------
    preds : folder, {name: folder}, or a sequence of folders / (name or None, folder) pairs
        An unnamed folder holding ``<id>_<target>.nii.gz`` files is one method, named by its
        sidecars' mode ("regression", "diffusion", "expa-<N_Ex>") when they agree, else by the
        folder name; an unnamed folder without such files contributes one method per subfolder
        that holds them (named by the subfolder). A named folder must hold the files.
    manifest : the cohort (subject ids, modalities).
    split : the split evaluated (None: all subjects).
    target : target modality; default: the one the files (and sidecars) name.
    normalization : fallback intensity method of the acquired target when neither the sidecars
        nor the model card record one (a target named ``ct`` uses the CT window).
    notes : messages for the report are appended here.

    Raises
    ------
    InputError when a folder is missing or holds no predictions, or no method has a prediction
    for the split; ConfigError for duplicate names or an ambiguous target.
    """
    notes = [] if notes is None else notes
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"normalization {normalization!r} is not one of {NORMALIZATIONS}")
    subjects = manifest.split(split).subjects
    if not subjects:
        raise InputError(f"the manifest has no subjects in split {split!r}")
    all_ids = manifest.ids
    modalities = list(manifest.modalities)
    if target is not None:
        target = target.lower()
        if target not in modalities:
            raise ConfigError(
                f"target {target!r} is not a modality of the manifest ({', '.join(modalities)})"
            )
    # folders -> candidate methods: (name, folder, {modality: {id: path}}, auto_named, from_sub)
    candidates: list[tuple[str | None, Path, dict[str, dict[str, Path]], bool]] = []
    entries = _pred_entries(preds)
    if not entries:
        raise InputError("no prediction folder given")
    for name, folder in entries:
        label = f"{name}={folder}" if name else str(folder)
        if not folder.is_dir():
            raise InputError(f"prediction folder {label} does not exist or is not a folder")
        found = _scan(folder, all_ids, modalities)
        if found:
            candidates.append((name, folder, found, False))
            continue
        if name is not None:
            raise InputError(
                f"prediction folder {label} holds no files named <id>_<target>.nii.gz "
                "for subjects of the manifest"
            )
        subs = sorted(p for p in folder.iterdir() if p.is_dir())
        sub_found = [(p, _scan(p, all_ids, modalities)) for p in subs]
        sub_found = [(p, f) for p, f in sub_found if f]
        if not sub_found:
            raise InputError(
                f"prediction folder {label} holds no files named <id>_<target>.nii.gz for "
                "subjects of the manifest, and no subfolder (one per method) that does"
            )
        for p, f in sub_found:
            candidates.append((p.name, p, f, True))
    target = _choose_target(target, candidates, notes)
    # a target named "ct" is on the CT window unless told otherwise, as in training
    fallback = method_of(normalization, target)
    split_ids = [s.id for s in subjects]
    methods: list[tuple[MethodPredictions, bool]] = []
    for name, folder, found, from_sub in candidates:
        files_all = found.get(target, {})
        files = {sid: files_all[sid] for sid in split_ids if sid in files_all}
        sidecars = {sid: _read_sidecar(p, notes) for sid, p in files.items()}
        labels = {_mode_label(s) for s in sidecars.values()}
        modes = {s.get("mode") for s in sidecars.values() if isinstance(s.get("mode"), str)}
        mode = modes.pop() if len(modes) == 1 else None
        if name is None:
            name = labels.pop() if len(labels) == 1 and None not in labels else folder.name
        if not files:
            notes.append(
                f"method {name} ({folder}): no {target} prediction for any subject of split "
                f"{split!r}; left out"
            )
            continue
        recorded = {_recorded_normalization(s) for s in sidecars.values()} - {None}
        norm = fallback
        if len(recorded) == 1:
            norm = recorded.pop()
            if norm != fallback:
                notes.append(
                    f"method {name}: the acquired target is normalized with {norm!r}, as its "
                    f"sidecars/model card record (not {fallback!r})"
                )
        elif len(recorded) > 1:
            notes.append(
                f"method {name}: its sidecars record several normalizations "
                f"({', '.join(sorted(recorded))}); using {fallback!r}"
            )
        method = MethodPredictions(
            name=name,
            folder=folder,
            files=files,
            sidecars=sidecars,
            missing=[sid for sid in split_ids if sid not in files],
            mode=mode,
            normalization=norm,
        )
        methods.append((method, from_sub))
    if not methods:
        raise InputError(
            f"no {target} predictions for the {len(split_ids)} subjects of split {split!r} in "
            + ", ".join(str(f) for _, f, _, _ in candidates)
        )
    reserved = sorted({m.name for m, _ in methods} & set(REFERENCES))
    if reserved:
        raise ConfigError(
            f"method name(s) {', '.join(reserved)} are reserved for the reference rows "
            f"({', '.join(REFERENCES)}); name the folder otherwise with --pred NAME=DIR"
        )
    names = Counter(m.name for m, _ in methods)
    dups = sorted(n for n, c in names.items() if c > 1)
    if dups:
        raise ConfigError(
            f"several prediction folders are named {', '.join(dups)}; name them with "
            "--pred NAME=DIR (or a {name: folder} mapping)"
        )
    ordered = _order([m for m, _ in methods], [s for _, s in methods])
    for m in ordered:
        m.description, warning = _describe(m)
        if warning:
            notes.append(warning)
    return target, ordered


def _choose_target(
    target: str | None,
    candidates: Sequence[tuple[str | None, Path, dict[str, dict[str, Path]], bool]],
    notes: list[str],
) -> str:
    if target is not None:
        if not any(target in found for _, _, found, _ in candidates):
            raise InputError(
                f"no prediction files named <id>_{target}.nii.gz in "
                + ", ".join(str(f) for _, f, _, _ in candidates)
            )
        return target
    found_mods = sorted({m for _, _, found, _ in candidates for m in found})
    if len(found_mods) == 1:
        return found_mods[0]
    stated = set()
    for _, _, found, _ in candidates:
        for files in found.values():
            for path in list(files.values())[:3]:
                side = _read_sidecar(path, notes)
                if isinstance(side.get("target"), str):
                    stated.add(side["target"].lower())
    stated &= set(found_mods)
    if len(stated) == 1:
        return stated.pop()
    raise ConfigError(
        f"predictions for several targets were found ({', '.join(found_mods)}); "
        "choose one with --target"
    )


def _order(methods: list[MethodPredictions], from_sub: list[bool]) -> list[MethodPredictions]:
    """Reference (regression) first; methods found as subfolders in the paper's order."""

    def sub_key(m: MethodPredictions) -> tuple[int, int, str]:
        n_ex = next((s.get("n_ex") for s in m.sidecars.values() if s.get("n_ex")), 0)
        n_ex = n_ex if isinstance(n_ex, int) else 0
        return (_MODE_RANK.get(m.mode or "", 3), -n_ex, m.name)

    listed = [m for m, s in zip(methods, from_sub, strict=True) if not s]
    found = sorted((m for m, s in zip(methods, from_sub, strict=True) if s), key=sub_key)
    ordered = listed + found
    ref = next((m for m in ordered if m.name == "regression"), None)
    if ref is None:
        ref = next((m for m in ordered if m.mode == "regression"), ordered[0])
    return [ref] + [m for m in ordered if m is not ref]


# --------------------------------------------------------------------------- per subject


def prediction_to_255(pred: np.ndarray, normalization: str) -> np.ndarray:
    """A prediction on the 0-255 scale: CT predictions (HU) through the CT window, else as is."""
    if normalization == "ct":
        return apply_intensity(pred, fit_intensity(pred, method="ct"))
    return np.asarray(pred, dtype=np.float32)


def axial_center(mask: np.ndarray) -> int:
    """Index of the axial slice (z) through the centre of mass of a mask (middle if empty)."""
    m = np.asarray(mask)
    if not m.any():
        return m.shape[2] // 2
    return int(round(float(ndimage.center_of_mass(m.astype(np.float32))[2])))


def _axial(vol: np.ndarray, z: int) -> np.ndarray:
    """Axial slice in display orientation (rows anterior -> posterior, patient's right left)."""
    return np.ascontiguousarray(np.asarray(vol)[::-1, ::-1, z].T, dtype=np.float32)


@dataclass
class _Reference:
    """The references of one subject: acquired target, clean target, masks and labels."""

    subject: Subject
    geometry: Geometry
    raw: np.ndarray
    mask: np.ndarray
    wm: np.ndarray | None
    lesion: np.ndarray | None
    clean_raw: np.ndarray | None
    downstream: bool
    scaled: dict[str, tuple[np.ndarray, np.ndarray | None]] = field(default_factory=dict)

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        return self.geometry.voxel_size

    def on_scale(self, normalization: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Acquired and clean target on the 0-255 scale of ``normalization`` (cached)."""
        if normalization not in self.scaled:
            fit = fit_intensity(
                self.raw, self.mask, method=normalization, name=f"{self.subject.id} target"
            )
            acq = apply_intensity(self.raw, fit)
            clean = None if self.clean_raw is None else apply_intensity(self.clean_raw, fit)
            self.scaled[normalization] = (acq, clean)
        return self.scaled[normalization]


def _load_label(
    subject: Subject, geometry: Geometry, names: Sequence[str]
) -> dict[str, np.ndarray]:
    out = {}
    for name in names:
        if name in subject.labels:
            arr, geom = load_image(subject.labels[name], name=f"{subject.id} label {name}")
            check_same_grid({"target": geometry, f"label {name}": geom})
            out[name] = arr
    return out


def _load_reference(subject: Subject, target: str) -> _Reference:
    raw, geom = load_image(subject.images[target], name=f"{subject.id} {target}")
    if subject.mask is not None:
        marr, mgeom = load_image(subject.mask, name=f"{subject.id} mask")
        check_same_grid({"target": geom, "mask": mgeom})
        mask = marr > 0.5
        if not mask.any():
            raise InputError(f"subject {subject.id}: the mask {subject.mask} is empty")
    else:
        mask = foreground_mask(raw, name=f"{subject.id} {target}")
    labels = _load_label(subject, geom, ("wm", "wmh", "tissue"))
    wm = lesion = None
    if "wm" in labels:
        wm = labels["wm"] > 0.5
    elif "tissue" in labels:
        wm = np.rint(labels["tissue"]) == WM_TISSUE_LABEL
    if "wmh" in labels:
        lesion = labels["wmh"] > 0.5
    elif "tissue" in labels:
        lesion = np.rint(labels["tissue"]) == WMH_TISSUE_LABEL
    if wm is not None:
        wm &= mask
        if not wm.any():
            wm = None
    if lesion is not None:
        lesion &= mask
    clean = None
    if target in subject.clean:
        clean, cgeom = load_image(subject.clean[target], name=f"{subject.id} clean {target}")
        check_same_grid({"target": geom, "clean target": cgeom})
    return _Reference(
        subject=subject,
        geometry=geom,
        raw=raw,
        mask=mask,
        wm=wm,
        lesion=lesion,
        clean_raw=clean,
        downstream=target in FLAIR_LIKE and wm is not None,
    )


def _scores(
    ref: _Reference,
    img: np.ndarray,
    normalization: str,
    *,
    vs_acquired: bool = True,
    vs_clean: bool = True,
    lesion_metrics: bool = True,
) -> dict[str, float]:
    """All metrics of one image (0-255 scale) of one subject; nan where undefined."""
    acq, clean = ref.on_scale(normalization)
    out = dict.fromkeys(METRIC_KEYS, math.nan)
    if vs_acquired:
        out["ssim_acq"] = M.ssim3d(img, acq, ref.mask)
        out["psnr_acq"] = M.psnr(img, acq, ref.mask)
    if vs_clean and clean is not None:
        out["ssim_clean"] = M.ssim3d(img, clean, ref.mask)
        out["psnr_clean"] = M.psnr(img, clean, ref.mask)
    if ref.wm is not None:
        out["sigma_wm"] = M.noise_level(img, ref.wm)
    if not lesion_metrics:
        return out
    if ref.wm is not None and ref.lesion is not None and ref.lesion.any():
        out["cnr"] = M.lesion_cnr(img, ref.lesion, ref.wm, ref.voxel_size)
    if ref.downstream:
        region = ref.wm if ref.lesion is None else ref.wm | ref.lesion
        seg = M.segment_wmh(img, ref.wm, region=region)
        out["lesion_ml"] = float(seg.sum()) * float(np.prod(ref.voxel_size)) / 1000.0
        if ref.lesion is not None:
            out["dice"] = M.dice(seg, ref.lesion)
            out["hd95"] = M.hd95(seg, ref.lesion, ref.voxel_size)
            out["alvr"] = M.alvr(seg, ref.lesion)
    return out


class FeatureStats:
    """Feature vectors of one image set for the FID: kept as rows while few, else as sums.

    Up to ``max_rows`` rows are kept, so that the FID of small sets is computed in sample space
    (:func:`yoda.evaluate.fid.fid_from_features`); beyond that the rows are folded into a
    running sum and sum of outer products (bounded memory for large cohorts).
    """

    def __init__(self, max_rows: int = 4096) -> None:
        self.max_rows = int(max_rows)
        self.n = 0
        self.rows: list[np.ndarray] | None = []
        self.total: np.ndarray | None = None
        self.outer: np.ndarray | None = None

    def add(self, feats: np.ndarray) -> None:
        """Add rows (N, D) of features."""
        f = np.asarray(feats, dtype=np.float64)
        if f.ndim != 2 or f.shape[0] == 0:
            return
        self.n += f.shape[0]
        if self.rows is not None:
            self.rows.append(f)
            if self.n <= self.max_rows:
                return
            f = np.concatenate(self.rows)
            self.rows = None
        if self.total is None or self.outer is None:
            self.total = np.zeros(f.shape[1])
            self.outer = np.zeros((f.shape[1], f.shape[1]))
        self.total += f.sum(axis=0)
        self.outer += f.T @ f

    def features(self) -> np.ndarray | None:
        """All rows (N, D) while they are kept, else None."""
        return None if self.rows is None or not self.rows else np.concatenate(self.rows)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and sample covariance (ddof=1); needs at least 2 rows."""
        if self.n < 2:
            raise InputError(f"FID needs at least 2 non-empty axial slices per set, got {self.n}")
        feats = self.features()
        if feats is not None:
            return feats.mean(axis=0), np.cov(feats, rowvar=False)
        if self.total is None or self.outer is None:
            raise InputError("FID: no features were collected")
        mu = self.total / self.n
        cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, 0.5 * (cov + cov.T)

    def fid(self, other: FeatureStats) -> float:
        """Frechet distance between this set and ``other``."""
        from yoda.evaluate.fid import fid_from_features, frechet_distance

        a, b = self.features(), other.features()
        if a is not None and b is not None and a.shape[0] >= 2 and b.shape[0] >= 2:
            return fid_from_features(a, b)
        mu1, cov1 = self.mean_cov()
        mu2, cov2 = other.mean_cov()
        return frechet_distance(mu1, cov1, mu2, cov2)


# --------------------------------------------------------------------------- the evaluation


@dataclass
class Evaluation:
    """Everything an evaluation computed (see :func:`evaluate`).

    Attributes
    ----------
    target : target modality.
    split : evaluated split.
    manifest : manifest path (or its root for an in-memory manifest).
    subjects : ids of the subjects with at least one prediction, in manifest order.
    methods : the methods, reference first.
    reference : the method other methods are compared with (regression when present).
    rows : one dict per subject x method: subject, method, mode, time_s, nfe and the
        :data:`METRICS` (nan where undefined).
    reference_rows : the same for the acquired target ("acquired") and the clean target
        ("clean", phantom only); metrics of an image against itself are nan.
    noise_rows : the reference method's output plus Rician noise: subject, sigma, ssim/psnr
        vs acquired and clean, sigma_wm (sigma 0 is the output itself).
    summary : one dict per method, then per reference: mean, std, n and p-values per metric.
    stats : p-values of each method vs the reference and vs acquired per metric
        (``p_vs_reference``, ``p_vs_acquired``), ICC(3,1) with 95 % CI (``icc``) and
        Bland-Altman statistics (``bland_altman``) of WMH volumes, translated vs acquired.
    qc : method -> {"ssim": [...], "dice": [...]} worst subjects ({"subject", "value"}).
    lesion_volumes : "labels", "acquired", "clean" and each method -> {subject: ml}.
    thumbnails : subject -> axial slices through the mask centre ("sources", "target",
        "clean", "methods", "mask", "z"), for the QC subjects and the example subject.
    example_subject : subject shown in the example figure (median SSIM of the reference).
    fid : set name -> FID vs the acquired targets (methods, "clean", "<ref>+noise <s>").
    missing : method -> subject ids without a prediction.
    failed : "<subject> <method>" -> reason, for predictions that could not be scored
        ("<subject>" when the subject's target could not be used).
    notes : messages for the reader (FID skipped, diffusion previews, ...).
    settings : normalization per method, noise sigmas, QC fraction, seed, voxel sizes.
    split_subjects : ids of every subject of the split, in manifest order.
    """

    target: str
    split: str | None
    manifest: str
    subjects: list[str]
    methods: list[MethodPredictions]
    reference: str
    rows: list[dict[str, Any]]
    reference_rows: list[dict[str, Any]]
    noise_rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    stats: dict[str, Any]
    qc: dict[str, dict[str, list[dict[str, Any]]]]
    lesion_volumes: dict[str, dict[str, float]]
    thumbnails: dict[str, dict[str, Any]]
    example_subject: str | None
    fid: dict[str, float]
    missing: dict[str, list[str]]
    failed: dict[str, str]
    notes: list[str]
    settings: dict[str, Any]
    split_subjects: list[str] = field(default_factory=list)

    @property
    def method_names(self) -> list[str]:
        """Method names, reference first."""
        return [m.name for m in self.methods]

    @property
    def where(self) -> str:
        """What was evaluated, for people: "split test", or "all subjects"."""
        return f"split {self.split}" if self.split is not None else "all subjects"

    @property
    def n_split(self) -> int:
        """Number of subjects of the split (scored or not)."""
        return len(self.split_subjects or self.subjects)

    def scored_subjects(self) -> list[str]:
        """Subjects with the scores of at least one method, in manifest order."""
        have = {r["subject"] for r in self.rows}
        return [s for s in self.split_subjects or self.subjects if s in have]

    def left_out(self) -> dict[str, str]:
        """What of the split was not scored, and why: "<subject>" -> reason when no method
        was scored for one reason, else "<subject> <method>" -> reason per method."""
        done = {(r["subject"], r["method"]) for r in self.rows}
        out: dict[str, str] = {}
        for sid in self.split_subjects or self.subjects:
            reasons = {}
            for m in self.methods:
                if (sid, m.name) in done:
                    continue
                reasons[m.name] = (
                    self.failed.get(f"{sid} {m.name}")
                    or self.failed.get(sid)
                    or ("no prediction" if sid in m.missing else "not scored")
                )
            if len(reasons) == len(self.methods) and len(set(reasons.values())) == 1:
                out[sid] = next(iter(reasons.values()))
            else:
                out.update({f"{sid} {name}": why for name, why in reasons.items()})
        return out

    def values(self, method: str, key: str) -> dict[str, float]:
        """subject -> value of metric ``key`` for a method or reference row."""
        rows = self.reference_rows if method in REFERENCES else self.rows
        return {r["subject"]: float(r[key]) for r in rows if r["method"] == method}

    def has(self, key: str) -> bool:
        """Whether metric ``key`` is defined for any row."""
        return any(
            isinstance(r.get(key), float) and not math.isnan(r[key])
            for r in (*self.rows, *self.reference_rows)
        )


def _load_manifest(manifest: Any) -> tuple[Manifest, str]:
    if isinstance(manifest, Manifest):
        return manifest, str(manifest.root)
    if isinstance(manifest, (str, os.PathLike)):
        return read_manifest(manifest), str(manifest)
    raise ConfigError(f"manifest: expected a path or a Manifest, got {type(manifest).__name__}")


def _num(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def evaluate(
    preds: Mapping[str, str | os.PathLike] | str | os.PathLike | Sequence[Any],
    manifest: Manifest | str | os.PathLike,
    *,
    split: str | None = "test",
    normalization: str = "tissue",
    fid_weights: str | os.PathLike | None = None,
    progress: bool = True,
    target: str | None = None,
    noise_sigmas: Sequence[float] = NOISE_SIGMAS,
    seed: int = 0,
    device: str = "cpu",
    fid_size: int = 224,
    fid_model: Any = None,
) -> Evaluation:
    """Score the predictions of one or more methods against the manifest's targets.

    Parameters
    ----------
    preds : a folder (of ``<id>_<target>.nii.gz`` files, or of one subfolder per method),
        ``{name: folder}``, or a sequence of folders / (name, folder) pairs
        (see :func:`find_methods`).
    manifest : manifest path or :class:`~yoda.data.manifest.Manifest`.
    split : split to evaluate (None: all subjects).
    normalization : intensity method for the acquired target when the sidecars and model
        card do not record the model's ("percentile", "tissue" or "ct").
    fid_weights : ResNet-50 state dict for the FID; None skips the FID (with a note).
    progress : show a progress bar over subjects.
    target : target modality (default: inferred from the file names).
    noise_sigmas : Rician noise levels (0-255 scale) added to the reference method's output for
        the perception-distortion curve.
    seed : seed of that noise (the same seed gives the same curve).
    device : where the FID network runs.
    fid_size : input size of the FID network (224 for RadImageNet).
    fid_model : a ready feature extractor with ``slice_features(slices (N, H, W) on the 0-255
        scale) -> (N, D)`` (e.g. a :class:`~yoda.evaluate.fid.ResNet50Features`); used instead
        of loading ``fid_weights``.

    Returns
    -------
    Evaluation

    Raises
    ------
    InputError when there are no predictions at all (missing ones for some subjects are
    listed in ``missing`` and the rest is evaluated); ConfigError for bad options.
    """
    from tqdm import tqdm

    man, man_label = _load_manifest(manifest)
    notes: list[str] = []
    sigmas = [float(s) for s in noise_sigmas]
    if any(not math.isfinite(s) or s <= 0 for s in sigmas):
        raise ConfigError(f"noise sigmas must be positive numbers, got {list(noise_sigmas)}")
    target, methods = find_methods(
        preds, man, split=split, target=target, normalization=normalization, notes=notes
    )
    subjects = man.split(split).subjects
    ref_method = methods[0]
    primary = ref_method.normalization
    missing = {m.name: list(m.missing) for m in methods if m.missing}
    for name, ids in missing.items():
        notes.append(f"method {name}: no prediction for {len(ids)} subject(s): {', '.join(ids)}")
    fid_sets: dict[str, FeatureStats] = {}
    if fid_model is not None:
        name = getattr(fid_model, "weights_path", None) or type(fid_model).__name__
        notes.append(f"FID on masked axial slices with features of {name}")
    elif fid_weights is None:
        from yoda.evaluate.fid import fid_available

        notes.append(fid_available(None)[1])
    else:
        from yoda.evaluate.fid import ResNet50Features

        fid_model = ResNet50Features(fid_weights, size=fid_size, device=device)
        unused = len(fid_model.load_report["unexpected"])
        notes.append(
            f"FID on masked axial slices with ResNet-50 features from {fid_weights} "
            f"(input {fid_size} px{f'; {unused} tensors in the file unused' if unused else ''})"
        )

    rows: list[dict[str, Any]] = []
    ref_rows: list[dict[str, Any]] = []
    noise_rows: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    evaluated: list[str] = []
    warn_counts: Counter[str] = Counter()
    centres: dict[str, int] = {}
    voxel_sizes: set[tuple[float, ...]] = set()
    has_clean = has_wm = has_lesion = downstream = False
    bar = tqdm(subjects, desc="evaluate", unit="subject", disable=not progress)
    for index, subject in enumerate(bar):
        bar.set_postfix_str(subject.id)
        present = [m for m in methods if subject.id in m.files]
        if not present:
            continue
        if target not in subject.images:
            failed[subject.id] = f"the manifest has no {target} image for this subject"
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", M.MetricWarning)
            try:
                ref = _load_reference(subject, target)
            except InputError as exc:
                failed[subject.id] = str(exc)
                continue
            evaluated.append(subject.id)
            centres[subject.id] = axial_center(ref.mask)
            voxel_sizes.add(tuple(round(v, 4) for v in ref.voxel_size))
            has_clean |= ref.clean_raw is not None
            has_wm |= ref.wm is not None
            has_lesion |= ref.lesion is not None
            downstream |= ref.downstream
            base_img = base_scores = None
            for m in present:
                side = m.sidecars.get(subject.id, {})
                try:
                    pred, geom = load_image(m.files[subject.id], name=f"{m.name} {subject.id}")
                    check_same_grid({"target": ref.geometry, "prediction": geom})
                    img = prediction_to_255(pred, m.normalization)
                    scores = _scores(ref, img, m.normalization)
                except InputError as exc:
                    failed[f"{subject.id} {m.name}"] = str(exc)
                    continue
                rows.append(
                    {
                        "subject": subject.id,
                        "method": m.name,
                        "mode": m.mode or _mode_label(side) or "",
                        "time_s": _num(side.get("seconds")),
                        "nfe": _num(side.get("nfe")),
                        **scores,
                    }
                )
                if m is ref_method:
                    base_img, base_scores = img, scores
                if fid_model is not None:
                    _add_features(fid_sets, m.name, img, ref.mask, fid_model)
            try:
                _score_references(
                    ref,
                    subject.id,
                    normalization=primary,
                    ref_rows=ref_rows,
                    noise_rows=noise_rows,
                    base_img=base_img,
                    base_scores=base_scores,
                    sigmas=sigmas,
                    rng=np.random.default_rng([int(seed), index]),
                    fid_sets=fid_sets,
                    fid_model=fid_model,
                    ref_name=ref_method.name,
                )
            except InputError as exc:
                failed[f"{subject.id} acquired"] = str(exc)
        for w in caught:
            if issubclass(w.category, M.MetricWarning):
                warn_counts[str(w.message)] += 1
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    bar.close()
    if not rows:
        details = "; ".join(f"{k}: {v}" for k, v in list(failed.items())[:3])
        raise InputError(f"no prediction could be evaluated ({details})")
    for msg, n in sorted(warn_counts.items()):
        notes.append(f"metric undefined in {n} case(s): {msg}")
    for key, reason in failed.items():
        notes.append(f"not evaluated: {key}: {reason}")
    if not has_clean:
        notes.append(f"no noise-free target (clean_{target}) in the manifest: no scores vs clean")
    if not has_wm:
        notes.append("no white-matter mask (label wm or tissue): no noise level, CNR or WMH task")
    if target not in FLAIR_LIKE:
        notes.append(f"target {target} is not FLAIR-like: no WMH segmentation task")
    elif has_wm and not has_lesion:
        notes.append("no lesion labels (label wmh or tissue): WMH volumes only, no Dice/HD95/ALVR")

    fid = _fid_values(fid_sets) if fid_model is not None else {}
    names = [m.name for m in methods]
    stats = _statistics(rows, ref_rows, names, ref_method.name)
    lesion_volumes = _lesion_volumes(rows, ref_rows, names, evaluated, man, target)
    summary = _summary(rows, ref_rows, methods, stats, fid)
    qc = _quality_control(rows, names, downstream and has_lesion)
    example = _example_subject(rows, ref_method.name)
    wanted = {e["subject"] for q in qc.values() for lst in q.values() for e in lst}
    if example is not None:
        wanted.add(example)
    ordered = [s for s in subjects if s.id in wanted and s.id in centres]
    thumbs = {s.id: _thumbnail(s, target, methods, primary, centres[s.id]) for s in ordered}
    settings = {
        "normalization": {m.name: m.normalization for m in methods},
        "noise_sigmas": sigmas,
        "qc_fraction": QC_FRACTION,
        "seed": int(seed),
        "voxel_sizes": sorted(voxel_sizes),
        "has_clean": has_clean,
        "has_wm": has_wm,
        "has_lesions": has_lesion,
        "downstream": downstream,
        "fid_weights": None if fid_weights is None else str(fid_weights),
        "fid": bool(fid),
    }
    return Evaluation(
        target=target,
        split=split,
        manifest=man_label,
        subjects=evaluated,
        methods=methods,
        reference=ref_method.name,
        rows=rows,
        reference_rows=ref_rows,
        noise_rows=noise_rows,
        summary=summary,
        stats=stats,
        qc=qc,
        lesion_volumes=lesion_volumes,
        thumbnails=thumbs,
        example_subject=example,
        fid=fid,
        missing=missing,
        failed=failed,
        notes=notes,
        settings=settings,
        split_subjects=[s.id for s in subjects],
    )


def _score_references(
    ref: _Reference,
    sid: str,
    *,
    normalization: str,
    ref_rows: list[dict[str, Any]],
    noise_rows: list[dict[str, Any]],
    base_img: np.ndarray | None,
    base_scores: Mapping[str, float] | None,
    sigmas: Sequence[float],
    rng: np.random.Generator,
    fid_sets: dict[str, FeatureStats],
    fid_model: Any,
    ref_name: str,
) -> None:
    """Reference rows (acquired, clean) and the noise curve of one subject."""
    acq, clean = ref.on_scale(normalization)
    ref_rows.append(
        {
            "subject": sid,
            "method": "acquired",
            "mode": "",
            "time_s": math.nan,
            "nfe": math.nan,
            **_scores(ref, acq, normalization, vs_acquired=False),
        }
    )
    if clean is not None:
        ref_rows.append(
            {
                "subject": sid,
                "method": "clean",
                "mode": "",
                "time_s": math.nan,
                "nfe": math.nan,
                **_scores(ref, clean, normalization, vs_clean=False),
            }
        )
    if fid_model is not None:
        _add_features(fid_sets, "acquired", acq, ref.mask, fid_model)
        if clean is not None:
            _add_features(fid_sets, "clean", clean, ref.mask, fid_model)
    if base_img is not None and base_scores is not None:
        noise_rows.append(_noise_row(sid, 0.0, base_scores))
        for s in sigmas:
            noisy = M.rician_noise(base_img, s, rng)
            sc = _scores(ref, noisy, normalization, lesion_metrics=False)
            noise_rows.append(_noise_row(sid, s, sc))
            if fid_model is not None:
                _add_features(fid_sets, f"{ref_name}+noise {s:g}", noisy, ref.mask, fid_model)


def _noise_row(subject: str, sigma: float, scores: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("ssim_acq", "psnr_acq", "ssim_clean", "psnr_clean", "sigma_wm")
    return {"subject": subject, "sigma": float(sigma), **{k: float(scores[k]) for k in keys}}


def _add_features(
    sets: dict[str, FeatureStats], name: str, img: np.ndarray, mask: np.ndarray, model: Any
) -> None:
    from yoda.evaluate.fid import axial_slices

    slices = axial_slices(np.where(mask, img, 0.0))
    if slices.shape[0]:
        sets.setdefault(name, FeatureStats()).add(model.slice_features(slices))


def _fid_values(sets: Mapping[str, FeatureStats]) -> dict[str, float]:
    if "acquired" not in sets:
        return {}
    ref = sets["acquired"]
    return {name: st.fid(ref) for name, st in sets.items() if name != "acquired" and st.n >= 2}


# --------------------------------------------------------------------------- tables and stats


def _by_subject(rows: Iterable[Mapping[str, Any]], method: str, key: str) -> dict[str, float]:
    return {r["subject"]: float(r[key]) for r in rows if r["method"] == method}


def _paired_p(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[float, int]:
    common = [s for s in a if s in b and not (math.isnan(a[s]) or math.isnan(b[s]))]
    if not common:
        return math.nan, 0
    x = [a[s] for s in common]
    y = [b[s] for s in common]
    return S.wilcoxon_paired(x, y), len(common)


def _statistics(
    rows: list[dict[str, Any]],
    ref_rows: list[dict[str, Any]],
    names: list[str],
    reference: str,
) -> dict[str, Any]:
    p_ref: dict[str, dict[str, float]] = {}
    p_acq: dict[str, dict[str, float]] = {}
    n_ref: dict[str, dict[str, int]] = {}
    for name in [*names, "acquired"]:
        src = ref_rows if name == "acquired" else rows
        if name != reference:
            p_ref[name], n_ref[name] = {}, {}
            for key in METRIC_KEYS:
                p, n = _paired_p(_by_subject(src, name, key), _by_subject(rows, reference, key))
                if n:
                    p_ref[name][key], n_ref[name][key] = p, n
        if name != "acquired":
            p_acq[name] = {}
            for key in METRIC_KEYS:
                p, n = _paired_p(
                    _by_subject(rows, name, key), _by_subject(ref_rows, "acquired", key)
                )
                if n:
                    p_acq[name][key] = p
    icc: dict[str, dict[str, float]] = {}
    bland: dict[str, dict[str, float]] = {}
    acq_vol = _by_subject(ref_rows, "acquired", "lesion_ml")
    for name in names:
        vol = _by_subject(rows, name, "lesion_ml")
        common = [s for s in vol if s in acq_vol and math.isfinite(vol[s] + acq_vol[s])]
        if len(common) < 2:
            continue
        x = [vol[s] for s in common]
        y = [acq_vol[s] for s in common]
        try:
            value, low, high = S.icc_3_1_ci(x, y)
        except InputError:
            value = low = high = math.nan
        icc[name] = {"icc": value, "low": low, "high": high, "n": len(common)}
        ba = S.bland_altman(x, y)
        bland[name] = {**ba, "n": len(common)}
    return {
        "reference": reference,
        "p_vs_reference": p_ref,
        "n_vs_reference": n_ref,
        "p_vs_acquired": p_acq,
        "icc": icc,
        "bland_altman": bland,
        "test": "two-sided Wilcoxon signed-rank, paired by subject, no multiple-comparison "
        "correction; significant at p < 0.05",
    }


def _lesion_volumes(
    rows: list[dict[str, Any]],
    ref_rows: list[dict[str, Any]],
    names: list[str],
    subjects: list[str],
    manifest: Manifest,
    target: str,
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name in ["acquired", "clean", *names]:
        src = ref_rows if name in REFERENCES else rows
        vols = {s: v for s, v in _by_subject(src, name, "lesion_ml").items() if math.isfinite(v)}
        if vols:
            out[name] = vols
    if out and target in FLAIR_LIKE:
        labels: dict[str, float] = {}
        for sid in subjects:
            subj = manifest.subject(sid)
            try:
                if "wmh" in subj.labels:
                    arr, geom = load_image(subj.labels["wmh"], name=f"{sid} label wmh")
                    les = arr > 0.5
                elif "tissue" in subj.labels:
                    arr, geom = load_image(subj.labels["tissue"], name=f"{sid} label tissue")
                    les = np.rint(arr) == WMH_TISSUE_LABEL
                else:
                    continue
            except InputError:
                continue
            labels[sid] = float(les.sum()) * float(np.prod(geom.voxel_size)) / 1000.0
        if labels:
            out["labels"] = labels
    return out


def _summary(
    rows: list[dict[str, Any]],
    ref_rows: list[dict[str, Any]],
    methods: list[MethodPredictions],
    stats: Mapping[str, Any],
    fid: Mapping[str, float],
) -> list[dict[str, Any]]:
    out = []
    names = [m.name for m in methods] + sorted(
        {r["method"] for r in ref_rows}, key=REFERENCES.index
    )
    modes = {m.name: m.mode or "" for m in methods}
    for name in names:
        is_ref = name in REFERENCES
        src = [r for r in (ref_rows if is_ref else rows) if r["method"] == name]
        entry: dict[str, Any] = {
            "method": name,
            "kind": "reference" if is_ref else "method",
            "mode": modes.get(name, ""),
            "n": len(src),
        }
        t_mean, t_std = S.mean_std([r["time_s"] for r in src])
        entry["time_s_mean"], entry["time_s_std"] = t_mean, t_std
        nfe = [r["nfe"] for r in src if math.isfinite(r["nfe"])]
        entry["nfe"] = float(np.mean(nfe)) if nfe else math.nan
        for key in METRIC_KEYS:
            vals = [float(r[key]) for r in src]
            mean, std = S.mean_std(vals)
            entry[f"{key}_mean"] = mean
            entry[f"{key}_std"] = std
            entry[f"{key}_n"] = int(sum(not math.isnan(v) for v in vals))
            entry[f"{key}_p_ref"] = stats["p_vs_reference"].get(name, {}).get(key, math.nan)
            entry[f"{key}_p_acq"] = stats["p_vs_acquired"].get(name, {}).get(key, math.nan)
        entry["fid"] = float(fid.get(name, math.nan))
        out.append(entry)
    return out


def _quality_control(
    rows: list[dict[str, Any]], names: list[str], with_dice: bool
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name in names:
        q: dict[str, list[dict[str, Any]]] = {}
        for key, label in (("ssim_acq", "ssim"), ("dice", "dice")):
            if key == "dice" and not with_dice:
                continue
            scores = _by_subject(rows, name, key)
            worst = M.worst_fraction(scores, QC_FRACTION, higher_is_better=True)
            q[label] = [{"subject": s, "value": scores[s]} for s in worst]
        out[name] = q
    return out


def _example_subject(rows: list[dict[str, Any]], reference: str) -> str | None:
    scores = {s: v for s, v in _by_subject(rows, reference, "ssim_acq").items() if math.isfinite(v)}
    if not scores:
        return rows[0]["subject"] if rows else None
    ranked = sorted(scores, key=lambda s: (scores[s], s))
    return ranked[(len(ranked) - 1) // 2]


def _thumbnail(
    subject: Subject,
    target: str,
    methods: list[MethodPredictions],
    normalization: str,
    z: int,
) -> dict[str, Any]:
    """Axial slices through the mask centre of one subject (all on the 0-255 scale)."""
    ref = _load_reference(subject, target)
    acq, clean = ref.on_scale(normalization)
    sources: list[str] = []
    for m in methods:
        side = m.sidecars.get(subject.id) or {}
        if isinstance(side.get("sources"), list):
            sources = [str(s) for s in side["sources"]]
            break
    if not sources:
        sources = [k for k in subject.images if k != target]
    src_slices = {}
    for name in sources:
        if name not in subject.images:
            continue
        try:
            arr, geom = load_image(subject.images[name], name=f"{subject.id} {name}")
            check_same_grid({"target": ref.geometry, name: geom})
            # the target's CT window is no way to show an MR source; a CT source gets it
            shown = method_of("tissue" if normalization == "ct" else normalization, name)
            fit = fit_intensity(arr, ref.mask, method=shown, name=f"{subject.id} {name}")
        except InputError:
            continue
        src_slices[name] = _axial(apply_intensity(arr, fit), z)
    preds = {}
    for m in methods:
        if subject.id not in m.files:
            continue
        try:
            arr, _ = load_image(m.files[subject.id], name=f"{m.name} {subject.id}")
        except InputError:
            continue
        if arr.shape == ref.raw.shape:
            preds[m.name] = _axial(prediction_to_255(arr, m.normalization), z)
    return {
        "z": z,
        "sources": src_slices,
        "target": _axial(acq, z),
        "clean": None if clean is None else _axial(clean, z),
        "methods": preds,
        "mask": _axial(ref.mask, z) > 0.5,
        "lesion": None if ref.lesion is None else _axial(ref.lesion, z) > 0.5,
    }
