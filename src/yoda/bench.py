"""Performance figures of YODA, measured as ratios within one run (``yoda bench``).

Absolute times depend on the machine and on whatever else runs on it; ratios of two timings
taken in the same process, interleaved (A, B, B, A, ...) and each summarized by its minimum,
are far more stable. Every figure below is such a ratio; absolute times are reported beside
them for information.

Figures (targets on a 2-core CPU in brackets):

``network_efficiency``
    FLOP rate the denoiser achieves during regression sampling of a volume (FLOPs counted with
    ``torch.utils.flop_counter.FlopCounterMode``) divided by the rate of a large dense matmul
    (2048^2 fp32 on the CPU, 8192^2 bf16 on CUDA) measured in the same run (as high as the
    hardware allows).
``translate_overhead``
    ``Translator.translate`` + ``Translation.save`` of a regression volume (NIfTI in, NIfTI
    out) divided by the pure network time of the same slices: the same network calls, batch
    and slab sizes, on pre-built input tensors (<= 1.10).
``expa_batching``
    ExpA with N_Ex = 4 trajectories run as one batch divided by 4 x one diffusion trajectory
    over the same preview timesteps (<= 0.9).
``train_step_overhead``
    A full training step (slabs from the sampler over a prepared cache, noising, forward,
    backward, optimizer, EMA) divided by forward + backward on the same batch (<= 1.15).
``loader_headroom``
    Slabs per second the data pipeline (sampler + collate) delivers divided by the slabs per
    second training consumes (>= 5).
``peak_memory_translate_mb``
    Peak memory of translating a 256^3 volume with the benched preset: the peak resident set
    of a fresh process (``VmHWM``) above its level after loading the model on the CPU;
    ``torch.cuda.max_memory_allocated`` on CUDA.
``peak_memory_forward_small_mb``
    Peak memory of one forward batch of the ``small`` network at the default batch size
    (CUDA); on the CPU a reduced batch, said in the notes.
``per_voxel_cost_ratio``
    Regression sampling time per voxel at 64^3, 128^3 and 256^3 (one view): max / min. The
    sampler itself adds a constant cost per slice; what remains is the network's own growth in
    FLOPs per pixel (its attention is quadratic in the pixels of the coarsest level), shown
    separately by ``per_flop_cost_ratio`` (time per FLOP, max / min).

``channels_last_speedup``, ``bf16_speedup``, ``compile_speedup``
    Regression time of the plain network divided by that with channels-last inputs, bf16
    autocast, or ``torch.compile`` (only with ``compile=MODE``); the largest output
    difference of each is in ``details["option_max_abs_diff"]``.

Absolute figures: seconds per volume for regression, truncated diffusion and ExpA, both for
the regression ROI of the efficiency measurement and for the ``memory_volume`` grid (256^3),
where the GPU targets apply (``GPU_VOLUME_TARGETS``: the ``small`` preset on an H100).
Translation options (``precision``, ``channels_last``, ``compile``) apply to every end-to-end
translation (overhead, memory, seconds per volume) and to ExpA batching. The per-slice cost
runs the uncompiled network with the same precision and channels-last setting;
``network_efficiency`` measures the plain network (the benched precision, neither
channels-last nor compiled), the reference of the speedup figures.

``size="tiny"`` (``--quick``) runs every measurement on small volumes in seconds; its figures
show that everything runs, not what the hardware does.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.deterministic

from yoda import __version__
from yoda.atomic import can_create
from yoda.errors import ConfigError, InputError

__all__ = [
    "run_bench",
    "format_report",
    "FIGURES",
    "TARGETS",
    "GPU_VOLUME_TARGETS",
    "SIZES",
    "synthetic_head",
]

#: Figures reported by :func:`run_bench` (``result["figures"]``), in table order.
FIGURES = (
    "network_efficiency",
    "translate_overhead",
    "expa_batching",
    "train_step_overhead",
    "loader_headroom",
    "peak_memory_translate_mb",
    "peak_memory_forward_small_mb",
    "per_voxel_cost_ratio",
    "per_flop_cost_ratio",
    "channels_last_speedup",
    "bf16_speedup",
    "compile_speedup",
)

#: Targets for the figures that have one: (comparison, value).
TARGETS = {
    "translate_overhead": ("<=", 1.10),
    "expa_batching": ("<=", 0.90),
    "train_step_overhead": ("<=", 1.15),
    "loader_headroom": (">=", 5.0),
}

#: Seconds per ``memory_volume`` grid (256^3) on an H100 with the ``small`` preset, all three
#: views: regression measured, truncated diffusion extrapolated from its time per NFE.
GPU_VOLUME_TARGETS = {"regression": 2.0, "diffusion": 180.0}

#: Problem sizes. ``volume``: edge of the regression volume (the ROI crop makes it smaller);
#: ``scaling``: cube edges of the per-slice cost; ``memory_volume``: edge of the volume whose
#: translation is measured for memory; ``small_batch_cpu``/``small_size``: the ``small``
#: forward on the CPU; ``repeats``: interleaved repetitions of each paired timing.
SIZES: dict[str, dict[str, Any]] = {
    "default": {
        "volume": 64,
        "expa_steps": 5,
        "n_ex": 4,
        "train_volume": 64,
        "train_subjects": 3,
        "train_batch": 16,
        "train_repeats": 4,
        "loader_batches": 20,
        "scaling": (64, 128, 256),
        "memory_volume": 256,
        "small_size": 256,
        "small_batch_cpu": 2,
        "matmul_cpu": 2048,
        "matmul_cuda": 8192,
        "repeats": 2,
        "expa_repeats": 2,
    },
    "tiny": {
        "volume": 24,
        "expa_steps": 3,
        "n_ex": 4,
        "train_volume": 24,
        "train_subjects": 2,
        "train_batch": 4,
        "train_repeats": 2,
        "loader_batches": 4,
        "scaling": (16, 32, 64),
        "memory_volume": 32,
        "small_size": 32,
        "small_batch_cpu": 1,
        "matmul_cpu": 512,
        "matmul_cuda": 2048,
        "repeats": 1,
        "expa_repeats": 1,
    },
}

#: Function evaluations per volume as in the paper (T = 1000, truncated at T/4, N_Ex = 4).
PAPER_NFE = {"regression": 3, "diffusion": 251, "expa": 4 * 251}

_SOURCES = ("t1w", "t2w")
_TARGET = "flair"
# tissue intensities (wm, gm, csf, scalp) of the synthetic head per contrast
_LEVELS = {
    "t1w": (110.0, 70.0, 30.0, 90.0),
    "t2w": (60.0, 80.0, 150.0, 50.0),
    "flair": (70.0, 90.0, 20.0, 60.0),
}


# ------------------------------------------------------------------------------- helpers


def _log(progress: bool, text: str) -> None:
    if progress:
        print(f"bench: {text}", file=sys.stderr, flush=True)


class _Clock:
    """Wall-clock timing of a callable, synchronizing CUDA around it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], Any]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start


