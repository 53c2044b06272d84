"""Volume-level denoiser: the hot path of every sampler.

:class:`VolumeDenoiser` turns a 2.5D network into the callable ``denoise(x_t, t, view) ->
x0_hat`` that :mod:`yoda.diffusion.sampling` expects. One call evaluates the network on every
slice of the view for all ``B`` trajectories at once (one function evaluation, NFE):

1. ``x_t`` (B, X, Y, Z) is permuted to the view (B, D, H, W) and padded in-plane (with
   background, -1) to a multiple of the network's ``in_multiple``;
2. slices are processed in batches of ``batch_size`` network inputs (slices of all
   trajectories); each batch gathers its ``x_t`` slabs with ``extract_slabs(index=...)`` (only
   that batch is materialized) and takes the source slabs from a per-view cache;
3. the network output of the centre slices is converted to ``x0_hat`` by
   :func:`yoda.diffusion.schedule.predict_x0` in float32 and written, cropped, straight into
   one preallocated (B, X, Y, Z) output buffer.

Memory: the per-view cache of source slabs holds ``D * S * n * H * W`` values (for a 256^3
volume, two sources and ``n = 5``: 671 MB in float32, half with a 16-bit ``autocast_dtype``),
for each view used. ``cache_cond=False`` keeps only the permuted, padded sources
(``S * D * H * W`` per view) and gathers their slabs per batch instead. A batch needs about
``batch_size * n * (1 + S) * H * W`` input values plus the network's activations.
"""

from __future__ import annotations

import contextlib
from numbers import Integral

import numpy as np
import torch
from torch import nn

from yoda.diffusion.schedule import PREDICTIONS, Schedule, predict_x0
from yoda.errors import ConfigError, InputError
from yoda.volume.views import crop_inplane, extract_slabs, pad_inplane, to_view, view_name

__all__ = ["VolumeDenoiser", "AUTOCAST_DTYPES"]

AUTOCAST_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}

_BACKGROUND = -1.0


