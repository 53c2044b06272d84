"""A physics-based phantom: paired multi-contrast brain MRI with lesions and noise-free truth.

Basis: the MNI ICBM152 2009a grey- and white-matter probability maps and brain mask that
nilearn ships (1 mm, nothing is downloaded); CSF = clip(mask - GM - WM, 0, 1). For coarser
grids the 1 mm fractions are box-averaged (exact partial volume, also for non-integer voxel
sizes), and the result is cached per voxel size for the lifetime of the process.

Per subject (all randomness from one integer seed):

1. tissue parameters (T1, T2, PD) jittered around 3T values;
2. white-matter hyperintensities (WMH): 3-40 randomly oriented ellipsoids with smoothly
   perturbed edges, 60 % seeded within 12 mm of the ventricles and the rest in deep white
   matter; the lesion fraction replaces white matter only;
3. a random smooth deformation (displacements of 3 mm sd on a 40 mm control grid, cubic
   interpolation, plus rotation 3 deg and per-axis scaling 3 % sd) applied to all tissue
   fractions together;
4. T1w (MPRAGE steady state), T2w and PD (spin echo) and FLAIR (inversion recovery, CSF
   nulled) from the signal equations, with partial volume: a voxel's signal is the sum over
   tissues of fraction times the tissue's signal;
5. a smooth multiplicative bias field (shared by the contrasts, plus a small part per contrast);
6. Rician noise (Eq. 1 of the paper), X = |X' + n_re + i n_im|, with a noise level per
   contrast that is correlated between the contrasts of a subject.

Intensity scale: each contrast is multiplied by a fixed factor so that white matter with the
nominal tissue parameters has signal 100 (:data:`WM_REFERENCE`); a subject's clean white-matter
signal is therefore about 100 (varying by a few percent with the tissue jitter and the bias
field). The noise-free image ("clean") is everything but the noise: signal times bias field.
The grid is RAS+ with isotropic voxels of the requested size, placed so that world coordinates
are MNI coordinates (voxel centres of the 1 mm template are kept where the size is 1 mm).

:func:`simulate_subject` is pure (arrays in memory); :func:`make_phantom` writes a cohort of
NIfTI files and a ``manifest.csv``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from yoda.atomic import write_text_atomic
from yoda.config import check_seed
from yoda.errors import ConfigError

__all__ = [
    "CONTRASTS",
    "LABELS",
    "NOISE_RANGE",
    "SEQUENCES",
    "TISSUES",
    "TISSUE_PARAMS",
    "WM_REFERENCE",
    "PhantomSubject",
    "contrast_signal",
    "load_basis",
    "make_phantom",
    "simulate_subject",
    "split_counts",
    "subject_seed",
]

CONTRASTS = ("t1w", "t2w", "pd", "flair")
"""Simulated contrasts, in manifest order."""
#: The images of a subject's folder (``<name>.nii.gz``).
SUBJECT_FILES = (*CONTRASTS, *(f"clean_{c}" for c in CONTRASTS), "mask", "tissue", "wmh", "wm")

TISSUES = ("csf", "gm", "wm", "wmh")
"""Tissue classes; ``wmh`` is the white-matter hyperintensity (lesion) tissue."""

LABELS = {"csf": 1, "gm": 2, "wm": 3, "wmh": 4}
"""Values of the tissue label map (0 is background)."""

TISSUE_PARAMS = {
    # tissue: (T1 ms, T2 ms, proton density relative to CSF) at 3T
    "csf": (4300.0, 1800.0, 1.00),
    "gm": (1450.0, 90.0, 0.80),
    "wm": (1000.0, 75.0, 0.69),
    "wmh": (1350.0, 140.0, 0.80),
}
"""Nominal tissue parameters."""

# Per-subject jitter (relative sd) of T1, T2, PD per tissue. CSF is the proton-density
# reference (PD 1 by definition) and its T1 varies less so that FLAIR keeps CSF nulled.
_JITTER_SD = {
    "csf": (0.03, 0.06, 0.0),
    "gm": (0.06, 0.06, 0.03),
    "wm": (0.06, 0.06, 0.03),
    "wmh": (0.06, 0.06, 0.03),
}

SEQUENCES: dict[str, dict[str, float | str]] = {
    "t1w": {
        "kind": "mprage",
        "tr": 2300.0,
        "ti": 900.0,
        "flip": 9.0,
        "esp": 7.1,
        "readouts": 176,
        "te": 3.0,
    },
    "t2w": {"kind": "spin_echo", "tr": 5700.0, "te": 100.0},
    "pd": {"kind": "spin_echo", "tr": 5700.0, "te": 10.0},
    "flair": {"kind": "flair", "tr": 10000.0, "te": 120.0, "ti": 2580.0},
}
"""Sequence parameters (ms, degrees) per contrast."""

WM_REFERENCE = 100.0
"""Clean signal of nominal white matter in every contrast (arbitrary units)."""

NOISE_RANGE = {"t1w": (0.03, 0.07), "t2w": (0.03, 0.07), "pd": (0.03, 0.06), "flair": (0.04, 0.08)}
"""Rician noise sigma as a fraction of the subject's clean white-matter signal (min, max)."""

