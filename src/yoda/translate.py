"""Translate source volumes into the target contrast with a trained model.

Data flow: inputs (paths, nibabel images or arrays with an affine) -> ``io.load_image``
(canonical orientation, float32, geometry kept) -> co-registration check -> mask and ROI ->
intensity normalization to the network scale -> sampling (regression, diffusion or ExpA) ->
optional slice correction -> un-crop -> ``io.save_image`` in the first source's original grid.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from yoda import __version__
from yoda.atomic import write_text_atomic
from yoda.config import check_seed
from yoda.data import io
from yoda.data.normalize import (
    crop,
    fit_intensity,
    from_network,
    invert_intensity,
    uncrop,
)
from yoda.data.subject import PreparedSubject, prepare_subject
from yoda.device import autocast_dtype, inference_precision, resolve_device
from yoda.diffusion import sampling
from yoda.diffusion.schedule import make_schedule
from yoda.errors import ConfigError, InputError, ModelError
from yoda.model.checkpoint import ModelCard, load_model, weights_sha256
from yoda.model.denoiser import VolumeDenoiser, check_batch_size, compile_network
from yoda.volume.gamma import GAMMA_METHODS, slice_correction
from yoda.volume.views import VIEW_AXIS, VIEWS

MODES = ("regression", "diffusion", "expa")
VIEW_CHOICES = (*VIEWS, "all")
#: Relative difference, on any axis, beyond which a voxel size counts as unlike the training's.
VOXEL_SIZE_TOLERANCE = 0.25


def domain_warnings(
    voxel_size: Sequence[float],
    roi_shape: Sequence[int],
    views: Sequence[str] = VIEWS,
    *,
    trained_voxel_sizes: Sequence[Sequence[float]] = (),
    canvas: Sequence[int] | None = None,
    trained_views: Sequence[str] = (),
) -> list[str]:
    """How an input lies outside what the model saw in training (empty list: nothing).

    Three things are checked: the voxel size (canonical axes, mm) against every training voxel
    size (a model card's ``training.voxel_sizes``), within :data:`VOXEL_SIZE_TOLERANCE` on
    each axis; in each view, the in-plane size of the slices of the ROI (shape in canonical
    axes) against the training slabs' (``canvas``, the card's ``training.slab_size``), beyond
    which the network sees slices larger than any it was trained on; and the views sampled
    against those of training (``training.views``). Unknown training figures are not checked.
    """
    notes = []
    untrained = [v for v in views if trained_views and v not in trained_views]
    if untrained:
        notes.append(
            f"the model was trained on {', '.join(trained_views)} slices only, not on "
            f"{', '.join(untrained)} slices; the output may be unreliable (choose --views "
            f"{trained_views[0]})"
        )
    trained = trained_voxel_sizes
    if trained and not any(
        all(abs(a - b) <= VOXEL_SIZE_TOLERANCE * b for a, b in zip(voxel_size, t, strict=True))
        for t in trained
    ):
        notes.append(
            f"voxel size {_mm(voxel_size)} mm is unlike the model's training data "
            f"({', '.join(_mm(t) for t in trained)} mm); the output may be unreliable"
        )
    if canvas is not None:
        for view in views:
            plane = [int(n) for i, n in enumerate(roi_shape) if i != VIEW_AXIS[view]]
            if plane[0] > canvas[0] or plane[1] > canvas[1]:
                notes.append(
                    f"{view} slices of the brain region ({plane[0]} x {plane[1]} voxels) exceed "
                    f"the model's training slabs ({canvas[0]} x {canvas[1]}); the output may be "
                    "unreliable"
                )
    return notes


def _mm(size: Sequence[float]) -> str:
    return " x ".join(f"{v:.3g}" for v in size)


@dataclass
class Translation:
    """One translated volume and how it was made.

    Attributes
    ----------
    image : np.ndarray
        Canonical (RAS) array on the target's output scale: 0-255 for MRI, HU for CT.
    geometry : io.Geometry
        Grid of the first source: :meth:`save` writes the image back into it.
    info : dict
        Model, mode, NFE, seed, timing, package version (written as the sidecar JSON).
    samples : np.ndarray or None
        ExpA: the individual samples (n_ex, X, Y, Z) on the output scale, when asked for.
    std : np.ndarray or None
        ExpA: the per-voxel standard deviation across samples, when asked for.
    """

    image: np.ndarray
    geometry: io.Geometry
    info: dict[str, Any]
    samples: np.ndarray | None = None
    std: np.ndarray | None = None

    def save(
        self,
        path: str | os.PathLike,
        *,
        dtype: str = "float32",
        overwrite: bool = False,
        sidecar: bool = True,
        extras: bool = False,
    ) -> Path:
        """Write the image in the first source's grid (and a sidecar ``.json``); return the path.

        With ``extras``, the ExpA samples and their per-voxel std are written beside it as
        ``<name>_sample-<k>`` and ``<name>_std`` (when they were kept). Existing files of
        these names are an error unless ``overwrite``, which also removes the samples and std
        of an earlier output of this name that this one does not replace.
        """
        path = Path(path)
        stem, suffix = io.split_image_suffix(path)
        if not suffix:
            raise InputError(f"output {path} must end in {', '.join(io.IMAGE_SUFFIXES)}")
        check_output_dtype(dtype, self.info.get("normalization"))
        extra: dict[Path, tuple[np.ndarray, str]] = {}
        n_saved = len(self.samples) if extras and self.samples is not None else 0
        if n_saved:
            arrays = [(sample, dtype) for sample in self.samples]
            if self.std is not None:
                arrays.append((self.std, "float32"))
            paths = [extra_path(path, f"sample-{k + 1}") for k in range(n_saved)]
            if self.std is not None:
                paths.append(extra_path(path, "std"))
            extra = dict(zip(paths, arrays, strict=True))
        targets = [path, *([io.sidecar_path(path)] if sidecar else []), *extra]
        if not overwrite:
            existing = [p for p in targets if p.exists()]
            if existing:
                raise InputError(f"{existing[0]} exists (overwrite=True replaces it)")
        for out, (array, kind) in extra.items():
            io.save_image(array, self.geometry, out, dtype=kind, overwrite=True)
        io.save_image(self.image, self.geometry, path, dtype=dtype, overwrite=overwrite)
        if sidecar:
            try:
                record = {**self.info, "dtype": dtype, "saved_samples": n_saved}
                write_text_atomic(targets[1], json.dumps(record, indent=2) + "\n")
            except OSError as err:
                path.unlink(missing_ok=True)  # no image without its description
                raise InputError(f"{targets[1]}: cannot write the sidecar: {err}") from None
        if overwrite:  # an earlier output's samples and std that this one does not replace
            k = n_saved
            while (old := extra_path(path, f"sample-{k + 1}")).exists():
                old.unlink(missing_ok=True)
                k += 1
            if extra_path(path, "std") not in extra:
                extra_path(path, "std").unlink(missing_ok=True)
        return path


@contextlib.contextmanager
def _memory_error(mode: str, n_ex: int, shape: Sequence[int]) -> Iterator[None]:
    """Turn a failed allocation while sampling into a one-line :class:`InputError`."""
    try:
        yield
    except (MemoryError, RuntimeError) as err:
        # torch reports a failed allocation as a RuntimeError (OutOfMemoryError on CUDA)
        text = str(err).lower()
        if not isinstance(err, MemoryError) and not any(
            words in text for words in ("out of memory", "can't allocate memory")
        ):
            raise
        what = f"{n_ex} ExpA trajectories" if mode == "expa" else "the volume"
        size = " x ".join(str(n) for n in shape)
        hint = "lower --n-ex or --batch-size" if mode == "expa" else "lower --batch-size"
        raise InputError(f"not enough memory to sample {what} of {size} voxels; {hint}") from None


def extra_path(path: str | os.PathLike, label: str) -> Path:
    """Where :meth:`Translation.save` writes an ExpA sample or their std beside ``path``:
    ``flair.nii.gz`` and ``"sample-1"`` -> ``flair_sample-1.nii.gz``; ``"std"`` ->
    ``flair_std.nii.gz``."""
    path = Path(path)
    stem, suffix = io.split_image_suffix(path)
    return path.with_name(f"{stem}_{label}{suffix}")


def _slice_view(view_names: Sequence[str]) -> str:
    """The view whose slices slice correction homogenizes: the one translated, else axial."""
    return view_names[0] if len(view_names) == 1 else "axial"


def check_output_dtype(dtype: str, normalization: str | None) -> None:
    """Refuse ``uint8`` outputs of a model whose output is in Hounsfield units (``ct``
    normalization): 0..255 cannot hold them."""
    if dtype == "uint8" and normalization == "ct":
        raise ConfigError(
            "uint8 outputs hold 0..255, not the Hounsfield units of a CT model; write float32"
        )


def prepare_sources(
    sources: Mapping[str, Any],
    order: Sequence[str],
    *,
    normalization: str | Mapping[str, Any],
    mask: Any = None,
    resample: bool = False,
) -> PreparedSubject:
    """Load, check and normalize the sources of one subject, exactly as in training.

    Parameters
    ----------
    sources : mapping name -> path, nibabel image or (array, affine)
        Exactly the names in ``order``.
    order : sequence of str
        Source names in the model's channel order.
    normalization : str or mapping
        The model card's intensity normalization (see :mod:`yoda.data.subject`).
    mask : path, image or (array, affine), optional
        Brain mask; default: an automatic foreground mask of the first source.
    resample : bool
        Resample sources (and mask) onto the first source's grid instead of refusing
        differing grids.
    """
    given, wanted = set(sources), list(order)
    if given != set(wanted):
        missing = [n for n in wanted if n not in given]
        extra = sorted(given - set(wanted))
        parts = []
        if missing:
            parts.append("missing " + ", ".join(f"--{n}" for n in missing))
        if extra:
            parts.append("unexpected " + ", ".join(f"--{n}" for n in extra))
        raise InputError(f"the model translates from {', '.join(wanted)}: " + "; ".join(parts))
    return prepare_subject(
        sources, wanted, normalization=normalization, mask=mask, resample=resample
    )


def subject_seed(seed: int, subject_id: str) -> int:
    """A per-subject seed derived from a global seed and the subject id (stable across runs)."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:{subject_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class Translator:
    """A loaded model, ready to translate subjects (the model loads once).

    Use :meth:`load`; then :meth:`translate` as often as needed.

    Speed options (the output is the same; see :class:`yoda.model.denoiser.VolumeDenoiser`):
    ``precision`` ("auto": fp16 on CUDA, fp32 on the CPU; "bf16" or, on CUDA, "fp16" autocast
    are within reduced-precision rounding of "fp32"),
    ``channels_last`` (NHWC network inputs; equal up to float32 rounding), ``flash_attention``
    (fused or plain attention; None keeps the model's setting) and ``compile`` (a
    ``torch.compile`` mode, compiled once per Translator; "reduce-overhead" uses CUDA graphs).
    ``cache_cond`` keeps the source slabs of every view in memory (``n`` times the sources per
    view) instead of gathering them per batch, for a gain under 1 %. ``batch_size``: network
    inputs per call; None chooses by slice size and device
    (:func:`yoda.model.denoiser.auto_batch_size`). ``model_dir`` and ``weights`` ("ema" or
    "raw") only describe where the model came from, for the sidecar.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        card: ModelCard,
        *,
        device: torch.device,
        precision: str = "auto",
        batch_size: int | None = None,
        model_dir: str | None = None,
        weights: str | None = None,
        channels_last: bool = False,
        flash_attention: bool | None = None,
        compile: str | bool | None = None,
        cache_cond: bool = False,
    ) -> None:
        batch_size = check_batch_size(batch_size)
        self.model = model.to(device).eval()
        self.channels_last = bool(channels_last)
        self.flash_attention = flash_attention
        self.cache_cond = bool(cache_cond)
        compiled = compile_network(self.model, compile)
        self.network = self.model if compiled is None else compiled
        self.card = card
        self.device = device
        self.precision = inference_precision(precision, device)
        self.amp_dtype = autocast_dtype(self.precision, device)
        self.batch_size = batch_size
        self.schedule = make_schedule(card.schedule, card.T)
        self.model_dir = model_dir
        self.weights = weights
        # what the card says of the training data (each checked here, at load)
        self.canvas = card.slab_size
        self.voxel_sizes = card.voxel_sizes
        self.trained_views = card.views

    @functools.cached_property
    def weights_sha256(self) -> str:
        """SHA-256 of the network's weights (computed once): what the sidecar identifies the
        model by."""
        return weights_sha256(self.model)

    @classmethod
    def load(
        cls,
        model_dir: str | os.PathLike,
        *,
        device: str | torch.device = "auto",
        precision: str = "auto",
        batch_size: int | None = None,
        weights: str = "ema",
        channels_last: bool = False,
        flash_attention: bool | None = None,
        compile: str | bool | None = None,
        cache_cond: bool = False,
    ) -> Translator:
        """Load a model directory (safetensors + JSON; no code is executed).

        The speed options are those of :class:`Translator`.
        """
        dev = resolve_device(device)
        model, card = load_model(model_dir, device=dev, weights=weights)
        return cls(
            model,
            card,
            device=dev,
            precision=precision,
            batch_size=batch_size,
            model_dir=str(Path(model_dir).resolve()),
            weights=weights,
            channels_last=channels_last,
            flash_attention=flash_attention,
            compile=compile,
            cache_cond=cache_cond,
        )

    @property
    def sources(self) -> list[str]:
        """Source names the model expects, in channel order."""
        return list(self.card.sources)

    def prepare(
        self, sources: Mapping[str, Any], *, mask: Any = None, resample: bool = False
    ) -> PreparedSubject:
        """Load, check and normalize one subject's sources for :meth:`translate`.

        Arguments as for :meth:`translate`. Preparing touches no model state, so it may run in
        another thread while :meth:`translate` samples another subject (cohort translation
        prepares the next subject that way).
        """
        return prepare_sources(
            sources,
            self.card.sources,
            normalization=self.card.normalization,
            mask=mask,
            resample=resample,
        )

    def check_options(
        self,
        *,
        mode: str = "regression",
        n_ex: int = 4,
        views: str | Sequence[str] = "all",
        steps: str | int | None = None,
        slice_correction: str = "none",
        seed: int = 0,
        **_other: Any,
    ) -> dict[str, Any]:
        """Raise :class:`ConfigError` for sampling options :meth:`translate` would refuse
        (arguments as there; its other options are not checked), before any subject is read.

        Returns the sidecar fields these options fix (the weights' SHA-256, target and its
        normalization, mode, views, N_Ex, timesteps, slice correction and its slices): a
        finished output whose sidecar agrees on them (and on the seed) is what
        :meth:`translate` would make.
        """
        view_names, n_total = self._check_options(mode, views, n_ex, slice_correction, steps)
        check_seed(seed)
        return self._settings(mode, view_names, n_ex, n_total, slice_correction)

    def translate(
        self,
        sources: Mapping[str, Any] | PreparedSubject,
        *,
        mode: str = "regression",
        n_ex: int = 4,
        views: str | Sequence[str] = "all",
        steps: str | int | None = None,
        slice_correction: str = "none",
        mask: Any = None,
        seed: int = 0,
        resample: bool = False,
        keep_samples: bool = False,
        progress: Any = None,
    ) -> Translation:
        """Translate one subject.

        Parameters
        ----------
        sources : mapping name -> path, nibabel image or (array, affine), or PreparedSubject
            One entry per source of the model card, or a subject from :meth:`prepare` (which
            then took the ``mask`` and ``resample`` options).
        mode : {"regression", "diffusion", "expa"}
            Regression: one evaluation per view (NFE 1 per view). Diffusion: truncated
            sampling (251 NFE at T=1000) with orthogonal views. ExpA: RMS of ``n_ex``
            diffusion samples (``n_ex`` x 251 NFE), batched.
        n_ex : int
            ExpA samples.
        views : "all", a view name, or a sequence of view names
            Regression: the views predicted and averaged (default all three). Diffusion and
            ExpA: "all" is orthogonal denoising, one view name a fixed view.
        steps : None/"truncated", "full", or an int
            Diffusion timesteps: truncated (default), full, or a preview of k steps evenly
            spaced in log-SNR (:func:`yoda.diffusion.sampling.timesteps_preview`).
        slice_correction : {"none", "gamma", "linear", "simple"}
            Generalized gamma homogenization of adjacent slices (Eq. 12-13): the slices of the
            view translated, axial ones where several views are.
        mask : path, image or (array, affine), optional
            Brain mask (default: automatic foreground mask of the first source).
        seed : int
            Seed of every random draw: the same seed gives the same output.
        resample : bool
            Resample inputs onto the first source's grid instead of refusing differing grids.
        keep_samples : bool
            ExpA: keep the individual samples and their per-voxel std.
        progress : callable, optional
            ``progress(step_index, n_steps)`` after each network evaluation of the volume.
        """
        # before reading anything
        view_names, n_total = self._check_options(mode, views, n_ex, slice_correction, steps)
        seed = check_seed(seed)
        start = time.perf_counter()
        if isinstance(sources, PreparedSubject):
            if mask is not None or resample:
                raise ConfigError("a prepared subject took its mask and resample options already")
            prep = sources
            start -= prep.seconds  # the subject's time includes its preparation
        else:
            prep = self.prepare(sources, mask=mask, resample=resample)
        cond = torch.from_numpy(prep.data).to(self.device)
        denoiser = VolumeDenoiser(
            self.network,
            self.schedule,
            self.card.prediction,
            cond,
            batch_size=self.batch_size,
            autocast_dtype=self.amp_dtype,
            channels_last=self.channels_last,
            flash_attention=self.flash_attention,
            cache_cond=self.cache_cond,
            canvas=self.canvas,
        )
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        shape = tuple(prep.data.shape[1:])
        warnings = domain_warnings(
            prep.geometry.voxel_size,
            shape,
            view_names,
            trained_voxel_sizes=self.voxel_sizes,
            canvas=self.canvas,
            trained_views=self.trained_views,
        )

        def callback(k: int, _t: int, _x0: torch.Tensor) -> None:
            if progress is not None:
                progress(k + 1, n_total)

        common = dict(generator=gen, device=self.device, callback=callback)
        sampling_start = time.perf_counter()
        with _memory_error(mode, n_ex, shape):
            res = self._sample(mode, denoiser, shape, view_names, n_ex, steps, keep_samples, common)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        sampling_seconds = time.perf_counter() - sampling_start
        if not denoiser.all_finite:  # the samplers clamp, which would hide an overflow
            hint = (
                ""
                if self.amp_dtype is None
                else f" in {self.precision}; use precision fp32 (--precision fp32)"
            )
            raise ModelError(f"the network's output has non-finite values{hint}")
        axis = VIEW_AXIS[_slice_view(view_names)]
        out = self._to_output(res.image, prep, slice_correction, axis)
        samples = std = None
        if mode == "expa" and keep_samples and res.samples is not None:
            samples = np.stack([self._to_output(s, prep, "none", axis) for s in res.samples])
            std = samples.std(axis=0).astype(np.float32)
        info = {
            "model": self.model_dir,
            "weights": self.weights,
            "sources": self.card.sources,
            **self._settings(mode, view_names, n_ex, n_total, slice_correction),
            "T": self.schedule.T,
            "nfe": int(res.nfe),
            "seed": int(seed),
            "mask": prep.mask_file or prep.mask_source,
            "resampled": prep.resampled,
            "precision": self.precision,
            "device": str(self.device),
            "seconds": round(time.perf_counter() - start, 3),
            "prepare_seconds": round(prep.seconds, 3),
            "sampling_seconds": round(sampling_seconds, 3),
            "yoda_version": __version__,
            "warnings": warnings,
        }
        return Translation(image=out, geometry=prep.geometry, info=info, samples=samples, std=std)

    # ------------------------------------------------------------------ helpers

    def _sample(
        self,
        mode: str,
        denoiser: VolumeDenoiser,
        shape: tuple[int, ...],
        view_names: Sequence[str],
        n_ex: int,
        steps: Any,
        keep_samples: bool,
        common: dict[str, Any],
    ) -> sampling.SampleResult:
        if mode == "regression":
            return sampling.regression(
                denoiser,
                shape,
                self.schedule,
                views=view_names,
                prediction=self.card.prediction,
                **common,
            )
        if mode == "diffusion":
            return sampling.diffusion(
                denoiser, shape, self.schedule, timesteps=steps, views=view_names, **common
            )
        return sampling.expa(
            denoiser,
            shape,
            self.schedule,
            n_ex=n_ex,
            timesteps=steps,
            views=view_names,
            keep_samples=keep_samples,
            **common,
        )

    def _settings(
        self, mode: str, view_names: Sequence[str], n_ex: int, n_total: int, correction: str
    ) -> dict[str, Any]:
        """The sidecar fields that checked sampling options fix (see :meth:`check_options`);
        ``n_total`` is :meth:`_check_options`' count of evaluations per trajectory."""
        return {
            "weights_sha256": self.weights_sha256,
            "target": self.card.target,
            "normalization": self.card.target_normalization,
            "mode": mode,
            "views": list(view_names),
            "n_ex": n_ex if mode == "expa" else None,
            "timesteps": 1 if mode == "regression" else n_total,  # regression: t = T-1 per view
            "slice_correction": correction,
            "slice_view": None if correction == "none" else _slice_view(view_names),
        }

    def _check_options(
        self, mode: str, views: str | Sequence[str], n_ex: int, correction: str, steps: Any
    ) -> tuple[tuple[str, ...], int]:
        """The views and the network evaluations per trajectory of valid sampling options."""
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if isinstance(views, str):
            if views not in VIEW_CHOICES:
                raise ConfigError(f"views must be one of {', '.join(VIEW_CHOICES)}; got {views!r}")
            view_names = VIEWS if views == "all" else (views,)
        else:
            view_names = tuple(views)
            bad = [v for v in view_names if v not in VIEWS]
            if bad or not view_names:
                raise ConfigError(f"unknown view(s) {bad}; choose from {', '.join(VIEWS)}")
        if isinstance(n_ex, bool) or not isinstance(n_ex, int) or n_ex < 1:
            raise ConfigError(f"n_ex (number of ExpA samples) must be an integer >= 1; got {n_ex}")
        if correction not in GAMMA_METHODS:
            raise ConfigError(
                f"slice correction must be one of {', '.join(GAMMA_METHODS)}; got {correction!r}"
            )
        if mode == "regression":
            sampling.check_regression_allowed(self.card.prediction)
            return view_names, len(view_names)
        return view_names, len(sampling.timesteps_for(self.schedule, steps))

    def _to_output(
        self, image: torch.Tensor, prep: PreparedSubject, correction: str, axis: int
    ) -> np.ndarray:
        x255 = from_network(image.float().clamp(-1.0, 1.0)).cpu().numpy()
        if correction != "none":
            roi_mask = crop(prep.mask, prep.bbox)
            x255 = np.asarray(slice_correction(x255, method=correction, axis=axis, mask=roi_mask))
        x255 = x255.astype(np.float32, copy=False)
        full = uncrop(x255, prep.bbox, prep.geometry.canonical_shape, fill=0.0)
        if self.card.target_normalization == "ct":
            # the CT window is fixed, so the 0-255 scale maps back to Hounsfield units
            full = invert_intensity(full, fit_intensity(full, method="ct"))
        return full.astype(np.float32, copy=False)
