"""Image and downstream metrics on volumes (paper Sec. III-F).

Every function takes numpy arrays (any real dtype, converted to float64) and boolean masks
(numeric masks are accepted and read as ``mask != 0``), in the canonical (x, y, z) order, with
intensities on the 0-255 scale unless said otherwise.

Conventions a report must state:

- ``ssim3d`` / ``psnr``: data range 255; with a mask, both are computed on the mask's bounding
  box with voxels outside the mask set to 0 in both images (the paper's Sec. III-F), so PSNR
  averages the squared error over the box. Identical images give PSNR = inf.
- ``noise_level``: the raw RMS of Eq. 14 on the 0-255 scale (it underestimates the std of white
  noise by the factor ``noise_level_correction()``, about 0.96).
- ``lesion_cnr``: unitless; nan (with a :class:`MetricWarning` giving the reason) when no lesion has
  usable white matter around it.
- ``dice`` / ``hd95`` / ``alvr``: both masks empty = perfect agreement (1.0 / 0.0 mm / 0.0); exactly
  one mask empty = worst case (0.0 / inf / inf). HD95 is in millimetres.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from yoda.errors import ConfigError, InputError

__all__ = [
    "SSIM_K1",
    "SSIM_K2",
    "SSIM_SIGMA",
    "SSIM_TRUNCATE",
    "SSIM_WIN_SIZE",
    "NOISE_BLUR_SIGMA",
    "NOISE_BLUR_RADIUS",
    "CNR_DISTANCE_MM",
    "WMH_RATIO",
    "MetricWarning",
    "LesionCNR",
    "ssim3d",
    "psnr",
    "noise_level",
    "noise_level_correction",
    "lesion_cnr",
    "lesion_cnr_details",
    "segment_wmh",
    "remove_small_components",
    "dice",
    "hd95",
    "alvr",
    "worst_fraction",
    "rician_noise",
]

SSIM_K1 = 0.01
"""SSIM luminance constant: C1 = (K1 * data_range) ** 2 (Wang et al. 2004)."""
SSIM_K2 = 0.03
"""SSIM contrast constant: C2 = (K2 * data_range) ** 2 (Wang et al. 2004)."""
SSIM_SIGMA = 1.5
"""Standard deviation (voxels) of the Gaussian SSIM window."""
SSIM_TRUNCATE = 3.5
"""Gaussian window truncation in standard deviations: radius int(3.5 * 1.5 + 0.5) = 5."""
SSIM_WIN_SIZE = 2 * int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5) + 1
"""Width of the SSIM window (11 voxels); a 5-voxel border is left out of the mean."""
NOISE_BLUR_SIGMA = 1.1
"""Standard deviation (voxels) of the Gaussian blur of Eq. 14."""
NOISE_BLUR_RADIUS = 2
"""Radius of the Gaussian blur of Eq. 14 (kernel size 5)."""
CNR_DISTANCE_MM = 3.0
"""White matter within this distance (mm) of a lesion is its reference for the CNR (Eq. 15)."""
WMH_RATIO = 1.4
"""FLAIR intensity, relative to the white-matter median, above which a voxel is a lesion."""

_CUBE = np.ones((3, 3, 3), dtype=bool)


class MetricWarning(UserWarning):
    """A metric is undefined for this input (it returns nan) or was computed on degenerate data."""


# --------------------------------------------------------------------------- input checks


def _as_float(x: object, name: str, ndim: int | None = None) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
    ):
        raise InputError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if ndim is not None and arr.ndim != ndim:
        raise InputError(f"{name}: expected a {ndim}-D array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError(f"{name}: contains NaN or Inf values")
    return arr


def _as_mask(m: object, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    arr = np.asarray(m)
    if arr.dtype != np.bool_:
        if not np.issubdtype(arr.dtype, np.number):
            raise InputError(f"{name}: expected a boolean mask, got dtype {arr.dtype}")
        arr = arr != 0
    if shape is not None and arr.shape != tuple(shape):
        raise InputError(f"{name}: shape {arr.shape} does not match the image shape {tuple(shape)}")
    return arr


def _pair(pred: object, ref: object, ndim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    p = _as_float(pred, "pred", ndim)
    r = _as_float(ref, "ref", ndim)
    if p.shape != r.shape:
        raise InputError(f"pred and ref differ in shape: {p.shape} vs {r.shape}")
    return p, r


def _mask_pair(a: object, b: object) -> tuple[np.ndarray, np.ndarray]:
    ma = _as_mask(a, "a")
    mb = _as_mask(b, "b")
    if ma.shape != mb.shape:
        raise InputError(f"masks a and b differ in shape: {ma.shape} vs {mb.shape}")
    return ma, mb


def _voxel_size(voxel_size: Sequence[float] | float, ndim: int) -> np.ndarray:
    vs = np.asarray(voxel_size, dtype=np.float64).reshape(-1)
    if vs.size == 1:
        vs = np.repeat(vs, ndim)
    if vs.size != ndim or not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise ConfigError(
            f"voxel_size must be {ndim} positive numbers (mm), "
            f"got {tuple(np.atleast_1d(voxel_size))}"
        )
    return vs


def _check_range(data_range: float) -> float:
    r = float(data_range)
    if not math.isfinite(r) or r <= 0:
        raise ConfigError(f"data_range must be a positive number, got {data_range}")
    return r


def _bbox(mask: np.ndarray, margin: int | Sequence[int] = 0) -> tuple[slice, ...]:
    """Bounding box of a non-empty mask, expanded by ``margin`` voxels and clipped to the array."""
    margins = np.broadcast_to(np.asarray(margin, dtype=int), (mask.ndim,))
    out = []
    for axis in range(mask.ndim):
        other = tuple(i for i in range(mask.ndim) if i != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        lo = max(int(idx[0]) - int(margins[axis]), 0)
        hi = min(int(idx[-1]) + 1 + int(margins[axis]), mask.shape[axis])
        out.append(slice(lo, hi))
    return tuple(out)


# --------------------------------------------------------------------------- SSIM and PSNR


def _ssim_map_mean(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """Mean Gaussian-window SSIM of two same-shape arrays, border of the window radius left out."""
    if min(x.shape) < SSIM_WIN_SIZE:
        raise InputError(
            f"SSIM needs at least {SSIM_WIN_SIZE} voxels along every axis (window of "
            f"sigma {SSIM_SIGMA}); the (mask bounding box of the) image has shape {x.shape}"
        )

    def blur(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, SSIM_SIGMA, truncate=SSIM_TRUNCATE, mode="reflect")

    ux = blur(x)
    uy = blur(y)
    vx = blur(x * x)
    vx -= ux * ux
    vy = blur(y * y)
    vy -= uy * uy
    vxy = blur(x * y)
    vxy -= ux * uy
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    num = (2.0 * ux * uy + c1) * (2.0 * vxy + c2)
    den = (ux * ux + uy * uy + c1) * (vx + vy + c2)
    pad = (SSIM_WIN_SIZE - 1) // 2
    inner = tuple(slice(pad, n - pad) for n in x.shape)
    return float(np.mean(num[inner] / den[inner], dtype=np.float64))


def ssim3d(
    pred: np.ndarray,
    ref: np.ndarray,
    mask: np.ndarray | None = None,
    data_range: float = 255.0,
) -> float:
    """Structural similarity of two volumes with a 3-D Gaussian window.

    Parameters
    ----------
    pred, ref : ndarray (X, Y, Z)
        Volumes on the same scale (0-255 by default).
    mask : bool ndarray (X, Y, Z), optional
        Brain (tissue) mask. If given, both volumes are cropped to the mask's bounding box and
        voxels outside the mask are set to 0 in both, as in the paper.
    data_range : float
        Dynamic range R; C1 = (K1 R)^2, C2 = (K2 R)^2 with K1 = 0.01, K2 = 0.03.

    Returns
    -------
    float
        Mean SSIM (1.0 for identical volumes). The window is Gaussian (sigma 1.5 voxels, truncated
        at 3.5 sigma: 11 voxels wide), images are extended by reflection, population (co)variances
        are used and the 5-voxel border is left out of the mean: the conventions of
        ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False)``. The cropped volume needs >= 11 voxels along each axis.
    """
    p, r = _pair(pred, ref, ndim=3)
    rng = _check_range(data_range)
    if mask is not None:
        m = _as_mask(mask, "mask", p.shape)
        if not m.any():
            raise InputError("mask is empty: SSIM needs at least one voxel inside the mask")
        box = _bbox(m)
        m = m[box]
        p = np.where(m, p[box], 0.0)
        r = np.where(m, r[box], 0.0)
    return _ssim_map_mean(p, r, rng)


def psnr(
    pred: np.ndarray,
    ref: np.ndarray,
    mask: np.ndarray | None = None,
    data_range: float = 255.0,
) -> float:
    """Peak signal-to-noise ratio in dB.

    With a mask, both volumes are cropped to the mask's bounding box and voxels outside the
    mask are set to 0 in both, as in the paper (and as :func:`ssim3d` does): the mean squared
    error is taken over the box. Without a mask, all voxels count. Returns ``inf`` for
    identical images (inside the mask).
    """
    p, r = _pair(pred, ref)
    rng = _check_range(data_range)
    if mask is not None:
        m = _as_mask(mask, "mask", p.shape)
        if not m.any():
            raise InputError("mask is empty: PSNR needs at least one voxel inside the mask")
        box = _bbox(m)
        diff = np.where(m[box], p[box] - r[box], 0.0)
    else:
        diff = p - r
    if diff.size == 0:
        raise InputError("PSNR of empty arrays is undefined")
    mse = float(np.mean(diff * diff))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(rng * rng / mse)


# --------------------------------------------------------------------------- noise level


def _noise_kernel_1d() -> np.ndarray:
    x = np.arange(-NOISE_BLUR_RADIUS, NOISE_BLUR_RADIUS + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / NOISE_BLUR_SIGMA) ** 2)
    return w / w.sum()


def _noise_blur(a: np.ndarray) -> np.ndarray:
    return ndimage.gaussian_filter(
        a, NOISE_BLUR_SIGMA, radius=NOISE_BLUR_RADIUS, mode="constant", cval=0.0
    )


def noise_level(img: np.ndarray, wm_mask: np.ndarray) -> float:
    """Noise level sigma_WM of Eq. 14: RMS of the image minus its Gaussian blur in white matter.

    The blur (kernel size 5, sigma 1.1 voxels) is applied to the white-matter voxels only
    (normalized convolution: sum of kernel * image over WM voxels / sum of kernel over WM voxels),
    so no other tissue leaks into the smooth map X-bar. The residual X - X-bar is evaluated on the
    white-matter mask eroded once with a 3x3x3 cube (voxels adjacent to a tissue boundary are left
    out) and its root mean square is returned, on the image's scale.

    This is the raw RMS of the paper. For white noise of std ``s`` on a smooth image it equals
    ``s * noise_level_correction()`` (about 0.96 s); divide by that factor to estimate ``s``.

    Returns nan (with a :class:`MetricWarning`) if the eroded white matter is empty.
    """
    x = _as_float(img, "img", ndim=3)
    wm = _as_mask(wm_mask, "wm_mask", x.shape)
    core = ndimage.binary_erosion(wm, structure=_CUBE, border_value=0)
    if not core.any():
        warnings.warn(
            "noise_level: white-matter mask is empty after one erosion; returning nan",
            MetricWarning,
            stacklevel=2,
        )
        return math.nan
    box = _bbox(core, margin=NOISE_BLUR_RADIUS)
    xb, wb, cb = x[box], wm[box].astype(np.float64), core[box]
    smooth = _noise_blur(xb * wb)[cb] / _noise_blur(wb)[cb]
    resid = xb[cb] - smooth
    return float(np.sqrt(np.mean(resid * resid)))


def noise_level_correction() -> float:
    """Ratio of ``noise_level`` to the std of white noise on a smooth image.

    The residual of white noise ``n`` after subtracting its blur ``w * n`` has the variance
    ``s^2 (1 - 2 w0 + sum w^2)`` where ``w`` is the normalized 3-D kernel and ``w0`` its centre
    weight; this returns ``sqrt(1 - 2 w0 + sum w^2)`` (about 0.958) for voxels whose whole kernel
    lies in white matter. Use ``noise_level(img, wm) / noise_level_correction()`` only when an
    estimate of the noise std itself is wanted; the paper reports the raw RMS.
    """
    k = _noise_kernel_1d()
    w0 = float(k[NOISE_BLUR_RADIUS]) ** 3
    sum_sq = float(np.sum(k * k)) ** 3
    return math.sqrt(1.0 - 2.0 * w0 + sum_sq)


# --------------------------------------------------------------------------- lesion CNR


@dataclass(frozen=True)
class LesionCNR:
    """Per-lesion contrast-to-noise ratios (Eq. 15) and their voxel-weighted mean.

    Attributes
    ----------
    value : float
        Voxel-weighted mean CNR over the lesions with a usable white-matter ring (nan if none).
    cnr : ndarray (n_lesions,)
        CNR of each connected lesion (nan where its ring had < 2 voxels or zero spread).
    sizes : ndarray (n_lesions,)
        Voxel count of each lesion.
    reason : str
        Empty when ``value`` is defined, else why it is nan.
    """

    value: float
    cnr: np.ndarray
    sizes: np.ndarray
    reason: str = ""


def lesion_cnr_details(
    img: np.ndarray,
    lesion_mask: np.ndarray,
    wm_mask: np.ndarray,
    voxel_size: Sequence[float] | float = (1.0, 1.0, 1.0),
    distance_mm: float = CNR_DISTANCE_MM,
) -> LesionCNR:
    """Contrast-to-noise ratio of every connected lesion (see :func:`lesion_cnr`)."""
    x = _as_float(img, "img", ndim=3)
    les = _as_mask(lesion_mask, "lesion_mask", x.shape)
    wm = _as_mask(wm_mask, "wm_mask", x.shape)
    vs = _voxel_size(voxel_size, 3)
    dist_max = float(distance_mm)
    if not math.isfinite(dist_max) or dist_max <= 0:
        raise ConfigError(f"distance_mm must be a positive number, got {distance_mm}")

    labels, n = ndimage.label(les, structure=_CUBE)
    empty = np.zeros(0)
    if n == 0:
        return LesionCNR(math.nan, empty, empty.astype(int), "no lesion voxels in lesion_mask")
    wm_ref = wm & ~les  # isointense white matter: WM that is no lesion
    reach = np.ceil(dist_max / vs).astype(int)
    cnr = np.full(n, math.nan)
    sizes = np.zeros(n, dtype=int)
    for i, sl in enumerate(ndimage.find_objects(labels)):
        box = tuple(
            slice(max(s.start - r, 0), min(s.stop + r, dim))
            for s, r, dim in zip(sl, reach, x.shape, strict=True)
        )
        comp = labels[box] == i + 1
        sizes[i] = int(comp.sum())
        dist = ndimage.distance_transform_edt(~comp, sampling=vs)
        ring = wm_ref[box] & (dist <= dist_max)
        if ring.sum() < 2:
            continue
        xb = x[box]
        ring_vals = xb[ring]
        sd = float(ring_vals.std())
        if sd == 0.0:
            continue
        cnr[i] = (float(xb[comp].mean()) - float(ring_vals.mean())) / sd
    ok = np.isfinite(cnr)
    if not ok.any():
        reason = (
            f"none of the {n} lesions has >= 2 white-matter voxels with non-zero spread "
            f"within {dist_max:g} mm"
        )
        return LesionCNR(math.nan, cnr, sizes, reason)
    value = float(np.sum(cnr[ok] * sizes[ok]) / np.sum(sizes[ok]))
    return LesionCNR(value, cnr, sizes, "")


def lesion_cnr(
    img: np.ndarray,
    lesion_mask: np.ndarray,
    wm_mask: np.ndarray,
    voxel_size: Sequence[float] | float = (1.0, 1.0, 1.0),
    distance_mm: float = CNR_DISTANCE_MM,
) -> float:
    """Lesion contrast-to-noise ratio (Eq. 15), voxel-weighted over connected lesions.

    Each 26-connected lesion component L gets CNR = (mean(L) - mean(W)) / std(W), where W are the
    white-matter voxels that belong to no lesion and lie within ``distance_mm`` (3 mm) of L
    (Euclidean distance between voxel centres in mm, from ``voxel_size``; std with ddof=0).
    Lesions whose ring has fewer than 2 voxels or zero spread are left out. The result is the
    mean of the lesion CNRs weighted by lesion voxel counts; unitless.

    Returns nan with a :class:`MetricWarning` stating the reason when there is no lesion or no
    lesion has usable white matter around it. :func:`lesion_cnr_details` gives per-lesion values.
    """
    res = lesion_cnr_details(img, lesion_mask, wm_mask, voxel_size, distance_mm)
    if res.reason:
        warnings.warn(f"lesion_cnr is nan: {res.reason}", MetricWarning, stacklevel=2)
    return res.value


# --------------------------------------------------------------------------- WMH segmentation


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop 26-connected components with fewer than ``min_size`` voxels from a boolean mask."""
    m = _as_mask(mask, "mask")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 1:
        raise ConfigError(f"min_size must be an integer >= 1, got {min_size!r}")
    if min_size == 1 or not m.any():
        return m.copy()
    labels, _ = ndimage.label(m, structure=np.ones((3,) * m.ndim, dtype=bool))
    counts = np.bincount(labels.ravel())
    keep = counts >= min_size
    keep[0] = False
    return keep[labels]