MAX_VOXEL_SIZE = 8.0
MIN_VOXEL_SIZE = 0.5

# Subject variation (mm, degrees, relative).
_DEFORM_SPACING = 40.0
_DEFORM_SD = 3.0
_ROTATION_SD = 3.0
_SCALING_SD = 0.03
_BIAS_SPACING = 60.0
_BIAS_SD = 0.10
_BIAS_CONTRAST_SD = 0.03
_LESION_COUNT = (3, 40)
_LESION_RADIUS = (1.5, 9.0)
_LESION_PERIVENTRICULAR = 0.6
_PERIVENTRICULAR_MM = 12.0
_LESION_EDGE_AMPLITUDE = 0.3
_QUALITY_SPREAD = 0.1


# ---------------------------------------------------------------------------------------------
# signal equations (pure)


def _mprage(t1, t2, pd, *, tr, ti, flip, esp, readouts, te):
    """Magnitude of the centre-of-k-space MPRAGE signal at steady state (linear ordering).

    One cycle: perfect inversion, free recovery until the first readout pulse, ``readouts``
    pulses of angle ``flip`` spaced ``esp`` (the central one at ``ti``), free recovery until
    ``tr``. Each step maps Mz affinely (Mz -> a Mz + b PD); the steady state is b / (1 - a).
    """
    n = int(readouts)
    alpha = np.deg2rad(flip)
    cos_a = np.cos(alpha)
    t_first = ti - (n // 2) * esp
    t_last = t_first + (n - 1) * esp
    if t_first < 0 or t_last > tr:
        raise ConfigError("MPRAGE timing: the readout train does not fit between TI and TR")
    e1 = np.exp(-esp / t1)
    a_ro, b_ro = cos_a * e1, 1.0 - e1  # one pulse followed by one echo spacing

    def train(k):  # k (pulse, esp) steps composed
        ak = a_ro**k
        return ak, b_ro * (1.0 - ak) / (1.0 - a_ro)

    e_first = np.exp(-t_first / t1)
    e_end = np.exp(-(tr - t_last) / t1)
    # inversion, recovery t_first, (n - 1) x (pulse, esp), last pulse, recovery to TR
    a, b = -e_first, 1.0 - e_first
    ak, bk = train(n - 1)
    a, b = ak * a, ak * b + bk
    a, b = cos_a * a, cos_a * b
    a, b = e_end * a, e_end * b + (1.0 - e_end)
    mss = b / (1.0 - a)
    # from the start of a cycle to just before the central pulse
    m = -e_first * mss + (1.0 - e_first)
    ak, bk = train(n // 2)
    m = ak * m + bk
    return np.abs(pd * m * np.sin(alpha) * np.exp(-te / t2))


def _spin_echo(t1, t2, pd, *, tr, te):
    return pd * (1.0 - np.exp(-tr / t1)) * np.exp(-te / t2)


def _flair(t1, t2, pd, *, tr, te, ti):
    return pd * np.abs(1.0 - 2.0 * np.exp(-ti / t1) + np.exp(-tr / t1)) * np.exp(-te / t2)


def contrast_signal(contrast: str, t1, t2, pd) -> np.ndarray:
    """Signal of pure tissue(s) with relaxation times ``t1``, ``t2`` (ms) and proton density.

    Parameters
    ----------
    contrast : one of :data:`CONTRASTS`.
    t1, t2, pd : scalars or arrays (broadcast together).

    Returns
    -------
    The magnitude signal (unscaled; proton density 1 and full recovery gives at most 1).
    """
    if contrast not in SEQUENCES:
        raise ConfigError(f"unknown contrast {contrast!r}; choose from {', '.join(CONTRASTS)}")
    seq = dict(SEQUENCES[contrast])
    kind = seq.pop("kind")
    t1, t2, pd = (np.asarray(v, dtype=np.float64) for v in (t1, t2, pd))
    fn = {"mprage": _mprage, "spin_echo": _spin_echo, "flair": _flair}[kind]
    return fn(t1, t2, pd, **seq)


def _intensity_scale(contrast: str) -> float:
    t1, t2, pd = TISSUE_PARAMS["wm"]
    return float(WM_REFERENCE / contrast_signal(contrast, t1, t2, pd))


# ---------------------------------------------------------------------------------------------
# basis


@dataclass(frozen=True)
class Basis:
    """Tissue fractions of the MNI template on one grid (arrays are read-only).

    Attributes
    ----------
    fractions : (3, X, Y, Z) float32, CSF, GM, WM fractions.
    affine : (4, 4) RAS+ voxel-to-world (MNI mm) affine.
    voxel_size : isotropic voxel size in mm.
    centre : (3,) centroid of the brain in world mm.
    periventricular : (N, 3) voxel indices of lesion seeds near the ventricles.
    deep_wm : (M, 3) voxel indices of lesion seeds in deep white matter.
    """

    fractions: np.ndarray
    affine: np.ndarray
    voxel_size: float
    centre: np.ndarray
    periventricular: np.ndarray
    deep_wm: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape (X, Y, Z)."""
        s = self.fractions.shape[1:]
        return (int(s[0]), int(s[1]), int(s[2]))


@lru_cache(maxsize=1)
def _template_1mm() -> tuple[np.ndarray, np.ndarray]:
    """(4, X, Y, Z) float32 [CSF, GM, WM, periventricular zone] at 1 mm, and its affine."""
    from nilearn import datasets
    from scipy import ndimage

    def load(fn):
        img = fn(resolution=1)
        return img.get_fdata(dtype=np.float32), np.asarray(img.affine, dtype=np.float64)

    gm, affine = load(datasets.load_mni152_gm_template)
    lin = affine[:3, :3]
    if np.any(lin != np.diag(np.diag(lin))) or np.any(np.diag(lin) <= 0):
        raise ConfigError("the nilearn MNI template is not on an axis-aligned RAS grid")
    wm, _ = load(datasets.load_mni152_wm_template)
    mask, _ = load(datasets.load_mni152_brain_mask)
    total = gm + wm
    over = total > 1.0
    gm[over] /= total[over]
    wm[over] /= total[over]
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    # Ventricles: the largest CSF component deep inside the brain (median depth > 15 mm);
    # depth is measured on a 2 mm subsample, distances only near the ventricles (fast).
    labels, n = ndimage.label(csf > 0.5)
    if n == 0:
        raise ConfigError("the MNI template has no CSF; the nilearn data look damaged")
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    depth = ndimage.distance_transform_edt(mask[::2, ::2, ::2] > 0, sampling=2.0)
    sub = labels[::2, ::2, ::2]
    ventricle_label = 0
    for i in np.argsort(-sizes)[:5] + 1:
        if np.median(depth[sub == i]) > 15.0:
            ventricle_label = int(i)
            break
    if ventricle_label == 0:
        raise ConfigError("cannot find the ventricles in the MNI template")
    ventricles = labels == ventricle_label
    margin = int(np.ceil(_PERIVENTRICULAR_MM)) + 2
    idx = np.argwhere(ventricles)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + margin + 1, ventricles.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    dist = ndimage.distance_transform_edt(~ventricles[box])
    zone = np.zeros(csf.shape, dtype=np.float32)
    zone[box] = (dist > 0) & (dist <= _PERIVENTRICULAR_MM)
    stack = np.stack([csf, gm, wm, zone]).astype(np.float32)
    return stack, affine


def _box_matrix(n_in: int, size: float) -> np.ndarray:
    """(n_out, n_in) box-averaging matrix from 1 mm voxels to voxels of ``size`` mm."""
    n_out = int(np.ceil(n_in / size - 1e-9))
    lo = np.arange(n_out)[:, None] * size
    j = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(lo + size, j + 1.0) - np.maximum(lo, j), 0.0, None)
    return (overlap / size).astype(np.float32)


def _separable(vol: np.ndarray, mats: list[np.ndarray], first_axis: int = 0) -> np.ndarray:
    """Apply one matrix per axis (axes first_axis, first_axis + 1, ...) of ``vol``."""
    for k, m in enumerate(mats):
        ax = first_axis + k
        vol = np.moveaxis(np.tensordot(m, vol, axes=([1], [ax])), 0, ax)
    return vol


def _check_voxel_size(voxel_size: float) -> float:
    try:
        v = float(voxel_size)
    except (TypeError, ValueError):
        raise ConfigError(f"voxel size {voxel_size!r} is not a number") from None
    if not np.isfinite(v) or v <= 0:
        raise ConfigError(f"voxel size must be > 0 mm, got {voxel_size}")
    if v > MAX_VOXEL_SIZE:
        raise ConfigError(f"voxel size must be at most {MAX_VOXEL_SIZE:g} mm, got {voxel_size}")
    if v < MIN_VOXEL_SIZE:
        raise ConfigError(
            f"voxel size must be at least {MIN_VOXEL_SIZE:g} mm (the template is 1 mm), "
            f"got {voxel_size}"
        )
    return v


@lru_cache(maxsize=8)
def load_basis(voxel_size: float = 2.0) -> Basis:
    """The template's tissue fractions box-averaged to ``voxel_size`` mm (cached per size)."""
    v = _check_voxel_size(voxel_size)
    stack, aff1 = _template_1mm()
    mats = [_box_matrix(n, v) for n in stack.shape[1:]]
    coarse = _separable(stack, mats, first_axis=1).astype(np.float32)
    fractions = np.ascontiguousarray(coarse[:3])
    zone = coarse[3]
    affine = np.eye(4)
    affine[:3, :3] = np.diag([v, v, v]) @ aff1[:3, :3]
    affine[:3, 3] = aff1[:3, :3] @ np.full(3, (v - 1.0) / 2.0) + aff1[:3, 3]
    brain = fractions.sum(axis=0, dtype=np.float64)
    centre_vox = np.array(
        [
            np.arange(n) @ brain.sum(axis=tuple(j for j in range(3) if j != k)) / brain.sum()
            for k, n in enumerate(brain.shape)
        ]
    )
    centre = affine[:3, :3] @ centre_vox + affine[:3, 3]
    wm = fractions[2]
    periventricular = np.argwhere((zone > 0.5) & (wm > 0.7))
    deep_wm = np.argwhere((zone <= 0.5) & (wm > 0.8))
    if len(periventricular) == 0:
        periventricular = np.argwhere((zone > 0.25) & (wm > 0.5))
    if len(deep_wm) == 0:
        deep_wm = np.argwhere(wm > 0.5)
    for arr in (fractions, affine, centre, periventricular, deep_wm):
        arr.setflags(write=False)
    return Basis(fractions, affine, v, centre, periventricular, deep_wm)


# ---------------------------------------------------------------------------------------------
# random fields


def _cubic_matrix(positions: np.ndarray, n_nodes: int) -> np.ndarray:
    """(len(positions), n_nodes) cubic-convolution (Catmull-Rom) interpolation weights."""
    t = np.asarray(positions, dtype=np.float64)
    base = np.floor(t).astype(int)
    m = np.zeros((t.size, n_nodes), dtype=np.float64)
    rows = np.arange(t.size)
    for off in (-1, 0, 1, 2):
        s = np.abs(t - (base + off))
        w = np.where(
            s <= 1.0,
            1.5 * s**3 - 2.5 * s**2 + 1.0,
            np.where(s < 2.0, -0.5 * s**3 + 2.5 * s**2 - 4.0 * s + 2.0, 0.0),
        )
        np.add.at(m, (rows, np.clip(base + off, 0, n_nodes - 1)), w)
    return m.astype(np.float32)


def _smooth_fields(
    rng: np.random.Generator, shape: tuple[int, int, int], voxel: float, spacing: float, sd
) -> np.ndarray:
    """Random fields (C, X, Y, Z): N(0, sd_c) values on a ``spacing`` mm grid, cubic-upsampled."""
    sd = np.atleast_1d(np.asarray(sd, dtype=np.float64))
    mats, nodes = [], []
    for n in shape:
        extent = (n - 1) * voxel
        n_nodes = int(np.floor(extent / spacing)) + 4
        offset = (n_nodes - 1) * spacing - extent  # centre the grid of nodes
        pos = (np.arange(n) * voxel + offset / 2.0) / spacing
        mats.append(_cubic_matrix(pos, n_nodes))
        nodes.append(n_nodes)
    values = rng.standard_normal((sd.size, *nodes)) * sd[:, None, None, None]
    return _separable(values.astype(np.float32), mats, first_axis=1)


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _truncated_normal(rng: np.random.Generator, size=None, limit: float = 2.5):
    return np.clip(rng.standard_normal(size), -limit, limit)


def _sampling_coordinates(
    rng: np.random.Generator, basis: Basis
) -> tuple[np.ndarray, dict[str, Any]]:
    """Template world coordinates (3, X, Y, Z) mm sampled by every voxel of the subject grid.

    Subject point p maps to c + A (p - c) + u(p): A a rotation times a per-axis scaling about
    the brain centre c, u a smooth random displacement.
    """
    v = basis.voxel_size
    shape = basis.shape
    angles = _ROTATION_SD * _truncated_normal(rng, 3)
    scales = 1.0 + _SCALING_SD * _truncated_normal(rng, 3)
    a = _rotation(angles) @ np.diag(scales)
    disp = _smooth_fields(rng, shape, v, _DEFORM_SPACING, np.full(3, _DEFORM_SD))
    axes = [basis.affine[k, k] * np.arange(n) + basis.affine[k, 3] for k, n in enumerate(shape)]
    rel = [
        (axes[k] - basis.centre[k]).reshape([-1 if j == k else 1 for j in range(3)])
        for k in range(3)
    ]
    coords = np.empty((3, *shape), dtype=np.float32)
    for i in range(3):
        coords[i] = basis.centre[i] + a[i, 0] * rel[0] + a[i, 1] * rel[1] + a[i, 2] * rel[2]
    coords += disp
    params = {"rotation_deg": angles.tolist(), "scaling": scales.tolist()}
    return coords, params


def _warp(volumes: np.ndarray, coords: np.ndarray, basis: Basis) -> np.ndarray:
    """Sample (C, X, Y, Z) template volumes at world coordinates (3, X, Y, Z), trilinear."""
    import torch
    import torch.nn.functional as F

    shape = volumes.shape[1:]
    grid = np.empty((*coords.shape[1:], 3), dtype=np.float32)
    for k in range(3):
        index = (coords[k] - basis.affine[k, 3]) / basis.affine[k, k]
        # grid_sample's last grid dimension is ordered (W, H, D) = (z, y, x) for a (X, Y, Z) input
        grid[..., 2 - k] = 2.0 * index / (shape[k] - 1) - 1.0
    out = F.grid_sample(
        torch.from_numpy(np.ascontiguousarray(volumes))[None],
        torch.from_numpy(grid)[None],
        mode="bilinear",
        padding_mode="zeros",
        align_corners=True,
    )
    return out[0].numpy()


# ---------------------------------------------------------------------------------------------
# lesions


def _lesions(rng: np.random.Generator, basis: Basis) -> tuple[np.ndarray, dict[str, Any]]:
    """Lesion load (X, Y, Z) in [0, 1] on the template grid: max of shape x severity."""
    v = basis.voxel_size
    shape = np.array(basis.shape)
    load = np.zeros(basis.shape, dtype=np.float32)
    n = int(rng.integers(_LESION_COUNT[0], _LESION_COUNT[1] + 1))
    n_periventricular = 0
    radii = []
    for _ in range(n):
        periventricular = rng.random() < _LESION_PERIVENTRICULAR
        n_periventricular += int(periventricular)
        pool = basis.periventricular if periventricular else basis.deep_wm
        centre = (pool[rng.integers(len(pool))] + rng.uniform(-0.5, 0.5, 3)) * v
        radius = float(np.exp(rng.uniform(*np.log(_LESION_RADIUS))))
        ratios = np.exp(0.3 * rng.standard_normal(3))
        semi = radius * ratios / np.cbrt(np.prod(ratios))
        rot = _random_rotation(rng)
        waves = rng.standard_normal((4, 3))
        waves /= np.linalg.norm(waves, axis=1, keepdims=True)
        phases = rng.uniform(0.0, 2.0 * np.pi, 4)
        severity = rng.uniform(0.5, 1.0)
        radii.append(radius)

        reach = semi.max() * (1.0 + _LESION_EDGE_AMPLITUDE) + v
        lo = np.clip(np.floor((centre - reach) / v).astype(int), 0, shape)
        hi = np.clip(np.ceil((centre + reach) / v).astype(int) + 1, 0, shape)
        if np.any(hi <= lo):
            continue
        d = np.stack(
            np.meshgrid(*[np.arange(lo[k], hi[k]) * v - centre[k] for k in range(3)], indexing="ij")
        )
        local = np.tensordot(rot.T, d, axes=1)
        rho = np.sqrt(((local / semi[:, None, None, None]) ** 2).sum(axis=0))
        unit = d / (np.sqrt((d**2).sum(axis=0)) + 1e-6)
        wobble = np.cos(2.0 * np.tensordot(waves, unit, axes=1) + phases[:, None, None, None])
        rho = rho / (1.0 + _LESION_EDGE_AMPLITUDE * wobble.mean(axis=0))
        shape_k = np.clip(0.5 + (1.0 - rho) * radius / v, 0.0, 1.0) * severity
        sl = tuple(slice(lo[k], hi[k]) for k in range(3))
        np.maximum(load[sl], shape_k.astype(np.float32), out=load[sl])
    params = {
        "n_lesions": n,
        "n_periventricular": n_periventricular,
        "lesion_radii_mm": [round(r, 3) for r in radii],
    }
    return load, params


# ---------------------------------------------------------------------------------------------
# subjects


@dataclass
class PhantomSubject:
    """One simulated subject (canonical RAS+ arrays on the grid of ``affine``).

    Attributes
    ----------
    images : noisy float32 images by contrast ("t1w", "t2w", "pd", "flair").
    clean : noise-free float32 images by contrast (signal times bias field).
    mask : bool brain mask (tissue fraction > 0.5).
    wm : bool white-matter mask (WM fraction > 0.5 and not lesion).
    tissue : uint8 label map (0 background, 1 CSF, 2 GM, 3 WM, 4 WMH).
    wmh : uint8 lesion label map (1 where the lesion fraction > 0.5).
    fractions : float32 tissue fractions by tissue ("csf", "gm", "wm", "wmh").
    bias : float32 multiplicative bias field by contrast.
    affine : (4, 4) voxel-to-world (MNI mm) affine.
    sigma : Rician noise sigma by contrast (same units as the images).
    params : JSON-able simulation parameters (seed, tissue parameters, deformation, lesions).
    """

    images: dict[str, np.ndarray]
    clean: dict[str, np.ndarray]
    mask: np.ndarray
    wm: np.ndarray
    tissue: np.ndarray
    wmh: np.ndarray
    fractions: dict[str, np.ndarray]
    bias: dict[str, np.ndarray]
    affine: np.ndarray
    sigma: dict[str, float]
    params: dict[str, Any] = field(default_factory=dict)


def subject_seed(seed: int, index: int) -> int:
    """The seed of subject ``index`` of a cohort with global ``seed`` (independent of N)."""
    if int(seed) < 0 or int(index) < 0:
        raise ConfigError(f"seed and subject index must be >= 0, got {seed} and {index}")
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def _tissue_parameters(rng: np.random.Generator, jitter: float) -> dict[str, tuple]:
    out = {}
    for t in TISSUES:
        nominal = np.array(TISSUE_PARAMS[t])
        factor = 1.0 + jitter * np.array(_JITTER_SD[t]) * _truncated_normal(rng, 3)
        out[t] = tuple(float(x) for x in nominal * factor)
    return out


def simulate_subject(seed: int, voxel_size: float = 2.0, *, jitter: float = 1.0) -> PhantomSubject:
    """Simulate one subject from an integer seed.

    Parameters
    ----------
    seed : non-negative integer; the same seed gives the same subject exactly.
    voxel_size : isotropic voxel size in mm (0.5 to 8).
    jitter : scale of the per-subject tissue-parameter variation (0: nominal parameters).

    Returns
    -------
    PhantomSubject with noisy and clean images, masks, labels, sigma and parameters.
    """
    import torch

    seed = check_seed(seed)
    if not np.isfinite(jitter) or jitter < 0:
        raise ConfigError(f"jitter must be >= 0, got {jitter}")
    basis = load_basis(_check_voxel_size(voxel_size))
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)]
    r_tissue, r_deform, r_lesion, r_bias, r_noise = streams

    tissue_params = _tissue_parameters(r_tissue, jitter)
    load, lesion_params = _lesions(r_lesion, basis)
    csf, gm, wm = basis.fractions
    les = load * wm
    template = np.stack([csf, gm, wm - les, les])
    coords, deform_params = _sampling_coordinates(r_deform, basis)
    with torch.inference_mode():
        warped = _warp(template, coords, basis)
    np.clip(warped, 0.0, 1.0, out=warped)
    fractions = dict(zip(TISSUES, warped, strict=True))

    total = warped.sum(axis=0)
    mask = total > 0.5
    wmh = (fractions["wmh"] > 0.5) & mask
    wm_mask = (fractions["wm"] > 0.5) & ~wmh & mask
    classes = np.stack([fractions["csf"], fractions["gm"], fractions["wm"] + fractions["wmh"]])
    tissue = (np.argmax(classes, axis=0) + 1).astype(np.uint8)
    tissue[wmh] = LABELS["wmh"]
    tissue[~mask] = 0

    # Bias: shared log-field plus a small per-contrast part, each centred on the brain.
    logs = _smooth_fields(
        r_bias,
        basis.shape,
        basis.voxel_size,
        _BIAS_SPACING,
        [_BIAS_SD] + [_BIAS_CONTRAST_SD] * len(CONTRASTS),
    )
    logs -= logs[:, mask].mean(axis=1)[:, None, None, None]

    quality = float(r_noise.uniform())
    clean, images, bias, sigma, noise_fraction = {}, {}, {}, {}, {}
    for c_index, c in enumerate(CONTRASTS):
        scale = _intensity_scale(c)
        signal = np.zeros(basis.shape, dtype=np.float32)
        for t in TISSUES:
            s = float(contrast_signal(c, *tissue_params[t])) * scale
            signal += np.float32(s) * fractions[t]
        field_c = np.exp(logs[0] + logs[1 + c_index]).astype(np.float32)
        x = (signal * field_c).astype(np.float32)
        lo, hi = NOISE_RANGE[c]
        u = float(np.clip(quality + _QUALITY_SPREAD * r_noise.standard_normal(), 0.0, 1.0))
        frac = lo + (hi - lo) * u
        ref = float(np.median(x[wm_mask])) if wm_mask.any() else WM_REFERENCE
        s_c = frac * ref
        noise = r_noise.standard_normal((2, *basis.shape), dtype=np.float32) * np.float32(s_c)
        images[c] = np.sqrt((x + noise[0]) ** 2 + noise[1] ** 2).astype(np.float32)
        clean[c], bias[c], sigma[c], noise_fraction[c] = x, field_c, s_c, frac

    vox_ml = basis.voxel_size**3 / 1000.0
    params: dict[str, Any] = {
        "seed": seed,
        "voxel_size": basis.voxel_size,
        "jitter": float(jitter),
        "tissue": {
            t: dict(zip(("t1", "t2", "pd"), p, strict=True)) for t, p in tissue_params.items()
        },
        **deform_params,
        **lesion_params,
        "lesion_volume_ml": float(fractions["wmh"].sum() * vox_ml),
        "wmh_label_volume_ml": float(wmh.sum() * vox_ml),
        "quality": quality,
        "noise_fraction": noise_fraction,
        "sigma": dict(sigma),
        "intensity_scale": {c: _intensity_scale(c) for c in CONTRASTS},
    }
    return PhantomSubject(
        images=images,
        clean=clean,
        mask=mask,
        wm=wm_mask,
        tissue=tissue,
        wmh=wmh.astype(np.uint8),
        fractions=fractions,
        bias=bias,
        affine=np.array(basis.affine),
        sigma=sigma,
        params=params,
    )


