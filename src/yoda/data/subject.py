"""One subject's images, as the network sees them: loaded, checked, normalized, ROI-cropped.

Training (the cache) and translation prepare subjects with the same function, so a model
always sees inputs scaled exactly as in training.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from yoda.data import io
from yoda.data.normalize import (
    NORMALIZATIONS,
    ROI_MARGINS,
    Intensity,
    apply_intensity,
    crop,
    fit_intensity,
    foreground_mask,
    roi_bbox,
    to_network,
)
from yoda.device import usable_cpus
from yoda.errors import ConfigError, InputError


def resolve_normalization(
    normalization: str | Mapping[str, Any], names: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per-modality keyword arguments of :func:`yoda.data.normalize.fit_intensity`.

    Parameters
    ----------
    normalization : str or mapping
        A method name ("percentile", "tissue", "ct"), or a mapping with "method", optional
        "percentile" and optional "modalities" (modality -> method overriding the default).
        A modality named "ct" uses the "ct" window unless overridden.
    names : sequence of str
        Modality names to resolve.

    Returns
    -------
    dict
        ``{name: {"method": ..., ["percentile": ...]}}``.
    """
    cfg = {"method": normalization} if isinstance(normalization, str) else dict(normalization)
    unknown = set(cfg) - {"method", "percentile", "modalities"}
    if unknown or "method" not in cfg:
        raise ConfigError(
            f"normalization {normalization!r}: expected a method name or a mapping with "
            "'method' and optional 'percentile', 'modalities'"
        )
    overrides = dict(cfg.get("modalities") or {})
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        method = overrides.get(name, "ct" if name == "ct" else cfg["method"])
        if method not in NORMALIZATIONS:
            raise ConfigError(
                f"normalization {method!r} (for {name}) is not one of {', '.join(NORMALIZATIONS)}"
            )
        kw: dict[str, Any] = {"method": method}
        if method == "percentile":
            kw["percentile"] = float(cfg.get("percentile", 99.9))
        out[name] = kw
    return out


def method_of(normalization: str | Mapping[str, Any], name: str) -> str:
    """The intensity method ``normalization`` gives the modality ``name`` (e.g. "ct" for a
    modality named ct under the default "tissue"); ConfigError as :func:`resolve_normalization`."""
    return resolve_normalization(normalization, [name])[name]["method"]