def _resolve_autocast(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype.lower() in ("none", "fp32", "float32"):
            return None
        if dtype.lower() not in AUTOCAST_DTYPES:
            raise ConfigError(
                f"unknown autocast dtype {dtype!r}; choose one of {sorted(AUTOCAST_DTYPES)} or None"
            )
        dtype = AUTOCAST_DTYPES[dtype.lower()]
    if dtype == torch.float32:
        return None
    if dtype not in (torch.bfloat16, torch.float16):
        raise ConfigError(f"autocast dtype must be bfloat16 or float16, got {dtype}")
    if device.type == "cpu" and dtype == torch.float16:
        raise ConfigError("autocast float16 is not supported on the CPU; use bf16 or None")
    return dtype


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


class VolumeDenoiser:
    """``denoise(x_t, t, view) -> x0_hat`` over whole volumes with a 2.5D network.

    Parameters
    ----------
    model : Denoiser2p5D
        The network (any module with ``n_slices``, ``n_sources``, ``in_multiple`` and the
        ``forward(x_t_slab, t, cond_slab)`` of :class:`yoda.model.network.Denoiser2p5D`).
        It runs in eval mode during each call (its mode is restored afterwards) and is moved
        to ``device`` if one is given.
    schedule : Schedule
        Noise schedule the model was trained with.
    prediction : {"v", "eps", "x0"}
        What the network predicts.
    cond : Tensor or ndarray (S, X, Y, Z)
        The sources on the network scale ([-1, 1], background -1), in the model's order.
    batch_size : int
        Network inputs (slices of all trajectories) per forward pass.
    autocast_dtype : torch.dtype, str or None
        Run the network under ``torch.autocast`` with this dtype (``bf16``, or ``fp16`` on
        CUDA); ``x0_hat`` is always computed in float32.
    device : torch.device or str, optional
        Where to compute (default: the model's device).
    cache_cond : bool
        Cache the source slabs of each view (fast, ``n`` times the memory of the sources per
        view); ``False`` gathers them per batch from the permuted sources.

    Attributes
    ----------
    nfe : int
        Number of calls so far (whole-volume evaluations, independent of ``B``).
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Schedule,
        prediction: str,
        cond: torch.Tensor | np.ndarray,
        *,
        batch_size: int = 32,
        autocast_dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        cache_cond: bool = True,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ConfigError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.model = model.to(self.device)
        self.schedule = schedule
        self.prediction = prediction
        self.batch_size = int(batch_size)
        self.autocast_dtype = _resolve_autocast(autocast_dtype, self.device)
        self.cache_cond = bool(cache_cond)
        self.n_slices = int(model.n_slices)
        self.multiple = int(model.in_multiple)
        if isinstance(cond, np.ndarray):
            cond = torch.from_numpy(np.ascontiguousarray(cond))
        if not torch.is_tensor(cond) or cond.ndim != 4:
            shape = tuple(cond.shape) if hasattr(cond, "shape") else type(cond).__name__
            raise InputError(f"sources must be an (S, X, Y, Z) array, got {shape}")
        if cond.shape[0] != model.n_sources:
            raise InputError(
                f"the model expects {model.n_sources} source image(s), got {cond.shape[0]}"
            )
        self.cond = cond.detach().to(device=self.device, dtype=torch.float32)
        self.shape = tuple(self.cond.shape[1:])
        self.nfe = 0
        self._cache: dict[str, tuple[torch.Tensor, tuple[int, int, int, int]]] = {}
        # schedule tables made outside inference mode stay usable by autograd elsewhere
        schedule.coefficients(self.device, torch.float32)

    def clear_cache(self) -> None:
        """Drop the cached source slabs (they are rebuilt on demand)."""
        self._cache.clear()

    def _cond_for_view(self, view: str) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """Cached per view: source slabs (D, S*n, H', W') or padded sources (1, S, D, H', W')."""
        entry = self._cache.get(view)
        if entry is None:
            padded, pads = pad_inplane(to_view(self.cond, view), self.multiple, _BACKGROUND)
            padded = padded.unsqueeze(0).contiguous()  # (1, S, D, H', W')
            if self.cache_cond:
                store = extract_slabs(padded, self.n_slices, _BACKGROUND)
                if self.autocast_dtype is not None:
                    # the network's first convolution casts its input to this dtype anyway
                    store = store.to(self.autocast_dtype)
            else:
                store = padded
            entry = (store, pads)
            self._cache[view] = entry
        return entry

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def __call__(self, x_t: torch.Tensor, t: int, view: str) -> torch.Tensor:
        """Estimate x0 from ``x_t`` at timestep ``t`` with slices along ``view``.

        Parameters
        ----------
        x_t : Tensor (B, X, Y, Z) or (X, Y, Z)
            Noisy volumes (B parallel trajectories) on the network scale.
        t : int
            Timestep (0 .. T-1), shared by all trajectories.
        view : {"axial", "coronal", "sagittal"}
            Slicing view.

        Returns
        -------
        Tensor, same shape as ``x_t``, float32 on the denoiser's device
            ``x0_hat`` (not clamped).
        """
        view = view_name(view)
        squeeze = x_t.ndim == 3
        if squeeze:
            x_t = x_t.unsqueeze(0)
        if x_t.ndim != 4 or tuple(x_t.shape[1:]) != self.shape:
            raise InputError(
                f"x_t must be (B, {', '.join(map(str, self.shape))}) like the sources, "
                f"got {tuple(x_t.shape)}"
            )
        if torch.is_tensor(t):
            t = int(t)
        if isinstance(t, bool) or not isinstance(t, Integral) or not 0 <= t < self.schedule.T:
            raise ConfigError(f"timestep must be an int in 0..{self.schedule.T - 1}, got {t!r}")
        t = int(t)
        x_t = x_t.to(device=self.device, dtype=torch.float32)
        out = torch.empty(x_t.shape, dtype=torch.float32, device=self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                self._denoise_into(out, x_t, t, view)
        finally:
            self.model.train(was_training)
        self.nfe += 1
        return out[0] if squeeze else out

    def _denoise_into(self, out: torch.Tensor, x_t: torch.Tensor, t: int, view: str) -> None:
        n = self.n_slices
        cond, pads = self._cond_for_view(view)
        xp, _ = pad_inplane(to_view(x_t, view), self.multiple, _BACKGROUND)
        xp = xp.contiguous()  # (B, D, H', W')
        vols = xp.unsqueeze(1)  # (B, 1, D, H', W')
        n_vol, depth, hp, wp = xp.shape
        out_view = to_view(out, view)  # a permuted view of the output buffer
        per_call = max(1, self.batch_size // n_vol)  # slices per forward pass
        vol_step = min(n_vol, self.batch_size)  # trajectories per forward pass
        steps = torch.full((per_call * vol_step,), t, dtype=torch.long, device=self.device)
        for i0 in range(0, depth, per_call):
            i1 = min(i0 + per_call, depth)
            length = i1 - i0
            index = torch.arange(i0, i1, device=self.device)
            if self.cache_cond:
                cond_slabs = cond[i0:i1]
            else:
                cond_slabs = extract_slabs(cond, n, _BACKGROUND, index)
            for b0 in range(0, n_vol, vol_step):
                b1 = min(b0 + vol_step, n_vol)
                rows = (b1 - b0) * length
                x_slabs = extract_slabs(vols[b0:b1], n, _BACKGROUND, index)
                c_slabs = cond_slabs.repeat(b1 - b0, 1, 1, 1) if b1 - b0 > 1 else cond_slabs
                with self._autocast():
                    raw = self.model(x_slabs, steps[:rows], c_slabs)
                centre = xp[b0:b1, i0:i1].reshape(rows, 1, hp, wp)
                x0 = predict_x0(self.schedule, self.prediction, raw.float(), centre, t)
                out_view[b0:b1, i0:i1] = crop_inplane(x0.reshape(b1 - b0, length, hp, wp), pads)