def _paired(clock: _Clock, fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Minimum time of each callable over ``repeats`` interleaved rounds (order alternates)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(max(1, repeats)):
        for name in names if r % 2 == 0 else names[::-1]:
            gc.collect()
            times[name].append(clock(fns[name]))
    return {k: min(v) for k, v in times.items()}


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b > 0:
        return None
    return float(a) / float(b)


def _round(x: Any, digits: int = 4) -> Any:
    if isinstance(x, float):
        return float(f"{x:.{digits}g}") if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _round(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v, digits) for v in x]
    return x


# ------------------------------------------------------------------------- test data


def synthetic_head(size: int | Sequence[int], seed: int = 0) -> dict[str, np.ndarray]:
    """A synthetic head volume per contrast (t1w, t2w, flair), float32, non-negative.

    An ellipsoidal head (scalp, CSF rim, gray and white matter from a smooth pattern) filling
    about 70-85 % of each axis, with a smooth bias field and Rician-like noise. Only the
    geometry and intensity ranges matter for benchmarking.
    """
    shape = (int(size),) * 3 if np.isscalar(size) else tuple(int(s) for s in size)
    rng = np.random.default_rng(seed)
    axes = [((np.arange(s, dtype=np.float32) + 0.5) / s - 0.5) for s in shape]
    radii = (0.34, 0.42, 0.40)
    r2 = sum(
        (a / r).reshape([-1 if k == i else 1 for k in range(3)]) ** 2
        for i, (a, r) in enumerate(zip(axes, radii, strict=True))
    )
    phases = rng.uniform(0, 2 * np.pi, 3)
    freqs = (3.0, 2.0, 2.5)
    pattern = np.ones(shape, dtype=np.float32)
    for i, (a, f, ph) in enumerate(zip(axes, freqs, phases, strict=True)):
        pattern = pattern * np.sin(2 * np.pi * f * a + ph).reshape(
            [-1 if k == i else 1 for k in range(3)]
        ).astype(np.float32)
    brain = r2 <= 0.72**2
    wm = brain & (pattern > 0.05)
    gm = brain & ~wm
    csf = (r2 <= 0.85**2) & ~brain
    scalp = (r2 <= 1.0) & ~brain & ~csf
    bias = (1.0 + 0.15 * axes[0].reshape(-1, 1, 1) - 0.1 * axes[2].reshape(1, 1, -1)).astype(
        np.float32
    )
    out = {}
    for name in (*_SOURCES, _TARGET):
        lw, lg, lc, ls = _LEVELS[name]
        vol = (wm * lw + gm * lg + csf * lc + scalp * ls).astype(np.float32) * bias
        noise = rng.standard_normal((2, *shape), dtype=np.float32) * 3.0
        out[name] = np.sqrt((vol + noise[0]) ** 2 + noise[1] ** 2).astype(np.float32)
    return out


def _write_subject(folder: Path, size: int, seed: int, suffix: str = ".nii.gz") -> dict[str, Path]:
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    voxel = 256.0 / size
    affine = np.diag([voxel, voxel, voxel, 1.0])
    paths = {}
    for name, vol in synthetic_head(size, seed).items():
        path = folder / f"{name}{suffix}"
        nib.Nifti1Image(vol, affine).to_filename(path)
        paths[name] = path
    return paths


def random_network(preset: str, seed: int = 0) -> torch.nn.Module:
    """A network of ``preset`` with random weights (every weight non-zero)."""
    from yoda.model.network import Denoiser2p5D, NetworkConfig

    torch.manual_seed(seed)
    net = Denoiser2p5D(NetworkConfig.from_preset(preset), n_slices=5, n_sources=len(_SOURCES))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():  # MONAI starts some output convolutions at zero
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return net.eval()


def _write_model(folder: Path, preset: str, training: dict[str, Any] | None = None) -> Path:
    """A model directory of ``preset`` with random weights (``training``: the card's entry)."""
    from yoda.model.checkpoint import ModelCard, save_model

    net = random_network(preset)
    card = ModelCard(
        sources=list(_SOURCES),
        target=_TARGET,
        network=net.net_cfg.to_dict(),
        n_slices=5,
        schedule="linear",
        T=1000,
        prediction="v",
        normalization={"method": "tissue"},
        training=training or {"note": "random weights, written by yoda bench"},
    )
    return save_model(folder, net, None, card)


# ------------------------------------------------------------------------------ FLOPs


def _sdpa_flops(
    query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any
) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _flop_counter() -> Any:
    """A FlopCounterMode that also counts the CPU kernel of fused attention."""
    from torch.utils import flop_counter

    extra = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None and cpu_sdpa not in flop_counter.flop_registry:
        extra[cpu_sdpa] = _sdpa_flops
    return flop_counter.FlopCounterMode(display=False, custom_mapping=extra)


