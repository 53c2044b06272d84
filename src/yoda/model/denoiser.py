"""Volume-level denoiser: the hot path of every sampler.

:class:`VolumeDenoiser` turns a 2.5D network into the callable ``denoise(x_t, t, view) ->
x0_hat`` that :mod:`yoda.diffusion.sampling` expects. One call evaluates the network on every
slice of the view for all ``B`` trajectories at once (one function evaluation, NFE):

1. ``x_t`` (B, X, Y, Z) is permuted to the view (B, D, H, W) and padded in-plane (with
   background, -1) to a multiple of the network's ``in_multiple``;
2. slices are processed in batches of ``batch_size`` network inputs (slices of all
   trajectories; by default as many as :func:`auto_batch_size` gives for the slice size and
   device); each batch gathers its ``x_t`` and source slabs with
   ``extract_slabs(index=...)`` (only that batch is materialized);
3. the network output of the centre slices is converted to ``x0_hat`` by
   :func:`yoda.diffusion.schedule.predict_x0` in float32 and written, cropped, straight into
   one preallocated (B, X, Y, Z) output buffer.

Memory: besides the sources, the denoiser keeps the permuted, padded sources of the view in
use (``S * D * H * W`` values) and the (B, X, Y, Z) input and output; a batch needs about
``batch_size * n * (1 + S) * H * W`` input values plus the network's activations.
``cache_cond=True`` instead keeps the source slabs of every view used (``D * S * n * H * W``
values per view: for a 256^3 volume, two sources and ``n = 5``, 671 MB per view in float32,
half with a 16-bit ``autocast_dtype``). Gathering the source slabs per batch costs well under
1 % of the network time, so the cache is off by default.

Options that change how, not what, the network computes (all off by default). On the CPU,
``cache_cond`` and keeping the network's attention setting give bitwise the same ``x0_hat`` as
the plain path; ``channels_last``, switching the attention kernel and ``compile="eager"``
(whose padded last batches change the convolutions' batch size) change the order of float32
sums (differences ~1e-6 on the [-1, 1] scale); a 16-bit ``autocast_dtype`` rounds to its
precision (~1e-2):

- ``autocast_dtype``: bf16 (CPU, CUDA) or fp16 (CUDA) autocast of the network;
- ``channels_last``: network inputs in the channels-last (NHWC) memory format, which the
  convolutions then keep (faster convolutions on GPUs with tensor cores, and with oneDNN on
  many CPUs);
- ``flash_attention``: switch the attention layers between fused
  ``scaled_dot_product_attention`` (True) and the plain einsum path (False) for this
  denoiser's calls; None keeps the network's own setting;
- ``compile``: ``torch.compile`` the network (mode "default", "reduce-overhead" (CUDA graphs on
  GPUs) or "max-autotune"); "eager" and "aot_eager" capture the graph without generating code
  (for checking that the network compiles).

On the CPU the denoiser lets the C allocator reuse the activations' memory from batch to batch
instead of page-faulting it in again (:func:`tune_cpu_allocator`), and gives the free memory
back before a call whose slices differ in size from the previous call's
(:func:`release_cpu_memory`), so that blocks of one size do not pile up as heap fragments.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from numbers import Integral

import numpy as np
import torch
from torch import nn

from yoda.diffusion.schedule import PREDICTIONS, Schedule, predict_x0
from yoda.errors import ConfigError, InputError
from yoda.volume.views import crop_inplane, extract_slabs, pad_inplane, to_view, view_name

__all__ = [
    "VolumeDenoiser",
    "AUTOCAST_DTYPES",
    "AUTO_BATCH_PIXELS",
    "auto_batch_size",
    "call_plan",
    "check_batch_size",
    "COMPILE_MODES",
    "check_compile_option",
    "compile_network",
    "tune_cpu_allocator",
    "release_cpu_memory",
]

AUTOCAST_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}

#: ``compile`` options: torch.compile modes, then debugging backends (no code generation).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "eager", "aot_eager")
_COMPILE_BACKENDS = ("eager", "aot_eager")

_BACKGROUND = -1.0

#: Pixels per network call of the automatic batch size, by device type. On CUDA, 32 slices of
#: 256 x 256: smaller slices go in more rows per call, as a GPU idles on small calls. On the
#: CPU, 8 slices of 256 x 256 and at most 32 slices: larger calls no longer fit the caches.
AUTO_BATCH_PIXELS = {"cuda": 32 * 256 * 256, "cpu": 8 * 256 * 256}
_AUTO_BATCH_MAX_CPU = 32
#: A compiled network's calls on a view shorter than the batch hold a multiple of this many
#: slices (each input shape compiles once; few shapes, little padding).
_COMPILED_SLICE_STEP = 32


def check_batch_size(batch_size: object) -> int | None:
    """``batch_size`` as an int, or None (automatic); anything else is a ConfigError."""
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer or None, got {batch_size!r}")
    return int(batch_size)


def auto_batch_size(device: torch.device | str, height: int, width: int) -> int:
    """Network inputs per call for slices of ``height`` x ``width`` on ``device``.

    A pixel budget (:data:`AUTO_BATCH_PIXELS`), so memory is bounded whatever the slice size.
    Measured with ``small`` in fp16 on an H100 (ms per slice at 32 / 128 slices per call:
    0.71 / 0.28 at 64^2, 1.11 / 0.84 at 128^2; flat from 16 slices at 256^2; calls of more
    than 128 slices, as 64^2 slices get, not timed) and with ``tiny`` on a 2-core CPU (8 / 32
    slices of 256^2: 119 / 140 ms per slice; 32 / 128 / 512 slices of 64^2: 5.9 / 6.1 / 9.2 ms).
    """
    kind = torch.device(device).type
    rows = AUTO_BATCH_PIXELS.get(kind, AUTO_BATCH_PIXELS["cpu"]) // max(1, height * width)
    if kind != "cuda":
        rows = min(rows, _AUTO_BATCH_MAX_CPU)
    return max(1, rows)


def call_plan(
    batch_size: int | None,
    device: torch.device | str,
    n_vol: int,
    depth: int,
    height: int,
    width: int,
    compiled: bool = False,
) -> tuple[int, int]:
    """How a view of ``n_vol`` volumes of ``depth`` slices of ``height`` x ``width`` is cut
    into network calls: (slices per call, volumes per call).

    A call holds ``batch_size`` inputs at most (None: :func:`auto_batch_size`). More volumes
    than a batch are split into groups that differ by one at most. A compiled network gets
    every call of the view padded to ``slices x volumes`` rows; on a view shorter than the
    batch, its calls are even and hold a multiple of 32 slices, so views whose depths differ a
    little share one input shape.
    """
    batch = batch_size or auto_batch_size(device, height, width)
    per_call = max(1, batch // n_vol)
    groups = -(-n_vol // batch)
    vol_step = -(-n_vol // groups)
    if compiled:
        calls = -(-depth // per_call)
        even = -(-depth // calls)
        per_call = min(per_call, -(-even // _COMPILED_SLICE_STEP) * _COMPILED_SLICE_STEP)
    return per_call, vol_step


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


_ALLOCATOR: dict[str, object] = {}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)


def tune_cpu_allocator(limit: int = 1 << 30) -> bool:
    """Let the C allocator reuse freed blocks up to ``limit`` bytes (glibc; once per process).

    By default glibc hands freed blocks above 32 MB back to the system at once, so every
    network call on large slices page-faults its activations in afresh: on a 2-core CPU a
    third of the time of a batch of 32 slices of 128^2 went to the kernel, and the time per
    voxel grew with the slice size. Raising ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD``
    keeps such blocks in the process for the next batch. :class:`VolumeDenoiser` gives the
    free memory back when the slice size changes (:func:`release_cpu_memory`), so a
    volume's views, whose slices differ in size, do not pile up heap fragments. Results are
    unchanged; the peak resident memory can be higher than with ``system`` (measured for a
    256^3 regression with ``tiny``, batch 32: 2.9 GB against 2.2 GB) for ~30 % less time.

    Called by :class:`VolumeDenoiser` and training on the CPU. The environment variable
    ``YODA_CPU_ALLOCATOR`` chooses: ``system`` leaves the allocator alone; ``keep`` never
    gives free memory back (fastest, but the resident memory grows to the heap's high-water
    mark); anything else (default) is the behaviour above.

    Returns
    -------
    bool
        True when the thresholds are set (now or by an earlier call), False elsewhere (other
        C libraries, or turned off).
    """
    if "done" in _ALLOCATOR:
        return bool(_ALLOCATOR["done"])
    ok = False
    mode = os.environ.get("YODA_CPU_ALLOCATOR", "").strip().lower()
    if mode != "system":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt, trim = libc.mallopt, libc.malloc_trim
        except (OSError, AttributeError):
            mallopt = trim = None
        if mallopt is not None:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
            for value in (int(limit), 32 << 20):  # older glibc caps the mmap threshold
                if mallopt(_M_MMAP_THRESHOLD, value) == 1:
                    ok = mallopt(_M_TRIM_THRESHOLD, value) == 1
                    break
            if ok and mode != "keep":
                _ALLOCATOR["trim"] = trim
    _ALLOCATOR["done"] = ok
    return ok


def release_cpu_memory() -> None:
    """Give the C heap's free memory back to the system (after :func:`tune_cpu_allocator`)."""
    trim = _ALLOCATOR.get("trim")
    if trim is not None:
        trim(0)