@dataclass
class PreparedSubject:
    """Images of one subject on the network scale, cropped to the ROI.

    Attributes
    ----------
    data : float32 array (C, x, y, z)
        One channel per name, in the order asked for, on the network scale [-1, 1].
    bbox : tuple of slice
        ROI box within the full canonical volume.
    mask : bool array
        Brain (or automatic foreground) mask on the full canonical grid.
    geometry : io.Geometry
        Grid of the reference image (outputs are written into it).
    intensities : dict
        The fitted :class:`~yoda.data.normalize.Intensity` of each image.
    mask_source : str
        "mask" (given) or "foreground:<reference>" (automatic).
    seconds : float
        Wall time :func:`prepare_subject` took.
    mask_file : str or None
        The given mask's file, where it was given as one.
    resampled : list of str
        The images (and "mask") resampled onto the reference grid.
    """

    data: np.ndarray
    bbox: tuple[slice, slice, slice]
    mask: np.ndarray
    geometry: io.Geometry
    intensities: dict[str, Intensity]
    mask_source: str
    seconds: float = 0.0
    mask_file: str | None = None
    resampled: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Full canonical shape (before cropping)."""
        return tuple(int(s) for s in self.mask.shape)  # type: ignore[return-value]


def prepare_subject(
    images: Mapping[str, Any],
    names: Sequence[str],
    *,
    normalization: str | Mapping[str, Any],
    reference: str | None = None,
    mask: Any = None,
    resample: bool = False,
    margins: Sequence[int] = ROI_MARGINS,
    label: str = "",
) -> PreparedSubject:
    """Load, check, normalize and ROI-crop the images ``names`` of one subject.

    Parameters
    ----------
    images : mapping name -> path, nibabel image or (array, affine)
    names : sequence of str
        Images to prepare, in channel order.
    normalization : str or mapping
        See :func:`resolve_normalization`.
    reference : str, optional
        The image whose grid is kept and whose automatic foreground mask is used when no
        ``mask`` is given (default: the first name).
    mask : path, image or (array, affine), optional
        Brain mask (voxels > 0.5 are inside).
    resample : bool
        Resample images (and mask) on other grids onto the reference grid instead of refusing
        them. Where a resampled image images nothing (outside its field of view) it is
        background, and its intensities are fitted on the mask voxels it covers.
    margins : (x, y, z) voxels
        ROI margins around the mask's bounding box.
    label : str
        Prefix of error messages (e.g. the subject id).

    Raises
    ------
    InputError
        A file cannot be read, an image is constant, the grids differ (without ``resample``)
        or the mask is empty.
    """
    start = time.perf_counter()
    names = list(names)
    reference = reference or names[0]
    prefix = f"{label} " if label else ""
    norm = resolve_normalization(normalization, names)
    arrays: dict[str, np.ndarray] = {}
    geoms: dict[str, io.Geometry] = {}
    wanted = {name: images[name] for name in dict.fromkeys([reference, *names])}
    if mask is not None:
        wanted["mask"] = mask
    # reading, converting and reorienting release the GIL: the images load side by side
    with ThreadPoolExecutor(min(len(wanted), usable_cpus())) as pool:
        loads = {k: pool.submit(io.load_image, src, name=prefix + k) for k, src in wanted.items()}
        for name, load in loads.items():
            arrays[name], geoms[name] = load.result()
            if name == "mask":
                continue
            low, high = float(arrays[name].min()), float(arrays[name].max())
            if not high > low:
                raise InputError(
                    f"{prefix}{name} ({geoms[name].label}): the image is constant (every voxel "
                    f"is {low:.4g}); there is nothing to translate"
                )
    # images resampled onto the reference grid -> the voxels they imaged
    imaged: dict[str, np.ndarray] = {}
    resampled: list[str] = []
    try:
        io.check_same_grid(geoms)
    except InputError:
        if not resample:
            raise
        for name, geom in geoms.items():
            try:
                io.check_same_grid({reference: geoms[reference], name: geom})
                continue
            except InputError:
                pass
            inside = io.field_of_view(geom, geoms[reference])
            order = 0 if name == "mask" else 1
            arrays[name] = io.resample_like(
                arrays[name], geom, geoms[reference], order=order, inside=inside
            )
            resampled.append(name)
            if name == "mask":
                continue
            imaged[name] = inside
            covered = arrays[name][inside]
            if covered.size == 0 or not covered.max() > covered.min():
                raise InputError(
                    f"{prefix}{name} ({geom.label}): resampled onto the grid of "
                    f"{reference}, it is constant; do the images overlap?"
                ) from None
    if mask is None:
        brain = foreground_mask(arrays[reference], name=prefix + reference)
        mask_source = f"foreground:{reference}"
    else:
        brain = arrays["mask"] > 0.5
        mask_source = "mask"
        if not brain.any():
            raise InputError(
                f"{prefix}mask ({geoms['mask'].label}): the mask is empty (no voxel > 0.5)"
            )
    bbox = roi_bbox(brain, tuple(int(m) for m in margins), name=prefix + "mask")
    data = np.empty((len(names), *(b.stop - b.start for b in bbox)), dtype=np.float32)

    def normalize(c: int, name: str) -> Intensity:
        label = f"{prefix}{name} ({geoms[name].label})"
        inside = imaged.get(name)
        within = brain if inside is None else brain & inside
        if not within.any():
            raise InputError(f"{label}: it does not image any voxel of the mask")
        inten = fit_intensity(arrays[name], within, name=label, **norm[name])
        data[c] = to_network(apply_intensity(crop(arrays[name], bbox), inten))
        if inside is not None:  # what the image does not cover is background
            data[c][~crop(inside, bbox)] = -1.0
        return inten

    # one thread per image, as for reading; the first image's error is raised first
    with ThreadPoolExecutor(max(1, min(len(names), usable_cpus()))) as pool:
        intensities = dict(zip(names, pool.map(normalize, range(len(names)), names), strict=True))
    return PreparedSubject(
        data=data,
        bbox=bbox,
        mask=brain,
        geometry=geoms[reference],
        intensities=intensities,
        mask_source=mask_source,
        seconds=time.perf_counter() - start,
        mask_file=str(mask) if isinstance(mask, (str, os.PathLike)) else None,
        resampled=resampled,
    )