# ---------------------------------------------------------------------------------------------
# cohorts (I/O)


def split_counts(n_subjects: int, splits) -> tuple[int, int, int]:
    """Numbers of train/val/test subjects for fractions ``splits`` (largest remainders).

    Every split with a positive fraction gets at least one subject when ``n_subjects`` allows.
    """
    n = int(n_subjects)
    try:
        f = np.array([float(x) for x in splits], dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"splits {splits!r} must be three numbers") from None
    if f.shape != (3,) or not np.all(np.isfinite(f)) or np.any(f < 0) or f.sum() <= 0:
        raise ConfigError(
            f"splits {tuple(splits)} must be three non-negative fractions (train, val, test) "
            "with a positive sum"
        )
    target = f / f.sum() * n
    counts = np.floor(target).astype(int)
    order = np.argsort(-(target - counts), kind="stable")
    for k in order[: n - counts.sum()]:
        counts[k] += 1
    wanted = f > 0
    if n >= wanted.sum():
        for k in np.flatnonzero(wanted & (counts == 0)):
            counts[int(np.argmax(counts))] -= 1
            counts[k] += 1
    return int(counts[0]), int(counts[1]), int(counts[2])


def _save_subject(subject: PhantomSubject, folder: Path, overwrite: bool) -> dict[str, Path]:
    from nibabel.orientations import io_orientation

    from yoda.data.io import Geometry, save_image

    geom = Geometry(
        affine=subject.affine,
        shape=subject.mask.shape,
        header=None,
        ornt=io_orientation(subject.affine),
        path=None,
    )
    arrays: dict[str, tuple[np.ndarray, str]] = {}
    for c in CONTRASTS:
        arrays[c] = (subject.images[c], "float32")
    for c in CONTRASTS:
        arrays[f"clean_{c}"] = (subject.clean[c], "float32")
    arrays["mask"] = (subject.mask.astype(np.uint8), "uint8")
    arrays["tissue"] = (subject.tissue, "uint8")
    arrays["wmh"] = (subject.wmh, "uint8")
    arrays["wm"] = (subject.wm.astype(np.uint8), "uint8")
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in SUBJECT_FILES:
        array, dtype = arrays[name]
        paths[name] = save_image(
            array, geom, folder / f"{name}.nii.gz", dtype=dtype, overwrite=overwrite
        )
    return paths