def segment_wmh(
    flair: np.ndarray,
    wm_mask: np.ndarray,
    region: np.ndarray | None = None,
    ratio: float = WMH_RATIO,
    min_size: int = 2,
) -> np.ndarray:
    """White-matter hyperintensities by a fixed intensity-ratio rule on a FLAIR volume.

    Rule (the same for acquired and translated images):

    1. reference level: the median FLAIR intensity over the white-matter mask ``wm_mask``;
    2. candidates: voxels of ``region`` brighter than ``ratio`` x that median (default 1.4:
       normal grey matter is ~1.15-1.2 x white matter in FLAIR, lesions ~1.8 x);
    3. 26-connected components smaller than ``min_size`` voxels are removed.

    ``region`` is where lesions are searched: a white-matter segmentation that includes the
    lesions (as tissue segmentations that label WMH as white matter do); default ``wm_mask``.
    The threshold is relative to the tissue level, not to the image's noise, so smooth
    (denoised) and noisy images are segmented alike. Returns a boolean mask.
    """
    x = _as_float(flair, "flair", ndim=3)
    wm = _as_mask(wm_mask, "wm_mask", x.shape)
    search = wm if region is None else _as_mask(region, "region", x.shape)
    r = float(ratio)
    if not math.isfinite(r) or r <= 0:
        raise ConfigError(f"ratio must be a positive number, got {ratio}")
    if not wm.any():
        raise InputError("wm_mask is empty: no white matter to set the threshold")
    thr = r * float(np.median(x[wm]))
    return remove_small_components(search & (x > thr), min_size)