def check_compile_option(option: str | bool | None) -> str | None:
    """The ``COMPILE_MODES`` mode a compile option names (None: no compilation; True: default).

    Raises ConfigError for anything else, before any network is built.
    """
    if option is None or option is False:
        return None
    if option is True:
        return "default"
    if option not in COMPILE_MODES:
        raise ConfigError(f"unknown compile option {option!r}; choose one of {COMPILE_MODES}")
    return option


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is a ``torch.compile`` wrapper (given compiled or compiled here)."""
    return hasattr(model, "_orig_mod")


def compile_network(model: nn.Module, option: str | bool | None) -> nn.Module | None:
    """``torch.compile`` a network for inference with a ``COMPILE_MODES`` option.

    Returns None for ``None``/``False`` (no compilation); ``True`` means "default". The result
    keeps the network's attributes (``n_slices``, ``in_multiple``, ...), so it can be given to
    :class:`VolumeDenoiser` in place of the network (compiled code is then reused across
    denoisers).
    """
    option = check_compile_option(option)
    if option is None:
        return None
    # static shapes: a volume's slices come in one batch shape per view (the denoiser pads
    # the last batch), while a dynamic-shape recompilation of the network can take minutes
    if option in _COMPILE_BACKENDS:
        return torch.compile(model, backend=option, dynamic=False)
    return torch.compile(model, mode=option, dynamic=False)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with zero rows appended up to ``rows`` (the network treats rows independently)."""
    return torch.cat([x, x.new_zeros((rows - len(x), *x.shape[1:]))])