def _write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def make_phantom(
    out_dir: str | os.PathLike,
    n_subjects: int,
    voxel_size: float = 2.0,
    seed: int = 0,
    splits=(0.6, 0.2, 0.2),
    *,
    counts: tuple[int, int, int] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Simulate a cohort and write it as NIfTI files with a ``manifest.csv``.

    Layout: ``out_dir/sub-XXX/{t1w,t2w,pd,flair,clean_<contrast>,mask,wm,tissue,wmh}.nii.gz``,
    ``out_dir/manifest.csv`` (paths relative to ``out_dir``) and ``out_dir/phantom.json`` (the
    parameters of every subject). Subject ``k`` is simulated from ``subject_seed(seed, k)``, so
    it is the same whatever ``n_subjects``; subjects are assigned to train, val, test in order.

    Parameters
    ----------
    out_dir : output folder (created).
    n_subjects : number of subjects (>= 1).
    voxel_size : isotropic voxel size in mm (0.5 to 8).
    seed : global seed (>= 0).
    splits : train/val/test fractions (see :func:`split_counts`).
    counts : explicit train/val/test numbers (summing to ``n_subjects``); overrides ``splits``.
    overwrite : replace an existing phantom in ``out_dir``.
    progress : show a progress bar (default: when stderr is a terminal).

    Returns
    -------
    Path of ``manifest.csv``.
    """
    from tqdm import tqdm

    from yoda.data.manifest import Manifest, Subject, write_manifest

    n = _check_count(n_subjects)
    v = _check_voxel_size(voxel_size)
    seed = check_seed(seed)
    if counts is not None:
        counts = tuple(int(c) for c in counts)
        if len(counts) != 3 or min(counts) < 0 or sum(counts) != n:
            raise ConfigError(
                f"train/val/test counts {counts} must be three non-negative numbers summing to "
                f"the number of subjects ({n})"
            )
    else:
        counts = split_counts(n, splits)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a folder")
    manifest_path = out / "manifest.csv"
    width = max(3, len(str(n - 1)))
    ids = [f"sub-{k:0{width}d}" for k in range(n)]
    if not overwrite:
        for name in ("manifest.csv", "phantom.json", *ids):
            if (out / name).exists():
                raise ConfigError(
                    f"{out / name} exists: {out} already holds a phantom; --overwrite replaces it"
                )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output folder {out}: {exc}") from None
    split_names = ["train"] * counts[0] + ["val"] * counts[1] + ["test"] * counts[2]
    show = sys.stderr.isatty() if progress is None else bool(progress)
    subjects, records = [], []
    for k in tqdm(range(n), desc="phantom", unit="subject", disable=not show):
        sid = ids[k]
        subject = simulate_subject(subject_seed(seed, k), v)
        paths = _save_subject(subject, out / sid, overwrite)
        subjects.append(
            Subject(
                id=sid,
                split=split_names[k],
                images={c: paths[c] for c in CONTRASTS},
                mask=paths["mask"],
                labels={"tissue": paths["tissue"], "wmh": paths["wmh"], "wm": paths["wm"]},
                clean={c: paths[f"clean_{c}"] for c in CONTRASTS},
            )
        )
        records.append({"id": sid, "split": split_names[k], **subject.params})
    info = {
        "format": "yoda-phantom",
        "version": 1,
        "seed": int(seed),
        "voxel_size": v,
        "n_subjects": n,
        "counts": dict(zip(("train", "val", "test"), counts, strict=True)),
        "wm_reference": WM_REFERENCE,
        "noise_range": NOISE_RANGE,
        "subjects": records,
    }
    if overwrite:
        _remove_earlier_subjects(out, set(ids))
    _write_json(out / "phantom.json", info)
    return write_manifest(Manifest(subjects, out.absolute()), manifest_path)


def _remove_earlier_subjects(out: Path, keep: set[str]) -> None:
    """Remove the files of an earlier phantom's subjects that the new one does not have (as
    its ``phantom.json`` lists them), and their folders once empty; nothing else."""
    try:
        earlier = json.loads((out / "phantom.json").read_text(encoding="utf-8"))["subjects"]
        ids = {str(record["id"]) for record in earlier}
    except (OSError, ValueError, KeyError, TypeError):
        return
    for sid in sorted(ids - keep):
        folder = out / sid
        if not re.fullmatch(r"sub-\d+", sid) or not folder.is_dir() or folder.is_symlink():
            continue
        for name in SUBJECT_FILES:
            (folder / f"{name}.nii.gz").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            folder.rmdir()  # kept if anything else is in it


def _check_count(n_subjects) -> int:
    if isinstance(n_subjects, bool):
        raise ConfigError(f"number of subjects must be an integer >= 1, got {n_subjects!r}")
    try:
        n = int(n_subjects)
    except (TypeError, ValueError):
        raise ConfigError(
            f"number of subjects must be an integer >= 1, got {n_subjects!r}"
        ) from None
    if n != n_subjects or n < 1:
        raise ConfigError(f"number of subjects must be an integer >= 1, got {n_subjects!r}")
    return n
