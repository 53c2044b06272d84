"""Intensity normalization, foreground masks and the region of interest (pure numpy/scipy).

Intensities go through two scales:

* the **0-255 scale**: ``x255 = clip((vol - offset) * scale, 0, 255)`` with the parameters of an
  :class:`Intensity` fitted per image by :func:`fit_intensity`;
* the **network scale** [-1, 1]: ``x = x255 / 127.5 - 1`` (background -1), see
  :func:`to_network` / :func:`from_network`.

Methods (``NORMALIZATIONS``):

``"percentile"``
    The paper's choice: 0 -> 0 and the 99.9th percentile of the foreground (of the nonzero voxels
    when no mask is given) -> 255.
``"tissue"``
    The median of the foreground voxels -> ``TISSUE_LEVEL`` = 255 * 0.4 = 102 (0 -> 0, clipped at
    255, so intensities up to 2.5 times the tissue median are kept). The foreground is the given
    mask, or else the interior (2-voxel erosion) of :func:`foreground_mask`. The median of a large
    foreground barely moves with noise or with a small bright lesion, whereas the 99.9th
    percentile sits in the tail that both of them fill.
``"ct"``
    A fixed Hounsfield window [-1000, 2000] HU -> [0, 255]; :func:`invert_intensity` brings a
    translated CT back to HU.

Masks: :func:`foreground_mask` finds the head (or brain) when no mask is given;
:func:`roi_bbox` gives the mask's bounding box expanded by margins; :func:`crop` and
:func:`uncrop` are exact inverses on the box.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
from scipy import ndimage

from yoda.device import array_threads
from yoda.errors import ConfigError, InputError

__all__ = [
    "CT_WINDOW",
    "NORMALIZATIONS",
    "ROI_MARGINS",
    "TISSUE_LEVEL",
    "Intensity",
    "apply_intensity",
    "crop",
    "fill_holes",
    "fit_intensity",
    "foreground_mask",
    "from_network",
    "gaussian",
    "in_parts",
    "invert_intensity",
    "roi_bbox",
    "to_network",
    "uncrop",
]

NORMALIZATIONS = ("percentile", "tissue", "ct")
TISSUE_LEVEL = 255.0 * 0.4
"""Level (0-255 scale) of the foreground median under "tissue" normalization."""
CT_WINDOW = (-1000.0, 2000.0)
"""Hounsfield window mapped to [0, 255] under "ct" normalization."""
ROI_MARGINS = (20, 10, 5)
"""ROI margins in voxels along the canonical axes x (LR), y (AP), z (IS)."""


@dataclass
class Intensity:
    """Linear intensity map ``x255 = (vol - offset) * scale`` (then clipped to [0, 255]).

    Attributes
    ----------
    method : one of ``NORMALIZATIONS``.
    scale : multiplier (0-255 units per image unit), > 0.
    offset : the image intensity that maps to 0 (0 for MRI, -1000 HU for CT).
    """

    method: str
    scale: float
    offset: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dictionary."""
        return {k: (float(v) if k != "method" else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Intensity:
        """Inverse of :meth:`to_dict`; raises ConfigError for bad fields."""
        if not isinstance(data, dict) or "method" not in data or "scale" not in data:
            raise ConfigError(f"intensity: expected a dict with 'method' and 'scale', got {data!r}")
        unknown = set(data) - {"method", "scale", "offset"}
        if unknown:
            raise ConfigError(f"intensity: unknown field(s) {sorted(unknown)}")
        method = data["method"]
        if method not in NORMALIZATIONS:
            raise ConfigError(f"intensity: method {method!r} is not one of {NORMALIZATIONS}")
        try:
            scale = float(data["scale"])
            offset = float(data.get("offset", 0.0))
        except (TypeError, ValueError):
            raise ConfigError(f"intensity: scale/offset must be numbers, got {data!r}") from None
        if not (np.isfinite(scale) and scale > 0 and np.isfinite(offset)):
            raise ConfigError(f"intensity: scale must be finite and > 0, got {data!r}")
        return cls(method=method, scale=scale, offset=offset)


def fit_intensity(
    vol: np.ndarray,
    mask: np.ndarray | None = None,
    method: str = "percentile",
    percentile: float = 99.9,
    *,
    name: str = "image",
) -> Intensity:
    """Fit the intensity map of one image.

    Parameters
    ----------
    vol : 3-D image (raw intensities; HU for CT).
    mask : optional foreground (brain) mask of the same shape.
    method : "percentile", "tissue" or "ct" (see the module docstring).
    percentile : the percentile mapped to 255 by "percentile".
    name : what the image is, for error messages.

    Returns
    -------
    Intensity

    Raises
    ------
    ConfigError for an unknown method or percentile; InputError for a mask of the wrong shape,
    an empty foreground, or a foreground without positive intensities.
    """
    if method not in NORMALIZATIONS:
        raise ConfigError(f"normalization {method!r} is not one of {NORMALIZATIONS}")
    if method == "ct":
        lo, hi = CT_WINDOW
        return Intensity(method="ct", scale=255.0 / (hi - lo), offset=lo)
    vol = np.asarray(vol)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != vol.shape:
            raise InputError(f"{name}: mask shape {mask.shape} differs from image {vol.shape}")
        mask = mask > 0
    if method == "percentile":
        if not 0 < percentile <= 100:
            raise ConfigError(f"percentile {percentile} must be in (0, 100]")
        values = vol[mask] if mask is not None else vol[vol != 0]
        what = f"the {percentile}th percentile of the foreground"
        ref = float(np.percentile(values, percentile)) if values.size else 0.0
        level = 255.0
    else:
        if mask is None:
            # The automatic mask's edge holds partial-volume and background voxels: take the
            # median over its interior.
            mask = foreground_mask(vol, name=name)
            inner = ndimage.binary_erosion(mask, iterations=2)
            if np.count_nonzero(inner) >= 0.1 * np.count_nonzero(mask):
                mask = inner
        values = vol[mask]
        what = "the median of the foreground"
        ref = float(np.median(values)) if values.size else 0.0
        level = TISSUE_LEVEL
    if values.size == 0:
        raise InputError(f"{name}: the foreground is empty; cannot normalize intensities")
    if not ref > 0:
        raise InputError(f"{name}: {what} is {ref:.4g}; it must be positive")
    return Intensity(method=method, scale=level / ref, offset=0.0)


def apply_intensity(vol: np.ndarray, intensity: Intensity) -> np.ndarray:
    """Map an image to the 0-255 scale: ``clip((vol - offset) * scale, 0, 255)`` (float32).

    Values so large that the product overflows float32 saturate at 255 like any other.
    """
    with np.errstate(over="ignore"):
        out = (np.asarray(vol, dtype=np.float32) - np.float32(intensity.offset)) * np.float32(
            intensity.scale
        )
    return np.clip(out, 0.0, 255.0, out=out)


def invert_intensity(x255: np.ndarray, intensity: Intensity) -> np.ndarray:
    """Map the 0-255 scale back to image units (HU for CT): ``x255 / scale + offset``."""
    x = np.asarray(x255, dtype=np.float32)
    return x / np.float32(intensity.scale) + np.float32(intensity.offset)


def to_network(x255: Any) -> Any:
    """0-255 scale -> network scale [-1, 1] (works on numpy arrays and torch tensors)."""
    return x255 / 127.5 - 1.0


def from_network(x: Any) -> Any:
    """Network scale [-1, 1] -> 0-255 scale (works on numpy arrays and torch tensors)."""
    return (x + 1.0) * 127.5


# ---------------------------------------------------------------------------------------------
# masks and ROI


def _otsu(values: np.ndarray, bins: int = 256, workers: int | None = None) -> float:
    """Otsu's threshold: the cut maximizing the between-class variance of a histogram.

    The histogram is counted in parts over ``workers`` threads (default as :func:`in_parts`);
    every value falls in the same bin whatever the parts, so the counts are exact.
    """
    lo, hi = float(values.min()), float(values.max())
    flat = values.ravel()
    parts = np.array_split(flat, array_threads(flat.size, flat.size, workers))

    def count(part: np.ndarray) -> np.ndarray:
        return np.histogram(part, bins=bins, range=(lo, hi))[0]

    if len(parts) == 1:
        hists = [count(flat)]
    else:
        with ThreadPoolExecutor(len(parts)) as pool:
            hists = list(pool.map(count, parts))
    edges = np.histogram_bin_edges(flat[:1], bins=bins, range=(lo, hi))
    hist = np.sum(hists, axis=0, dtype=np.float64)
    centers = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centers)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    k = int(np.argmax(between[:-1]))
    return float(edges[k + 1])


def in_parts(
    fn: Callable[[np.ndarray], np.ndarray],
    arr: np.ndarray,
    *,
    axis: int = 0,
    halo: int = 0,
    workers: int | None = None,
) -> np.ndarray:
    """``fn(arr)`` computed in parts along ``axis`` over threads (numpy and scipy release the GIL).

    ``fn`` must keep the shape and be local along ``axis``: an output value depends on input
    values at most ``halo`` positions away. Each part is computed with ``halo`` neighbours on
    both sides, so every value is exactly ``fn(arr)``'s. ``workers``: default one per usable
    core (at most 8) for arrays of 2^21 values or more, else 1.
    """
    n = arr.shape[axis]
    workers = array_threads(arr.size, n, workers)
    if workers == 1:
        return fn(arr)
    cuts = [int(c) for c in np.linspace(0, n, workers + 1)]

    def along(lo: int, hi: int) -> tuple[slice, ...]:
        index = [slice(None)] * arr.ndim
        index[axis] = slice(lo, hi)
        return tuple(index)

    def part(a: int, b: int) -> np.ndarray:
        lo, hi = max(a - halo, 0), min(b + halo, n)
        return fn(arr[along(lo, hi)])[along(a - lo, b - lo)]

    with ThreadPoolExecutor(workers) as pool:
        return np.concatenate(list(pool.map(part, cuts[:-1], cuts[1:])), axis=axis)


def gaussian(vol: np.ndarray, sigma: float, workers: int | None = None) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter`` with one ``sigma`` for every axis, computed in parts
    over threads (:func:`in_parts`): exactly scipy's values (its default kernel of 4 sigma)."""
    radius = int(4.0 * float(sigma) + 0.5)
    return in_parts(
        lambda v: ndimage.gaussian_filter(v, sigma, radius=radius),
        vol,
        halo=radius,
        workers=workers,
    )


def fill_holes(mask: np.ndarray, axis: int | None = None) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes`` with the 6-neighbourhood, by connected components.

    A background voxel stays background when its 6-connected background component reaches the
    volume's border; every other one is a hole and is filled. ``axis``: fill holes within the
    slices along that axis instead (4-neighbourhood in each slice; only the slices' own borders
    count). The same result as scipy's iterative propagation, about 3x faster on 256^3.
    """
    mask = np.asarray(mask, dtype=bool)
    if axis is not None and not -mask.ndim <= axis < mask.ndim:
        raise ConfigError(f"axis {axis} is out of range for a {mask.ndim}-D mask")
    if mask.size == 0:
        return mask.copy()
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    faces = list(range(mask.ndim))
    if axis is not None:
        axis %= mask.ndim
        index = [slice(None)] * mask.ndim
        index[axis] = [0, 2]
        structure[tuple(index)] = False  # no neighbours across slices
        faces.remove(axis)
    labels, n = ndimage.label(~mask, structure)
    outside = np.zeros(n + 1, dtype=bool)
    for ax in faces:
        for end in (0, -1):
            outside[np.take(labels, end, axis=ax)] = True
    outside[0] = True  # label 0: the mask itself
    return mask | ~outside[labels]


def foreground_mask(
    vol: np.ndarray,
    *,
    sigma: float = 1.0,
    closing: int = 2,
    name: str = "image",
    workers: int | None = None,
) -> np.ndarray:
    """Head (or brain) foreground mask of an MRI volume.

    Steps: Gaussian smoothing (``sigma`` voxels), Otsu threshold of the square-root intensities,
    binary closing (``closing`` iterations of the 6-neighbourhood), hole filling within the
    slices of each axis (which fills every 3-D hole too), and the largest connected component.
    Works on heads with skull (the skull and cerebrospinal fluid inside the scalp are filled)
    and on skull-stripped brains.

    Parameters
    ----------
    vol : 3-D image.
    sigma : smoothing width in voxels (0 disables).
    closing : closing iterations (0 disables).
    name : what the image is, for error messages.
    workers : threads of the local steps (:func:`in_parts`; the result does not depend on it).

    Returns
    -------
    bool array of the shape of ``vol``.

    Raises
    ------
    InputError if the image is not 3-D or is constant.
    """
    vol = np.asarray(vol, dtype=np.float32)
    if vol.ndim != 3:
        raise InputError(f"{name}: expected a 3-D volume, got shape {vol.shape}")
    smooth = gaussian(vol, sigma, workers) if sigma > 0 else vol
    low = smooth.min()
    if not smooth.max() > low:
        raise InputError(f"{name}: the image is constant; no foreground can be found")
    # Otsu on the square root of the intensities: the compression of bright values puts the
    # cut between background and dark tissue (CSF at the edge of a skull-stripped brain, a
    # scalp dimmed by a bias field) yet keeps it well above the noise floor.
    root = smooth - low
    np.sqrt(root, out=root)
    full = root > _otsu(root, workers=workers)
    out = np.zeros(full.shape, dtype=bool)
    box = _bounding_box(full)
    if box is None:
        return out
    # Every step below stays inside the threshold's bounding box (closing with the
    # 6-neighbourhood cannot leave it; background outside it reaches the volume's border), so
    # it runs on the box alone: the same result, less work.
    mask = full[box]
    if closing > 0:
        # dilation and erosion reach `closing` voxels each: parts need twice that around them
        mask = in_parts(
            partial(_closing, iterations=closing), mask, halo=2 * closing, workers=workers
        )
    # Slice by slice (parts along the axis need no neighbours). This fills every 3-D hole as
    # well: a background component that does not reach the volume's border does not reach
    # the border of any slice through it either.
    for axis in range(3):
        mask = in_parts(partial(fill_holes, axis=axis), mask, axis=axis, workers=workers)
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    out[box] = mask
    return out


def _closing(mask: np.ndarray, iterations: int) -> np.ndarray:
    """Binary closing with the 6-neighbourhood, padded so that it does not erode structures
    touching the array's border."""
    pad = iterations
    ball = ndimage.generate_binary_structure(3, 1)
    padded = ndimage.binary_closing(np.pad(mask, pad), structure=ball, iterations=iterations)
    return padded[pad:-pad, pad:-pad, pad:-pad]


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding every True voxel of ``mask`` (None when there is none)."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def roi_bbox(
    mask: np.ndarray,
    margins: tuple[int, int, int] = ROI_MARGINS,
    *,
    name: str = "mask",
) -> tuple[slice, slice, slice]:
    """Bounding box of a mask expanded by ``margins`` voxels per axis, clipped to the volume.

    Parameters
    ----------
    mask : 3-D mask in canonical order (nonzero = inside).
    margins : voxels added on both sides along x (LR), y (AP), z (IS); default (20, 10, 5).
    name : what the mask is, for error messages.

    Returns
    -------
    (slice_x, slice_y, slice_z) with unit steps.

    Raises
    ------
    InputError for a non-3-D or empty mask; ConfigError for negative margins.
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise InputError(f"{name}: expected a 3-D mask, got shape {mask.shape}")
    if len(margins) != 3 or any(int(m) < 0 for m in margins):
        raise ConfigError(f"ROI margins {margins} must be three non-negative voxel counts")
    tight = _bounding_box(mask != 0)
    if tight is None:
        raise InputError(f"{name}: the mask is empty; cannot define a region of interest")
    box = [
        slice(max(b.start - int(m), 0), min(b.stop + int(m), n))
        for b, m, n in zip(tight, margins, mask.shape, strict=True)
    ]
    return (box[0], box[1], box[2])


def crop(vol: Any, bbox: tuple[slice, slice, slice]) -> Any:
    """Crop the last three dimensions of an array (or tensor) to ``bbox`` (a view, no copy)."""
    return vol[(Ellipsis, *bbox)]


def uncrop(
    vol: np.ndarray,
    bbox: tuple[slice, slice, slice],
    shape: tuple[int, int, int],
    fill: float = 0,
) -> np.ndarray:
    """Place a cropped array back into a volume of spatial ``shape`` filled with ``fill``.

    Leading dimensions of ``vol`` are kept: (..., x, y, z) -> (..., *shape).
    """
    vol = np.asarray(vol)
    shape = tuple(int(s) for s in shape)
    want = tuple(len(range(*b.indices(n))) for b, n in zip(bbox, shape, strict=True))
    if vol.shape[-3:] != want or any(b.step not in (None, 1) for b in bbox):
        raise InputError(
            f"cannot uncrop an array of shape {vol.shape} into box {bbox} of a {shape} volume"
        )
    out = np.full((*vol.shape[:-3], *shape), fill, dtype=vol.dtype)
    out[(Ellipsis, *bbox)] = vol
    return out