@contextlib.contextmanager
def _attention_setting(model: nn.Module, flash: bool | None):
    """Temporarily set ``use_flash_attention`` of every attention block of ``model``."""
    if flash is None:
        yield
        return
    blocks = [
        m for m in model.modules() if isinstance(getattr(m, "use_flash_attention", None), bool)
    ]
    before = [m.use_flash_attention for m in blocks]
    try:
        for m in blocks:
            m.use_flash_attention = flash
        yield
    finally:
        for m, value in zip(blocks, before, strict=True):
            m.use_flash_attention = value


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
    batch_size : int, optional
        Network inputs (slices of all trajectories) per forward pass; None (default) chooses
        by slice size and device (:func:`auto_batch_size`).
    autocast_dtype : torch.dtype, str or None
        Run the network under ``torch.autocast`` with this dtype (``bf16``, or ``fp16`` on
        CUDA); ``x0_hat`` is always computed in float32.
    device : torch.device or str, optional
        Where to compute (default: the model's device).
    cache_cond : bool
        Cache the source slabs of each view used (``n`` times the memory of the sources per
        view, for a gain under 1 %); the default ``False`` gathers them per batch from the
        permuted sources of the current view.
    channels_last : bool
        Feed the network channels-last (NHWC) inputs.
    flash_attention : bool, optional
        Fused (True) or plain (False) attention during this denoiser's calls; None keeps the
        network's setting.
    compile : str or bool, optional
        ``torch.compile`` the network with this mode (see ``COMPILE_MODES``; True is
        "default"). Compiling takes a while at the first call of each input shape; the last,
        partial batch of each view is then padded with empty inputs to the full batch, so a
        view has one input shape (its in-plane size, set by the volume and ``canvas``; a view
        shorter than the batch, its depth rounded up to 32 slices: :func:`call_plan`).
    canvas : (H, W), optional
        The in-plane size of the training slabs (a model card's ``training.slab_size``).
        Slices are centred on a canvas at least this large and padded with background, as
        they were in training; the network's statistics depend on that surrounding
        (GroupNorm), so a model sees its training conditions. Default: pad only to the
        network's input multiple.

    Attributes
    ----------
    nfe : int
        Number of calls so far (whole-volume evaluations, independent of ``B``).
    all_finite : bool
        Whether every ``x0_hat`` so far was finite (False after a network overflow; checked
        once asked, so sampling does not wait on the device).
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Schedule,
        prediction: str,
        cond: torch.Tensor | np.ndarray,
        *,
        batch_size: int | None = None,
        autocast_dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        cache_cond: bool = False,
        channels_last: bool = False,
        flash_attention: bool | None = None,
        compile: str | bool | None = None,
        canvas: tuple[int, int] | None = None,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ConfigError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
        batch_size = check_batch_size(batch_size)
        self.device = torch.device(device) if device is not None else _model_device(model)
        if self.device.type == "cpu":
            tune_cpu_allocator()
        self.model = model.to(self.device)
        self.schedule = schedule
        self.prediction = prediction
        self.batch_size = batch_size
        self.autocast_dtype = _resolve_autocast(autocast_dtype, self.device)
        self.cache_cond = bool(cache_cond)
        self.channels_last = bool(channels_last)
        if flash_attention is not None and not isinstance(flash_attention, bool):
            raise ConfigError(
                f"flash_attention must be True, False or None, got {flash_attention!r}"
            )
        self.flash_attention = flash_attention
        compiled = compile_network(self.model, compile)
        self._net = self.model if compiled is None else compiled
        self.compile = compile
        self.n_slices = int(model.n_slices)
        self.multiple = int(model.in_multiple)
        if canvas is not None:
            canvas = tuple(canvas)
            if len(canvas) != 2 or not all(
                isinstance(v, Integral) and not isinstance(v, bool) and v >= 1 for v in canvas
            ):
                raise ConfigError(f"canvas must be two positive integers (H, W), got {canvas!r}")
            canvas = (int(canvas[0]), int(canvas[1]))
        self.canvas = canvas
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
        self._finite = torch.ones((), dtype=torch.bool, device=self.device)
        self._cache: dict[str, tuple[torch.Tensor, tuple[int, int, int, int]]] = {}
        # schedule tables made outside inference mode stay usable by autograd elsewhere
        schedule.coefficients(self.device, torch.float32)

    def clear_cache(self) -> None:
        """Drop the cached source slabs (they are rebuilt on demand)."""
        self._cache.clear()

    def _cond_for_view(self, view: str) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """Source slabs (D, S*n, H', W') of every view, or padded sources (1, S, D, H', W')
        of the current view only (``cache_cond=False``)."""
        entry = self._cache.get(view)
        if entry is None:
            if not self.cache_cond:
                self._cache.clear()  # free the previous view's sources before the next ones
            padded, pads = pad_inplane(
                to_view(self.cond, view), self.multiple, _BACKGROUND, self.canvas
            )
            padded = padded.unsqueeze(0).contiguous()  # (1, S, D, H', W')
            if self.cache_cond:
                store = extract_slabs(padded, self.n_slices, _BACKGROUND)
                if self.autocast_dtype is not None:
                    # the network's first convolution casts its input to this dtype anyway
                    store = store.to(self.autocast_dtype)
                if self.channels_last:
                    store = store.contiguous(memory_format=torch.channels_last)
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
        if self.device.type == "cpu":
            # batches of another size than the process's last ones would not fit the freed
            # blocks (the heap is the process's: the next volume of the same size reuses them)
            batch_shape = (x_t.shape[0], *to_view(x_t, view).shape[2:])
            if batch_shape != _ALLOCATOR.get("last_batch_shape"):
                release_cpu_memory()
            _ALLOCATOR["last_batch_shape"] = batch_shape
        out = torch.empty(x_t.shape, dtype=torch.float32, device=self.device)
        # eval mode for the call, then each module's own mode back; only the modules in
        # training mode are switched (Module.train/eval would recurse over all, twice)
        training = [m for m in self.model.modules() if m.training]
        for m in training:
            m.training = False
        try:
            with torch.inference_mode(), _attention_setting(self.model, self.flash_attention):
                self._denoise_into(out, x_t, t, view)
        finally:
            for m in training:
                m.training = True
        self.nfe += 1
        self._finite = self._finite & torch.isfinite(out).all()
        return out[0] if squeeze else out

    @property
    def all_finite(self) -> bool:
        """Whether every ``x0_hat`` so far was finite (see the class docstring)."""
        return bool(self._finite)

    def _denoise_into(self, out: torch.Tensor, x_t: torch.Tensor, t: int, view: str) -> None:
        n = self.n_slices
        cond, pads = self._cond_for_view(view)
        xp, _ = pad_inplane(to_view(x_t, view), self.multiple, _BACKGROUND, self.canvas)
        xp = xp.contiguous()  # (B, D, H', W')
        vols = xp.unsqueeze(1)  # (B, 1, D, H', W')
        n_vol, depth, hp, wp = xp.shape
        out_view = to_view(out, view)  # a permuted view of the output buffer
        one_shape = is_compiled(self._net)  # compiled: every batch of the view as large
        per_call, vol_step = call_plan(
            self.batch_size, self.device, n_vol, depth, hp, wp, compiled=one_shape
        )
        full = per_call * vol_step
        steps = torch.full((full,), t, dtype=torch.long, device=self.device)
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
                if one_shape and rows < full:
                    x_slabs, c_slabs = _pad_rows(x_slabs, full), _pad_rows(c_slabs, full)
                if self.channels_last:
                    x_slabs = x_slabs.contiguous(memory_format=torch.channels_last)
                    c_slabs = c_slabs.contiguous(memory_format=torch.channels_last)
                with self._autocast():
                    raw = self._net(x_slabs, steps[: len(x_slabs)], c_slabs)[:rows]
                centre = xp[b0:b1, i0:i1].reshape(rows, 1, hp, wp)
                x0 = predict_x0(self.schedule, self.prediction, raw.float(), centre, t)
                out_view[b0:b1, i0:i1] = crop_inplane(x0.reshape(b1 - b0, length, hp, wp), pads)