def _flops_per_slice(model: torch.nn.Module, hw: tuple[int, int], device: torch.device) -> int:
    """FLOPs of one network evaluation of a one-slice batch of in-plane size ``hw``.

    Every counted operation (convolutions, matrix products, attention) is linear in the batch
    size, so a batch of ``k`` slices costs exactly ``k`` times this.
    """
    n, s = model.n_slices, model.n_sources
    x = torch.zeros((1, n, *hw), device=device)
    c = torch.zeros((1, n * s, *hw), device=device)
    t = torch.full((1,), 999, dtype=torch.long, device=device)
    counter = _flop_counter()
    with torch.inference_mode(), counter:
        model(x, t, c)
    return int(counter.get_total_flops())


def _view_shapes(shape: Sequence[int], multiple: int) -> dict[str, tuple[int, int, int]]:
    """(depth, padded H, padded W) of a canonical volume shape in each view."""
    from yoda.volume.views import VIEWS, to_view

    out = {}
    probe = torch.empty(tuple(shape), device="meta")
    for view in VIEWS:
        d, h, w = to_view(probe, view).shape
        out[view] = (d, -(-h // multiple) * multiple, -(-w // multiple) * multiple)
    return out


def _matmul_rate(clock: _Clock, device: torch.device, n: int, repeats: int) -> float:
    """FLOP/s of an n x n matrix product (fp32 on the CPU, bf16 on CUDA)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn((n, n), generator=gen, device=device, dtype=dtype)
    b = torch.randn((n, n), generator=gen, device=device, dtype=dtype)
    reps = 10 if device.type == "cuda" else 1

    def mm() -> None:
        for _ in range(reps):
            torch.mm(a, b)

    mm()
    best = min(clock(mm) for _ in range(max(2, repeats)))
    return 2.0 * n**3 * reps / best


# ----------------------------------------------------------------------------- memory


def _rss_mb(field: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return None


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident set (Linux >= 4.0); False where impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _child_main(task_json: str) -> None:
    """Entry point of the memory-measuring child process (JSON task in, one JSON line out)."""
    task = json.loads(task_json)
    torch.set_num_threads(int(task["threads"]))
    out: dict[str, Any] = {}
    if task["kind"] == "translate":
        from yoda.translate import Translator

        tr = Translator.load(
            task["model"],
            device="cpu",
            batch_size=task["batch_size"],
            precision=task["precision"],
            channels_last=bool(task.get("channels_last", False)),
            compile=task.get("compile"),
            cache_cond=bool(task.get("cache_cond", False)),
        )
        gc.collect()
        base = _rss_mb("VmRSS")
        if task.get("compile"):
            # compile first, so that the times are those of a warm run; the peak still counts
            # from the level after loading (the heap keeps what the first run freed)
            tr.translate(task["sources"], mode="regression")
        out["reset"] = _reset_peak_rss()
        stamps: list[float] = []
        start = time.perf_counter()
        res = tr.translate(
            task["sources"],
            mode="regression",
            progress=lambda k, n: stamps.append(time.perf_counter()),
        )
        res.save(task["out"], overwrite=True)
        out["seconds"] = time.perf_counter() - start
        out["view_seconds"] = list(np.diff([start, *stamps]))
        out["sampling_seconds"], out["nfe"] = res.info["sampling_seconds"], res.info["nfe"]
    else:
        from yoda.model.network import Denoiser2p5D

        net = Denoiser2p5D("small", n_slices=5, n_sources=len(_SOURCES)).eval()
        b, hw = int(task["batch"]), int(task["size"])
        x = torch.randn(b, 5, hw, hw)
        c = torch.randn(b, 5 * len(_SOURCES), hw, hw)
        t = torch.full((b,), 999, dtype=torch.long)
        gc.collect()
        base = _rss_mb("VmRSS")
        out["reset"] = _reset_peak_rss()
        start = time.perf_counter()
        with torch.inference_mode():
            net(x, t, c)
        out["seconds"] = time.perf_counter() - start
    peak = _rss_mb("VmHWM")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["sys_s"], out["page_faults"] = usage.ru_stime, usage.ru_minflt
    out["base_mb"], out["peak_mb"] = base, peak
    out["delta_mb"] = None if base is None or peak is None else peak - base
    print("YODA-BENCH-RESULT " + json.dumps(out), flush=True)


def _start_child(task: dict[str, Any]) -> subprocess.Popen:
    """Start a fresh Python process running :func:`_child_main` on ``task``."""
    code = "import sys; from yoda.bench import _child_main; _child_main(sys.argv[1])"
    return subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(task)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish_child(proc: subprocess.Popen, timeout: float = 3600.0) -> dict[str, Any]:
    """Wait for a child of :func:`_start_child`; its result, or RuntimeError."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    for line in stdout.splitlines():
        if line.startswith("YODA-BENCH-RESULT "):
            return json.loads(line.split(" ", 1)[1])
    tail = (stderr or stdout).strip().splitlines()[-1:] or ["no output"]
    raise RuntimeError(f"memory measurement failed (exit {proc.returncode}): {tail[0]}")


# ---------------------------------------------------------------------------- benches


class _Bench:
    def __init__(
        self,
        device: torch.device,
        preset: str,
        size: str,
        precision: str,
        batch_size: int | None,
        progress: bool,
        workdir: Path,
        channels_last: bool = False,
        compile: str | None = None,
    ) -> None:
        from yoda.device import autocast_dtype, inference_precision
        from yoda.diffusion.schedule import make_schedule

        self.device = device
        self.preset = preset
        self.size = size
        self.cfg = SIZES[size]
        self.precision = inference_precision(precision, device)
        self.amp = autocast_dtype(self.precision, device)
        self.batch_size = batch_size
        self.channels_last = channels_last
        self.compile = compile
        #: the memory volume's translation: seconds, sampling_seconds, nfe, how (see memory())
        self.large: dict[str, Any] | None = None
        self.progress = progress
        self.work = workdir
        self.clock = _Clock(device)
        self.sched = make_schedule("linear", 1000)
        self.figures: dict[str, Any] = {k: None for k in FIGURES}
        self.notes: dict[str, str] = {}
        self.absolute: dict[str, Any] = {}
        self.details: dict[str, Any] = {}

    def rows(self, height: int, width: int) -> int:
        """Network inputs per call for slices of this size (a view deeper than the batch)."""
        from yoda.model.denoiser import auto_batch_size

        return self.batch_size or auto_batch_size(self.device, height, width)

    @property
    def batch_label(self) -> str:
        """The batch size as the notes name it."""
        if self.batch_size is not None:
            return f"batch {self.batch_size}"
        return f"automatic batch (the pixels of {self.rows(256, 256)} slices of 256x256 per call)"

    def stage(self, name: str, fn: Callable[[], None]) -> None:
        _log(self.progress, f"{name} ...")
        start = time.perf_counter()
        fn()
        _log(self.progress, f"{name} done in {time.perf_counter() - start:.1f} s")

    def denoiser(self, model: torch.nn.Module, cond: torch.Tensor, **options: Any) -> Any:
        from yoda.model.denoiser import VolumeDenoiser

        options.setdefault("autocast_dtype", self.amp)
        options.setdefault("channels_last", self.channels_last)
        return VolumeDenoiser(
            model, self.sched, "v", cond, batch_size=self.batch_size, device=self.device, **options
        )

    def regression(self, den: Any, shape: Sequence[int], views: Sequence[str]) -> Any:
        from yoda.diffusion import sampling

        gen = torch.Generator(device=self.device).manual_seed(0)
        return sampling.regression(
            den, shape, self.sched, views=views, generator=gen, device=self.device
        )

    # ------------------------------------------------------------------ data and model

    def setup(self) -> None:
        from yoda.data.normalize import to_network  # noqa: F401  (import cost outside timings)
        from yoda.translate import Translator, prepare_sources

        size = self.cfg["volume"]
        self.model_dir = _write_model(self.work / "model", self.preset)
        self.subject = _write_subject(self.work / "subject", size, seed=1)
        self.sources = {k: str(self.subject[k]) for k in _SOURCES}
        self.translator = Translator.load(
            self.model_dir,
            device=self.device,
            precision=self.precision,
            batch_size=self.batch_size,
            channels_last=self.channels_last,
            compile=self.compile,
        )
        self.model = self.translator.model
        self.net = self.translator.network  # compiled when asked
        prep = prepare_sources(
            self.sources, list(_SOURCES), normalization="tissue", mask=None, resample=False
        )
        self.cond = torch.from_numpy(prep.data).to(self.device)
        self.shape = tuple(int(s) for s in prep.data.shape[1:])
        self.details["regression_volume"] = {"grid": [size] * 3, "roi": list(self.shape)}

    # ------------------------------------------------------------------ network efficiency

    def efficiency(self, repeats: int) -> None:
        from yoda.volume.views import VIEWS

        n_mm = self.cfg["matmul_cuda" if self.device.type == "cuda" else "matmul_cpu"]
        rate_mm = _matmul_rate(self.clock, self.device, n_mm, repeats)
        views = _view_shapes(self.shape, self.model.in_multiple)
        flops = sum(
            d * _flops_per_slice(self.model, (h, w), self.device) for d, h, w in views.values()
        )
        plain = {"channels_last": False}
        variants = {
            "plain": (self.model, plain),
            "channels_last": (self.model, {"channels_last": True}),
        }
        if self.amp is None:
            bf16_ok = self.device.type == "cpu" or torch.cuda.is_bf16_supported()
            if bf16_ok:
                variants["bf16"] = (self.model, {**plain, "autocast_dtype": torch.bfloat16})
        if self.compile is not None:
            variants["compiled"] = (self.net, plain)
        dens = {k: self.denoiser(net, self.cond, **v) for k, (net, v) in variants.items()}
        outs = {k: self.regression(d, self.shape, VIEWS).image for k, d in dens.items()}  # warm-up
        fns = {k: (lambda d=d: self.regression(d, self.shape, VIEWS)) for k, d in dens.items()}
        times = _paired(self.clock, fns, repeats)
        rate = flops / times["plain"]
        rate_mm = max(rate_mm, _matmul_rate(self.clock, self.device, n_mm, 1))
        self.figures["network_efficiency"] = rate / rate_mm
        self.figures["channels_last_speedup"] = times["plain"] / times["channels_last"]
        diffs = {k: float((outs[k] - outs["plain"]).abs().max()) for k in outs if k != "plain"}
        if "compiled" in times:
            self.figures["compile_speedup"] = times["plain"] / times["compiled"]
            self.absolute["regression_compiled_s"] = times["compiled"]
        else:
            self.notes["compile_speedup"] = "not measured: no --compile MODE given"
        if "bf16" in times:
            self.figures["bf16_speedup"] = times["plain"] / times["bf16"]
        else:
            self.notes["bf16_speedup"] = (
                f"not measured: the bench already runs in {self.precision}"
                if self.amp is not None
                else "not measured: this GPU has no bf16"
            )
        self.absolute.update(
            matmul_gflops=rate_mm / 1e9,
            matmul_size=n_mm,
            network_gflops=rate / 1e9,
            regression_flops=flops,
            regression_network_s=times["plain"],
            regression_channels_last_s=times["channels_last"],
        )
        if "bf16" in times:
            self.absolute["regression_bf16_s"] = times["bf16"]
        self.details["option_max_abs_diff"] = diffs
        self.notes["network_efficiency"] = (
            f"regression of a {'x'.join(map(str, self.shape))} volume (3 views): "
            f"{rate / 1e9:.3g} GFLOP/s achieved vs {rate_mm / 1e9:.3g} GFLOP/s of a "
            f"{n_mm}^2 {'bf16' if self.device.type == 'cuda' else 'fp32'} matmul"
        )

    # ------------------------------------------------------------------ translate overhead

    def translate(self, repeats: int) -> None:
        out_path = self.work / "out" / "flair.nii.gz"
        out_path.parent.mkdir(exist_ok=True)
        tr = self.translator

        def full() -> None:
            res = tr.translate(self.sources, mode="regression", seed=0)
            res.save(out_path, overwrite=True)

        from yoda.model.denoiser import call_plan, is_compiled

        model, dev = self.model, self.device
        net = self.net  # the translator's network: compiled when asked
        padded = is_compiled(net)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        views = _view_shapes(self.shape, model.in_multiple)
        inputs = {}
        gen = torch.Generator(device=dev).manual_seed(0)
        # the translation's calls: (H, W, rows), a compiled network's padded to the full call
        calls = []
        for d, h, w in views.values():
            bs, _ = call_plan(self.batch_size, dev, 1, d, h, w, compiled=padded)
            calls += [(h, w, bs if padded else min(bs, d - i0)) for i0 in range(0, d, bs)]
        for h, w, _ in calls:
            if (h, w) not in inputs:
                bs = max(rows for hh, ww, rows in calls if (hh, ww) == (h, w))
                x = torch.randn((bs, model.n_slices, h, w), generator=gen, device=dev)
                c = torch.randn(
                    (bs, model.n_slices * model.n_sources, h, w), generator=gen, device=dev
                )
                inputs[(h, w)] = (x.contiguous(memory_format=fmt), c.contiguous(memory_format=fmt))
        steps = torch.full(
            (max(rows for *_, rows in calls),), self.sched.T - 1, dtype=torch.long, device=dev
        )

        def network() -> None:
            ctx = (
                torch.autocast(device_type=dev.type, dtype=self.amp)
                if self.amp is not None
                else contextlib.nullcontext()
            )
            with torch.inference_mode(), ctx:
                for h, w, rows in calls:
                    x, c = inputs[(h, w)]
                    net(x[:rows], steps[:rows], c[:rows])

        full()
        network()
        times = _paired(self.clock, {"translate": full, "network": network}, repeats)
        self.figures["translate_overhead"] = times["translate"] / times["network"]
        self.absolute.update(translate_s=times["translate"], translate_network_s=times["network"])
        self.details["translate_calls"] = len(calls)

    # ------------------------------------------------------------------ ExpA batching

    def expa(self, repeats: int) -> None:
        from yoda.diffusion import sampling

        k, n_ex = self.cfg["expa_steps"], self.cfg["n_ex"]
        steps = sampling.timesteps_preview(self.sched, k)
        den = self.denoiser(self.net, self.cond)

        def batched() -> None:
            gen = torch.Generator(device=self.device).manual_seed(0)
            sampling.expa(
                den, self.shape, self.sched, n_ex=n_ex, timesteps=steps, generator=gen,
                device=self.device, keep_samples=False,
            )  # fmt: skip

        def single() -> None:
            gen = torch.Generator(device=self.device).manual_seed(0)
            sampling.diffusion(
                den, self.shape, self.sched, timesteps=steps, generator=gen, device=self.device
            )

        single()
        batched()  # warm-up at the larger batch too (allocations, compiled code)
        times = _paired(self.clock, {"batched": batched, "single": single}, repeats)
        self.figures["expa_batching"] = times["batched"] / (n_ex * times["single"])
        per_nfe_single = times["single"] / k
        per_nfe_batched = times["batched"] / (k * n_ex)
        self.absolute.update(
            expa_batched_s=times["batched"],
            diffusion_single_s=times["single"],
            expa_steps=k,
            n_ex=n_ex,
            per_nfe_diffusion_s=per_nfe_single,
            per_nfe_expa_s=per_nfe_batched,
        )
        self.per_nfe = (per_nfe_single, per_nfe_batched)

    # ------------------------------------------------------------------ training

    def train(self, repeats: int) -> None:
        from yoda.config import TrainConfig, apply_overrides, validate
        from yoda.data.manifest import Manifest, Subject, write_manifest
        from yoda.train import _Trainer

        size, n_sub = self.cfg["train_volume"], self.cfg["train_subjects"]
        subjects = []
        for i in range(n_sub):
            paths = _write_subject(self.work / "train" / f"s{i}", size, seed=10 + i)
            subjects.append(Subject(f"s{i}", "train", dict(paths)))
        manifest = write_manifest(Manifest(subjects, self.work / "train"), self.work / "train.csv")
        batch = self.cfg["train_batch"]
        threads = torch.get_num_threads()
        config = apply_overrides(
            TrainConfig(),
            {
                "data.manifest": str(manifest),
                "data.sources": list(_SOURCES),
                "data.target": _TARGET,
                "data.normalization": "tissue",
                "data.cache_dir": str(self.work / "cache"),
                "model.preset": self.preset,
                "optim.batch_size": batch,
                "run.out": str(self.work / "run"),
                "run.device": str(self.device),
                "run.precision": self.precision,
                "run.threads": threads,
                "run.steps": 1000,
                "run.val_every": 0,
                "run.checkpoint_every": 0,
                "run.tensorboard": False,
            },
        )
        validate(config)
        deterministic = torch.are_deterministic_algorithms_enabled()
        fill = torch.utils.deterministic.fill_uninitialized_memory
        trainer = _Trainer(config, progress=False, resume=False)
        try:
            trainer._prepare()
            self._train_measure(trainer, repeats)
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic)
            torch.utils.deterministic.fill_uninitialized_memory = fill

    def _train_measure(self, trainer: Any, repeats: int) -> None:
        model = trainer.model
        model.train()
        raw = list(model.parameters())
        ema = list(trainer.ema.parameters())
        batches = iter(trainer._make_loader())
        fixed = trainer._micro_inputs(next(batches))
        accum = trainer.accum

        def step() -> None:
            trainer._train_step(model, batches, raw, ema)

        def fwd_bwd() -> None:
            for _ in range(accum):
                trainer._loss(model, fixed).backward()
            trainer.optimizer.zero_grad(set_to_none=True)

        step()
        fwd_bwd()
        times = _paired(self.clock, {"step": step, "fwd_bwd": fwd_bwd}, repeats)
        n_load = self.cfg["loader_batches"]
        loader_s = self.clock(lambda: [next(batches) for _ in range(n_load)]) / n_load
        per_step = trainer.micro * accum
        self.figures["train_step_overhead"] = times["step"] / times["fwd_bwd"]
        self.figures["loader_headroom"] = (trainer.micro / loader_s) / (per_step / times["step"])
        self.absolute.update(
            train_step_s=times["step"],
            train_fwd_bwd_s=times["fwd_bwd"],
            loader_batch_s=loader_s,
            train_slabs_per_s=per_step / times["step"],
            loader_slabs_per_s=trainer.micro / loader_s,
        )
        self.details["train"] = {
            "batch_size": per_step,
            "slab_size": list(trainer.sampler.size),
            "num_workers": trainer.config.data.num_workers,
            "precision": trainer.precision,
        }

    # ------------------------------------------------------------------ scaling

    def scaling(self, repeats: int) -> None:
        sizes = self.cfg["scaling"]
        per_voxel, per_flop, per_slice = {}, {}, {}
        gen = torch.Generator(device=self.device).manual_seed(0)
        for s in sizes:
            cond = torch.rand((len(_SOURCES), s, s, s), generator=gen, device=self.device) * 2 - 1
            den = self.denoiser(self.model, cond)
            shape = (s, s, s)
            fn = lambda den=den, shape=shape: self.regression(den, shape, ("axial",))  # noqa: E731
            reps = repeats if s < max(sizes) else 1
            if reps > 1 or self.device.type == "cuda":  # a first call at a new shape is slow
                fn()
            seconds = _paired(self.clock, {"r": fn}, reps)["r"]
            d, h, w = _view_shapes(shape, self.model.in_multiple)["axial"]
            flops = d * _flops_per_slice(self.model, (h, w), self.device)
            per_slice[s] = seconds / d
            per_voxel[s] = seconds / s**3
            per_flop[s] = seconds / flops
            del den, cond
            gc.collect()
        self.figures["per_voxel_cost_ratio"] = max(per_voxel.values()) / min(per_voxel.values())
        self.figures["per_flop_cost_ratio"] = max(per_flop.values()) / min(per_flop.values())
        self.absolute["per_slice_s"] = {f"{s}^3": v for s, v in per_slice.items()}
        self.absolute["per_voxel_us"] = {f"{s}^3": v * 1e6 for s, v in per_voxel.items()}
        self.absolute["network_gflops_by_size"] = {f"{s}^3": 1e-9 / v for s, v in per_flop.items()}

    # ------------------------------------------------------------------ memory

    def memory(self) -> None:
        size = self.cfg["memory_volume"]
        big = _write_subject(self.work / "big", size, seed=2, suffix=".nii")
        sources = {k: str(big[k]) for k in _SOURCES}
        out = str(self.work / "out" / "big_flair.nii")
        if self.device.type == "cuda":
            self._memory_cuda(sources, out, size)
            return
        b, hw = self.cfg["small_batch_cpu"], self.cfg["small_size"]
        threads = torch.get_num_threads()
        translate_task = {
            "kind": "translate",
            "threads": threads,
            "model": str(self.model_dir),
            "batch_size": self.batch_size,
            "precision": self.precision,
            "channels_last": self.channels_last,
            "compile": self.compile,
            "sources": sources,
            "out": out,
        }
        small_task = {"kind": "small", "threads": threads, "batch": b, "size": hw}
        # two fresh processes at once: each measures only its own resident set
        procs = [_start_child(translate_task), _start_child(small_task)]
        try:
            res, small = (_finish_child(p) for p in procs)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
        self.figures["peak_memory_translate_mb"] = res["delta_mb"]
        self.absolute["translate_memory_view_s"] = res["view_seconds"]
        self.large = {k: res[k] for k in ("seconds", "sampling_seconds", "nfe")}
        self.large["how"] = "measured: translate + save in a fresh process" + (
            ", after a compiling run" if self.compile else ""
        )
        self.details["memory_translate_process"] = {
            k: res[k] for k in ("base_mb", "peak_mb", "sys_s", "page_faults")
        }
        how = "VmHWM reset before translating" if res["reset"] else "VmHWM since process start"
        self.notes["peak_memory_translate_mb"] = (
            f"{size}^3 regression with {self.preset}, {self.batch_label}: peak resident set "
            f"of a fresh process above its {res['base_mb']:.0f} MB after loading the model "
            f"({how})"
        )
        self.figures["peak_memory_forward_small_mb"] = small["delta_mb"]
        self.absolute["small_forward_s"] = small["seconds"]
        self.notes["peak_memory_forward_small_mb"] = (
            f"CPU: one forward of the small network for {b} slice(s) of {hw}x{hw} (fp32, "
            f"inference; sampling calls it with {self.rows(hw, hw)})"
        )

    def _memory_cuda(self, sources: dict[str, str], out: str, size: int) -> None:
        from yoda.model.network import Denoiser2p5D

        dev = self.device
        if self.compile:  # compiling (and autotuning) buffers are not the translation's
            self.translator.translate(sources, mode="regression")
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        res = self.translator.translate(sources, mode="regression")
        res.save(out, overwrite=True)
        peak = torch.cuda.max_memory_allocated(dev) - base
        del res
        start = time.perf_counter()  # again, warm: the GPU targets are for a loaded model
        res = self.translator.translate(sources, mode="regression")
        res.save(out, overwrite=True)
        self.large = {
            "seconds": time.perf_counter() - start,
            "sampling_seconds": res.info["sampling_seconds"],
            "nfe": res.info["nfe"],
            "how": "measured: translate + save, warm",
        }
        self.figures["peak_memory_translate_mb"] = peak / 2**20
        self.notes["peak_memory_translate_mb"] = (
            f"{size}^3 regression with {self.preset}, {self.batch_label}, "
            f"{self.precision}: torch.cuda.max_memory_allocated above the loaded model"
        )
        del res
        net = Denoiser2p5D("small", n_slices=5, n_sources=len(_SOURCES)).to(dev).eval()
        hw = self.cfg["small_size"]
        b = self.rows(hw, hw)
        x = torch.randn((b, 5, hw, hw), device=dev)
        c = torch.randn((b, 5 * len(_SOURCES), hw, hw), device=dev)
        t = torch.full((b,), 999, dtype=torch.long, device=dev)
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        ctx = (
            torch.autocast(device_type="cuda", dtype=self.amp)
            if self.amp is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), ctx:
            net(x, t, c)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        self.figures["peak_memory_forward_small_mb"] = peak / 2**20
        self.notes["peak_memory_forward_small_mb"] = (
            f"one forward of the small network, batch {b} of {hw}x{hw}, {self.precision}, "
            "inference: peak allocation above weights and inputs"
        )

    # ------------------------------------------------------------------ absolute figures

    def seconds_per_volume(self) -> None:
        single, batched = getattr(self, "per_nfe", (None, None))
        n_ex = self.cfg["n_ex"]
        shape = "x".join(map(str, self.shape))
        self.absolute["seconds_per_volume"] = {
            "regression": {
                "seconds": self.absolute.get("translate_s"),
                "nfe": PAPER_NFE["regression"],
                "how": f"measured: translate + save, {shape} ROI, 3 views",
            },
            "diffusion": {
                "seconds": None if single is None else single * PAPER_NFE["diffusion"],
                "nfe": PAPER_NFE["diffusion"],
                "how": "extrapolated: measured time per NFE x 251 (truncated sampler)",
            },
            "expa": {
                "seconds": None if batched is None else batched * n_ex * 251,
                "nfe": n_ex * 251,
                "how": f"extrapolated: measured time per NFE (batched) x {n_ex} x 251",
            },
        }
        large = self.large
        if large is None:
            return
        # preparing and writing the volume is paid once; every NFE costs the regression's mean
        # time per view (diffusion cycles through the same three views)
        per_nfe = large["sampling_seconds"] / large["nfe"]
        fixed = large["seconds"] - large["sampling_seconds"]
        nfe = PAPER_NFE["diffusion"]
        self.absolute["seconds_per_large_volume"] = {
            "grid": f"{self.cfg['memory_volume']}^3",
            "regression": {
                "seconds": large["seconds"],
                "sampling_seconds": large["sampling_seconds"],
                "nfe": large["nfe"],
                "how": f"{large['how']}; {large['sampling_seconds']:.3g} s of it sampling",
            },
            "diffusion": {
                "seconds": fixed + nfe * per_nfe,
                "nfe": nfe,
                "how": "extrapolated: the regression's reading and writing + 251 x its time "
                "per NFE",
            },
            "expa": {
                "seconds": fixed + n_ex * nfe * per_nfe,
                "nfe": n_ex * nfe,
                "how": f"extrapolated as diffusion with {n_ex} x 251 NFE, no batching gain",
            },
        }


def _machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    with contextlib.suppress(OSError, AttributeError):
        info["load_average"] = list(os.getloadavg())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        from yoda.model.denoiser import tune_cpu_allocator

        info["cpu_allocator"] = "reuses freed blocks" if tune_cpu_allocator() else "system"
    return info


def run_bench(
    device: str | torch.device = "cpu",
    preset: str = "tiny",
    *,
    size: str = "default",
    json_path: str | os.PathLike | None = None,
    progress: bool = True,
    precision: str = "auto",
    batch_size: int | None = None,
    threads: int | None = None,
    channels_last: bool = False,
    compile: str | None = None,
) -> dict[str, Any]:
    """Measure the performance figures of the module docstring in one run.

    Parameters
    ----------
    device : "cpu", "cuda", "cuda:N" or "auto"
    preset : network preset benched ("tiny", "small", "large"), with random weights.
    size : "default" (64^3 regression volume; 64^3, 128^3 and 256^3 per-slice cost; 256^3
        memory), or "tiny" (everything small: seconds).
    json_path : optional file to write the result to (atomically).
    progress : print each stage and its duration to stderr.
    precision : "auto" (as ``yoda translate``: fp16 on CUDA, fp32 on the CPU), "fp32", "bf16" or
        (CUDA) "fp16" for the inference measurements.
    batch_size : slices per network call in sampling (None: by slice size, as translate).
    threads : CPU threads (default: torch's current setting).
    channels_last, compile : translation speed options (:class:`yoda.translate.Translator`;
        which measurements use them: the module docstring); ``compile`` (a mode of
        ``yoda.model.denoiser.COMPILE_MODES``) also gives ``compile_speedup``.

    Returns
    -------
    dict
        ``figures`` (every name of ``FIGURES``: a number, or None with the reason in
        ``notes``), ``targets``, ``absolute`` (seconds, GFLOP/s, NFE), ``notes``,
        ``details`` and ``machine``.
    """
    from yoda.device import resolve_device
    from yoda.model.denoiser import check_batch_size, check_compile_option
    from yoda.model.network import PRESETS

    if size not in SIZES:
        raise ConfigError(f"bench size must be one of {sorted(SIZES)}, got {size!r}")
    if preset not in PRESETS:
        raise ConfigError(f"unknown network preset {preset!r}; choose one of {sorted(PRESETS)}")
    batch_size = check_batch_size(batch_size)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    compile = check_compile_option(compile)
    path = None if json_path is None else _check_json_path(Path(json_path).expanduser())
    dev = resolve_device(device)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    cfg = SIZES[size]
    try:
        with tempfile.TemporaryDirectory(prefix="yoda-bench-") as tmp:
            b = _Bench(
                dev, preset, size, precision, batch_size, progress, Path(tmp),
                channels_last=bool(channels_last), compile=compile,
            )  # fmt: skip
            b.stage("setup (synthetic subject, random-weight model)", b.setup)
            b.stage("network efficiency", lambda: b.efficiency(cfg["repeats"]))
            b.stage("translate overhead", lambda: b.translate(cfg["repeats"]))
            b.stage("ExpA batching", lambda: b.expa(cfg["expa_repeats"]))
            b.stage("training step and loader", lambda: b.train(cfg["train_repeats"]))
            b.stage("per-slice cost at " + ", ".join(f"{s}^3" for s in cfg["scaling"]),
                    lambda: b.scaling(cfg["repeats"]))  # fmt: skip
            b.stage(f"peak memory ({cfg['memory_volume']}^3 translation)", b.memory)
            b.seconds_per_volume()
            machine = _machine(dev)
    finally:
        torch.set_num_threads(previous_threads)
    for name in FIGURES:
        value = b.figures.get(name)
        if value is not None and not math.isfinite(float(value)):
            b.notes[name] = f"not finite ({value}); " + b.notes.get(name, "")
            b.figures[name] = None
        if b.figures.get(name) is None:
            b.notes.setdefault(name, "not measured")
    load = machine.get("load_average", [0.0])[0]
    if load > (machine.get("cpus") or 1) + 0.5:
        b.notes["machine"] = (
            f"the CPU was busy (1-minute load {load:.1f} on {machine['cpus']} cores): absolute "
            "times are inflated and ratios noisier"
        )
    result = {
        "yoda_version": __version__,
        "device": str(dev),
        "preset": preset,
        "size": size,
        "precision": b.precision,
        "batch_size": batch_size,
        "channels_last": bool(channels_last),
        "compile": compile,
        "figures": _round(b.figures),
        "targets": {k: {"op": op, "value": v} for k, (op, v) in TARGETS.items()},
        "absolute": _round(b.absolute),
        "notes": b.notes,
        "details": _round(b.details),
        "machine": machine,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if path is not None:
        from yoda.atomic import write_text_atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(result, indent=2) + "\n")
    return result


def _check_json_path(path: Path) -> Path:
    """Refuse, before the bench runs, a JSON output that could not be written or that names
    another kind of file."""
    if path.suffix.lower() != ".json":
        raise InputError(f"--json {path} must end in .json")
    if path.is_dir():
        raise InputError(f"--json {path} is a folder, expected a file name")
    if not can_create(path):
        raise InputError(f"--json {path}: its folder cannot be made or written to")
    return path


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}{unit}"
    return f"{value}{unit}"