# --------------------------------------------------------------------------- overlap metrics


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient 2|A and B| / (|A| + |B|); 1.0 when both masks are empty."""
    ma, mb = _mask_pair(a, b)
    na, nb = int(ma.sum()), int(mb.sum())
    if na + nb == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(ma & mb)) / (na + nb)


def _surface(m: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(m.ndim, 1)
    return m & ~ndimage.binary_erosion(m, structure=structure, border_value=0)


def hd95(
    a: np.ndarray, b: np.ndarray, voxel_size: Sequence[float] | float = (1.0, 1.0, 1.0)
) -> float:
    """95th-percentile symmetric Hausdorff distance between the surfaces of two masks, in mm.

    Surface voxels are the mask voxels with a 6-connected neighbour outside the mask (the image
    border counts as outside). For each surface voxel of one mask the Euclidean distance (mm, via
    ``voxel_size``) to the nearest surface voxel of the other is taken; the result is the larger
    of the two directed 95th percentiles (linear interpolation), the convention of
    ``monai.metrics.compute_hausdorff_distance(percentile=95)``.

    Both masks empty: 0.0. Exactly one mask empty: inf.
    """
    ma, mb = _mask_pair(a, b)
    vs = _voxel_size(voxel_size, ma.ndim)
    ea, eb = bool(ma.any()), bool(mb.any())
    if not ea and not eb:
        return 0.0
    if not (ea and eb):
        return math.inf
    box = _bbox(ma | mb)
    sa = _surface(np.pad(ma[box], 1))
    sb = _surface(np.pad(mb[box], 1))
    d_ab = ndimage.distance_transform_edt(~sb, sampling=vs)[sa]
    d_ba = ndimage.distance_transform_edt(~sa, sampling=vs)[sb]
    return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


def alvr(a: np.ndarray, b: np.ndarray) -> float:
    """Absolute log2 volume ratio |log2(|A| / |B|)|.

    Both masks empty: 0.0. Exactly one mask empty: inf. Voxel size cancels out.
    """
    ma, mb = _mask_pair(a, b)
    na, nb = int(ma.sum()), int(mb.sum())
    if na == 0 and nb == 0:
        return 0.0
    if na == 0 or nb == 0:
        return math.inf
    return abs(math.log2(na / nb))


# --------------------------------------------------------------------------- QC and noise


def worst_fraction(
    scores: Mapping[str, float], fraction: float = 0.1, higher_is_better: bool = True
) -> list[str]:
    """Identifiers of the worst-scoring ``fraction`` of subjects, worst first.

    Takes ``ceil(fraction * n)`` subjects, at least one (none if ``scores`` is empty). NaN scores
    count as the worst; ties are broken by identifier.
    """
    f = float(fraction)
    if not (0.0 < f <= 1.0):
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    if not scores:
        return []
    n = max(1, math.ceil(f * len(scores) - 1e-9))
    sign = 1.0 if higher_is_better else -1.0

    def key(item: tuple[str, float]) -> tuple[int, float, str]:
        ident, value = item
        v = float(value)
        if math.isnan(v):
            return (0, 0.0, ident)
        return (1, sign * v, ident)

    ranked = sorted(scores.items(), key=key)
    return [ident for ident, _ in ranked[:n]]


def rician_noise(
    img: np.ndarray,
    sigma: float,
    generator: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Magnitude image with Rician noise (Eq. 1): ``|img + n_re + i n_im|``, n ~ N(0, sigma^2).

    ``sigma`` is on the image's scale (0-255); the result is not clipped. ``generator`` is a
    ``numpy.random.Generator`` or a seed.
    """
    x = _as_float(img, "img")
    s = float(sigma)
    if not math.isfinite(s) or s < 0:
        raise ConfigError(f"sigma must be a non-negative number, got {sigma}")
    rng = np.random.default_rng(generator)
    re = x + rng.normal(0.0, s, size=x.shape) if s > 0 else x.copy()
    im = rng.normal(0.0, s, size=x.shape) if s > 0 else np.zeros_like(x)
    return np.hypot(re, im)