def _volume_row(mode: str, entry: dict[str, Any], target: float | None = None) -> str:
    row = f"    {mode:<11} {_fmt(entry['seconds'], ' s'):>10}  NFE {entry['nfe']:<5} {entry['how']}"
    if target is not None and entry["seconds"] is not None:
        status = "ok" if entry["seconds"] <= target else "MISSED"
        row += f" [H100 target <= {target:g} s: {status}]"
    return row


def format_report(result: dict[str, Any]) -> str:
    """The result of :func:`run_bench` as a plain-text table."""
    options = [
        f"preset {result['preset']}",
        result["device"],
        f"size {result['size']}",
        result["precision"],
        f"batch {result['batch_size'] or 'auto'}",
    ]
    if result.get("channels_last"):
        options.append("channels-last")
    if result.get("compile"):
        options.append(f"compile {result['compile']}")
    options += [f"{result['machine'].get('threads')} thread(s)", f"{result['seconds']} s"]
    lines = [
        "yoda bench: " + ", ".join(options),
        "",
        f"{'figure':<30} {'value':>10}  {'target':<8} status",
    ]
    for name in FIGURES:
        value = result["figures"].get(name)
        target = result["targets"].get(name)
        tgt, status = "", ""
        if target is not None:
            tgt = f"{target['op']} {target['value']:g}"
            if value is not None:
                ok = value <= target["value"] if target["op"] == "<=" else value >= target["value"]
                status = "ok" if ok else "MISSED"
        lines.append(f"{name:<30} {_fmt(value):>10}  {tgt:<8} {status}".rstrip())
    a = result["absolute"]
    lines += ["", "absolute (this machine, this run):"]
    for key in (
        "matmul_gflops",
        "network_gflops",
        "regression_network_s",
        "translate_s",
        "translate_network_s",
        "expa_batched_s",
        "diffusion_single_s",
        "train_step_s",
        "train_fwd_bwd_s",
        "loader_batch_s",
    ):
        if key in a:
            lines.append(f"  {key:<28} {_fmt(a[key])}")
    for key in ("per_slice_s", "per_voxel_us", "network_gflops_by_size"):
        if key in a:
            row = ", ".join(f"{k}: {_fmt(v)}" for k, v in a[key].items())
            lines.append(f"  {key:<28} {row}")
    spv = a.get("seconds_per_volume", {})
    if spv:
        lines.append("  seconds per volume (the regression ROI above):")
        lines += [_volume_row(mode, entry) for mode, entry in spv.items()]
    large = a.get("seconds_per_large_volume")
    if large:
        gpu = (
            result["device"].startswith("cuda")
            and result["preset"] == "small"
            and large["grid"] == "256^3"
        )
        lines.append(f"  seconds per {large['grid']} volume (3 views):")
        for mode in ("regression", "diffusion", "expa"):
            target = GPU_VOLUME_TARGETS.get(mode) if gpu else None
            lines.append(_volume_row(mode, large[mode], target))
    if result["notes"]:
        lines += ["", "notes:"]
        lines += [f"  {k}: {v}" for k, v in result["notes"].items()]
    return "\n".join(lines)
