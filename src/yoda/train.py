"""Training loop (Alg. 1 on 2.5D slabs): Adam, EMA, mixed precision, DDP, checkpoints, resume.

One optimizer step sees ``batch_size`` slabs: ``micro_batch`` slabs per forward pass,
``accumulation`` passes per process and ``world_size`` processes (``torchrun``), so::

    batch_size = micro_batch x accumulation x world_size

Every slab draws its timestep uniformly from 0..T-1 (or, with ``optim.high_t_share = p``, is
set to T-1 with probability p) and its noise from a per-rank generator; the loss is the
(mask-)weighted mean squared error between the network output for the centre slice and the
training target (v, eps or x0) of the centre slice. The EMA of the weights is updated after
every step with decay ``min(ema_decay, (1 + k) / (10 + k))`` (warm-up on by default).

Run directory::

    config.yaml      the configuration of the run (rewritten when a run is resumed)
    metrics.jsonl    one JSON object per line: training log entries and validations
    checkpoint/      step-XXXXXXXX/ with state.pt (weights, EMA, optimizer, scaler, step,
                     config hash) and rank-R.pt (RNG states, data-stream position and running
                     loss sums per rank)
    model/           the model directory (yoda.model.checkpoint), EMA weights for inference
    cache/           preprocessed arrays of the cohort (unless data.cache_dir is set)

A checkpoint is written into a temporary folder and renamed when complete; the previous one is
removed only afterwards, so a run killed at any moment (also during a save) resumes from the
last complete checkpoint with ``resume=True``. With a fixed seed on the CPU a resumed run
reproduces the losses and weights of an uninterrupted run bitwise. A run whose loss or weights
are no longer finite (a diverged run) stops with ConfigError before it saves them, so the last
checkpoint and model directory stay usable. In fp16 (with a gradient scaler, which skips the
update of a step that overflows) a micro-batch loss that is not finite is left out of the logged
mean instead; the run stops only when no loss of a log interval is finite.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.deterministic
from torch import nn

from yoda import __version__
from yoda.atomic import write_text_atomic
from yoda.config import (
    TrainConfig,
    config_diff,
    config_from_dict,
    config_hash,
    config_to_dict,
    parse_device,
    save_config,
    validate,
)
from yoda.device import usable_cpus
from yoda.diffusion.schedule import predict_x0, q_sample, training_target
from yoda.errors import ConfigError, InputError, ModelError
from yoda.model.checkpoint import weights_sha256

__all__ = ["train", "learning_rate", "ema_decay_at", "latest_checkpoint", "weights_sha256"]

log = logging.getLogger("yoda.train")

CHECKPOINT_DIR = "checkpoint"
MODEL_DIR = "model"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
_CKPT_FORMAT = "yoda-train-checkpoint"
_CKPT_VERSION = 2
#: Checkpoint versions this yoda resumes (1: running loss sums in state.pt or rank-R.pt).
_CKPT_READABLE = (1, 2)
_COMPLETE = "COMPLETE"


# --------------------------------------------------------------------------------------------
# small pure helpers


def learning_rate(config: TrainConfig, step: int, total: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total`` steps."""
    o = config.optim
    if o.lr_final is None:
        return o.lr
    frac = min(max(step / max(total, 1), 0.0), 1.0)
    if o.lr_decay == "step":
        return o.lr if frac < o.lr_step_at else o.lr_final
    return o.lr_final + (o.lr - o.lr_final) * 0.5 * (1.0 + math.cos(math.pi * frac))


def ema_decay_at(decay: float, updates: int, warmup: bool = True) -> float:
    """EMA decay of update number ``updates`` (0-based): min(decay, (1 + k) / (10 + k))."""
    if not warmup:
        return decay
    return min(decay, (1.0 + updates) / (10.0 + updates))


def _all_finite(tensors: Any) -> bool:
    """True when no floating-point tensor of ``tensors`` holds NaN or Inf (one sync per device)."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if torch.is_tensor(t) and t.is_floating_point():
            flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    return all(bool(torch.stack(f).all()) for f in flags.values())


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to("cpu").contiguous().numpy().tobytes()).hexdigest()


def noisy_slab(
    schedule: Any, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Forward-noise a target slab (Eq. 5), keeping its padding at the background value -1.

    Padding (in-plane and slices beyond the volume) is not part of the diffusion process:
    sampling pads the latent with -1, so training does too.
    """
    return torch.where(valid, q_sample(schedule, x0, t, noise), -1.0)


def collate_slabs(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack sampler items into a batch with numpy (single-threaded: no intra-op thread
    start-up per batch, which costs far more than the copy on small, busy CPUs)."""
    out = {}
    for key, first in items[0].items():
        if torch.is_tensor(first):
            out[key] = torch.from_numpy(np.stack([it[key].numpy() for it in items]))
        else:
            out[key] = torch.tensor([it[key] for it in items])
    return out


def _ssim2d(x: torch.Tensor, y: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """SSIM map of image batches (N, 1, H, W): Gaussian window sigma 1.5 (11 taps), reflection."""
    sigma, radius = 1.5, 5
    coords = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()

    def blur(a: torch.Tensor) -> torch.Tensor:
        a = F.pad(a, (radius, radius, radius, radius), mode="reflect")
        a = F.conv2d(a, g.view(1, 1, 1, -1))
        return F.conv2d(a, g.view(1, 1, -1, 1))

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ux, uy = blur(x), blur(y)
    vx = blur(x * x) - ux * ux
    vy = blur(y * y) - uy * uy
    vxy = blur(x * y) - ux * uy
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


# --------------------------------------------------------------------------------------------
# processes, devices, precision


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    initialized: bool = False  # True when this module created the process group

    @property
    def active(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def _distributed_env() -> _Dist:
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    return _Dist(rank, world, local_rank, local_world)


def _resolve_device(text: str, dist: _Dist) -> torch.device:
    kind, index = parse_device(text)
    cuda = torch.cuda.is_available()
    if kind == "auto":
        kind = "cuda" if cuda else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    if not cuda:
        raise ConfigError(
            f"run.device {text!r} requested but CUDA is not available on this machine "
            "(use --device cpu or auto)"
        )
    count = torch.cuda.device_count()
    if dist.active:
        if index is not None:
            raise ConfigError(
                f"run.device {text!r}: with several processes each one uses cuda:LOCAL_RANK; "
                "pass --device cuda (select GPUs with CUDA_VISIBLE_DEVICES)"
            )
        index = dist.local_rank
    index = 0 if index is None else index
    if index >= count:
        raise ConfigError(f"run.device cuda:{index} does not exist ({count} CUDA device(s))")
    return torch.device("cuda", index)


def _resolve_precision(text: str, device: torch.device) -> tuple[torch.dtype | None, bool, str]:
    """(autocast dtype or None, use a gradient scaler, name)."""
    if device.type != "cuda":
        if text == "fp16":
            raise ConfigError("run.precision 'fp16' needs a CUDA device; use bf16 or fp32 on CPU")
        if text == "bf16":  # CPUs with bf16 instructions train ~2x faster; opt-in only
            return torch.bfloat16, False, "bf16"
        return None, False, "fp32"
    if text == "auto":
        text = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if text == "bf16":
        if not torch.cuda.is_bf16_supported():
            raise ConfigError("run.precision 'bf16' is not supported by this GPU; use fp16")
        return torch.bfloat16, False, "bf16"
    if text == "fp16":
        return torch.float16, True, "fp16"
    return None, False, "fp32"


# --------------------------------------------------------------------------------------------
# checkpoints


def _save_file(obj: Any, path: Path) -> None:
    """torch.save + fsync (tensors, numbers, strings and plain containers only)."""
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _load_file(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"checkpoint file {path} is missing") from None
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"checkpoint file {path} cannot be read ({detail})") from None


def _step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of a run (None when there is none)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step-") and (p / _COMPLETE).is_file():
            try:
                found.append((int(p.name[5:]), p))
            except ValueError:
                continue
    return max(found)[1] if found else None


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "generator": generator.get_state(),
    }


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if (
        state["cuda"]
        and torch.cuda.is_available()
        and len(state["cuda"]) == torch.cuda.device_count()
    ):
        torch.cuda.set_rng_state_all(state["cuda"])
    npst = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["gauss"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    generator.set_state(state["generator"])


# --------------------------------------------------------------------------------------------
# the trainer


class _Trainer:
    def __init__(self, config: TrainConfig, *, progress: bool, resume: bool) -> None:
        self.config = config
        self.progress = progress
        self.resume = resume
        self.dist = _distributed_env()
        self.run_dir = Path(config.run.out).expanduser()
        self.is_main = self.dist.rank == 0
        self._tb = None
        self._bar = None

    # ---------------------------------------------------------------- process setup

    def _setup(self) -> None:
        c = self.config
        self.device = _resolve_device(c.run.device, self.dist)
        self.autocast_dtype, use_scaler, self.precision = _resolve_precision(
            c.run.precision, self.device
        )
        if self.dist.active and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group(backend=backend)
            self.dist.initialized = True
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        threads = c.run.threads or max(1, usable_cpus() // max(1, self.dist.local_world_size))
        torch.set_num_threads(threads)
        if self.device.type == "cpu":
            from yoda.model.denoiser import tune_cpu_allocator

            tune_cpu_allocator()  # freed activations are reused, not page-faulted in again
        if self.device.type == "cpu" and c.run.deterministic:
            torch.use_deterministic_algorithms(True)
            # deterministic mode also fills every new tensor with NaN, a check for reads of
            # uninitialized memory that costs ~4 % of a step and changes no result
            torch.utils.deterministic.fill_uninitialized_memory = False

    def _barrier(self) -> None:
        if self.dist.active:
            torch.distributed.barrier()

    def _all_ok(self, ok: bool) -> bool:
        """True when ``ok`` holds on every rank."""
        if not self.dist.active:
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self._coll_device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    @property
    def _coll_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # ---------------------------------------------------------------- run directory

    def _check_run_dir(self) -> None:
        run_dir = self.run_dir
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"run.out {run_dir} exists and is not a directory")
        existing = [
            name for name in (CHECKPOINT_DIR, MODEL_DIR, METRICS_FILE) if (run_dir / name).exists()
        ]
        if existing and not self.resume:
            raise ConfigError(
                f"run directory {run_dir} already holds a run ({', '.join(existing)}); pass "
                "--resume to continue it or choose another --out"
            )

    # ---------------------------------------------------------------- data

    def _prepare_data(self) -> None:
        from yoda.data.cache import CachedCohort, index_path, prepare_cache
        from yoda.data.manifest import read_manifest

        c = self.config
        manifest_path = Path(c.data.manifest).expanduser()
        if not manifest_path.is_file():
            raise InputError(f"manifest {manifest_path} does not exist")
        manifest = read_manifest(manifest_path)
        self.manifest_path = manifest_path.resolve()
        cache_dir = (
            Path(c.data.cache_dir).expanduser() if c.data.cache_dir else self.run_dir / "cache"
        )
        train_subjects = manifest.split(c.data.train_split)
        if len(train_subjects) == 0:
            raise InputError(
                f"manifest {manifest_path}: no subjects in split {c.data.train_split!r} "
                f"(splits: {manifest.splits})"
            )
        has_val = c.run.val_every > 0 and len(manifest.split(c.data.val_split)) > 0
        kwargs = {
            "normalization": c.data.normalization,
            "use_mask_weights": c.data.mask_weighting,
        }
        splits = [c.data.train_split] + ([c.data.val_split] if has_val else [])
        cohorts: dict[str, Any] = {}
        error: BaseException | None = None
        if self.is_main:
            try:
                for split in splits:
                    cohorts[split] = prepare_cache(
                        manifest,
                        list(c.data.sources),
                        c.data.target,
                        cache_dir,
                        split=split,
                        progress=self.progress,
                        **kwargs,
                    )
            except BaseException as exc:  # every rank must learn of it before raising
                error = exc
        if not self._all_ok(error is None):
            if error is not None:
                raise error
            raise InputError("the data cache could not be prepared (see the error of rank 0)")
        if not self.is_main:
            for split in splits:
                path = index_path(
                    cache_dir, list(c.data.sources), c.data.target, split=split, **kwargs
                )
                cohorts[split] = CachedCohort.open(path)
        self.train_cohort = cohorts[c.data.train_split]
        self.val_cohort = cohorts.get(c.data.val_split) if has_val else None
        self.train_subjects = train_subjects

    def _voxel_sizes(self) -> list[list[float]]:
        from yoda.data import io

        sizes = set()
        for subject in self.train_subjects:
            try:
                zooms = io.read_voxel_size(subject.images[self.config.data.target])
                sizes.add(tuple(round(z, 4) for z in zooms))
            except Exception:  # the summary is informative only
                continue
        return [list(s) for s in sorted(sizes)]

    # ---------------------------------------------------------------- model and state

    def _batch_plan(self) -> None:
        """micro_batch x accumulation x world_size = batch_size (ConfigError otherwise)."""
        c = self.config
        world = self.dist.world_size
        if c.optim.micro_batch is None:
            if c.optim.batch_size % world:
                raise ConfigError(
                    f"optim.batch_size {c.optim.batch_size} is not divisible by the "
                    f"{world} processes; set optim.micro_batch"
                )
            self.micro = c.optim.batch_size // world
        else:
            self.micro = c.optim.micro_batch
        if c.optim.batch_size % (self.micro * world):
            raise ConfigError(
                f"optim.batch_size {c.optim.batch_size} must equal micro_batch {self.micro} x "
                f"accumulation steps x {world} process(es); choose a micro_batch that divides "
                f"batch_size / processes"
            )
        self.accum = c.optim.batch_size // (self.micro * world)

    def _build(self) -> None:
        from yoda.data.sampler import SlabSampler
        from yoda.diffusion.schedule import make_schedule
        from yoda.model.network import Denoiser2p5D, NetworkConfig

        c = self.config
        n_train = len(self.train_cohort)
        self.total = c.run.steps or math.ceil(
            n_train * c.data.samples_per_volume / c.optim.batch_size
        )
        self.schedule = make_schedule(c.model.schedule, c.model.T)
        self.net_cfg = NetworkConfig.from_preset(c.model.preset)
        torch.manual_seed(c.run.seed)
        model = Denoiser2p5D(self.net_cfg, n_slices=c.model.n_slices, n_sources=len(c.data.sources))
        self.model = model.to(self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.ema_updates = 0
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=c.optim.lr, foreach=True)
        self.generator = torch.Generator(device=self.device)
        seq = np.random.SeedSequence([c.run.seed, self.dist.rank, 7919])
        self.generator.manual_seed(int(seq.generate_state(1)[0]))
        self.sampler = SlabSampler(
            self.train_cohort,
            n_slices=c.model.n_slices,
            in_multiple=self.model.in_multiple,
            views=c.data.views,
            seed=c.run.seed,
            rank=self.dist.rank,
            batch_size=self.micro,
            use_mask_weights=c.data.mask_weighting,
            w_out=c.data.mask_weight_outside,
        )
        self.step = 0
        self.wall_before = 0.0
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        self.loss_skipped = torch.zeros((), dtype=torch.float32, device=self.device)
        self.loss_count = 0
        self.consumed = 0
        self.last_val: dict[str, float] = {}
        #: the command that started the run, then those that resumed it
        self.commands = [shlex.join(sys.argv)]

    def _checkpoint_state(self) -> dict[str, Any]:
        from yoda.model.checkpoint import unwrap_model

        model = unwrap_model(self.model)
        return {
            "format": _CKPT_FORMAT,
            "version": _CKPT_VERSION,
            "step": self.step,
            "config_hash": config_hash(self.config),
            "config_json": json.dumps(config_to_dict(self.config)),
            "world_size": self.dist.world_size,
            "micro_batch": self.micro,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "ema": {k: v.detach().cpu() for k, v in self.ema.state_dict().items()},
            "ema_updates": self.ema_updates,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "wall_time_s": self._wall(),
            "last_val": dict(self.last_val),
            "commands": list(self.commands),
            "yoda_version": __version__,
        }

    def _rank_state(self) -> dict[str, Any]:
        return {
            "rank": self.dist.rank,
            "step": self.step,
            "rng": _rng_state(self.generator),
            "sampler": self.sampler.state_dict(samples=self.consumed),
            "loss_sum": self.loss_sum.detach().cpu().clone(),
            "loss_skipped": self.loss_skipped.detach().cpu().clone(),
            "loss_count": self.loss_count,
        }

    def _gather_rank_states(self) -> list[dict[str, Any]]:
        """Every rank's RNG and data-stream state, collected on rank 0 (others get [])."""
        mine = self._rank_state()
        if not self.dist.active:
            return [mine]
        states: list[Any] | None = [None] * self.dist.world_size if self.is_main else None
        torch.distributed.gather_object(mine, states, dst=0)
        return list(states) if states is not None else []

    def _save_checkpoint(self) -> bool:
        """Write checkpoint/step-N atomically; False (with a warning) if it failed.

        Every rank takes part (its RNG and data-stream state are gathered), rank 0 alone
        writes: into a temporary folder, then renamed; older checkpoints are removed only
        after the new one is complete.
        """
        rank_states = self._gather_rank_states()
        ok = True
        if self.is_main:
            root = self.run_dir / CHECKPOINT_DIR
            name = _step_dir_name(self.step)
            tmp = root / f".tmp-{name}"
            final = root / name
            try:
                root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
                for state in rank_states:
                    _save_file(state, tmp / f"rank-{state['rank']}.pt")
                _save_file(self._checkpoint_state(), tmp / "state.pt")
                write_text_atomic(
                    tmp / _COMPLETE,
                    json.dumps({"step": self.step, "world_size": self.dist.world_size}),
                )
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except OSError as exc:
                ok = False
                shutil.rmtree(tmp, ignore_errors=True)
                log.warning(
                    "could not write the checkpoint of step %d in %s (%s: %s); the previous "
                    "checkpoint is kept and training continues",
                    self.step,
                    root,
                    type(exc).__name__,
                    exc,
                )
            if ok:
                for old in root.iterdir():
                    if old != final and old.is_dir():
                        shutil.rmtree(old, ignore_errors=True)
        return self._all_ok(ok)

    def _check_finite(self) -> None:
        """Stop the run, on every rank, before a loss or state that is not finite is saved."""
        if not self._all_ok(bool(torch.isfinite(self.loss_sum))):
            raise self._diverged("the loss is not finite")
        tensors = [
            *self.model.state_dict().values(),
            *self.ema.state_dict().values(),
            *(v for state in self.optimizer.state.values() for v in state.values()),
        ]
        if not self._all_ok(_all_finite(tensors)):
            raise self._diverged("the weights are not finite")

    def _diverged(self, what: str) -> ConfigError:
        """The error of a run whose loss or weights are no longer finite; nothing is saved."""
        from yoda.model.checkpoint import CARD_FILE

        lr = learning_rate(self.config, self.step - 1, self.total)
        kept = latest_checkpoint(self.run_dir)
        saved = (
            f"the checkpoint of step {int(kept.name[5:])} is kept"
            if kept is not None
            else "no checkpoint had been written"
        )
        model_dir = self.run_dir / MODEL_DIR
        start = (
            f"from the kept model (--init {model_dir}) or from scratch"
            if (model_dir / CARD_FILE).is_file()
            else "from scratch"
        )
        return ConfigError(
            f"training diverged: {what} at step {self.step} (learning rate {lr:g}); stopped "
            f"without saving, {saved}; start a new run (another --out) with a lower --lr, {start}"
        )

    def _load_checkpoint(self, folder: Path) -> None:
        state = _load_file(folder / "state.pt")
        if not isinstance(state, dict) or state.get("format") != _CKPT_FORMAT:
            raise ModelError(f"{folder / 'state.pt'} is not a yoda training checkpoint")
        if state.get("version") not in _CKPT_READABLE:
            raise ModelError(
                f"{folder}: checkpoint version {state.get('version')} is not supported "
                f"(this yoda reads {', '.join(map(str, _CKPT_READABLE))})"
            )
        if state["config_hash"] != config_hash(self.config):
            try:
                saved = config_from_dict(json.loads(state["config_json"]))
                changed = ", ".join(
                    f"{k} ({_get(saved, k)!r} -> {_get(self.config, k)!r})"
                    for k in config_diff(saved, self.config)
                )
            except Exception:
                changed = "unknown fields"
            raise ConfigError(
                f"cannot resume {self.run_dir}: options that change the training differ from "
                f"the checkpoint: {changed}; start a new run (another --out) instead"
            )
        if state["world_size"] != self.dist.world_size:
            raise ConfigError(
                f"cannot resume {self.run_dir}: the checkpoint was written by "
                f"{state['world_size']} process(es), this run has {self.dist.world_size}; "
                "resume with the same number of processes"
            )
        if state["micro_batch"] != self.micro:
            raise ConfigError(
                f"cannot resume {self.run_dir}: micro batch {self.micro} differs from the "
                f"checkpoint's {state['micro_batch']}"
            )
        rank_state = _load_file(folder / f"rank-{self.dist.rank}.pt")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.ema_updates = int(state["ema_updates"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        losses = rank_state if "loss_sum" in rank_state else state  # older: rank 0's only
        self.loss_sum = losses["loss_sum"].to(self.device)
        self.loss_skipped = losses.get("loss_skipped", torch.zeros(())).to(self.device)
        self.loss_count = int(losses["loss_count"])
        self.wall_before = float(state["wall_time_s"])
        self.last_val = dict(state.get("last_val") or {})
        started = state.get("commands") or ["unknown (a checkpoint of an earlier version)"]
        self.commands = [*started, shlex.join(sys.argv)]
        self.sampler.load_state_dict(rank_state["sampler"])
        self.consumed = int(rank_state["sampler"]["samples"])
        _set_rng_state(rank_state["rng"], self.generator)

    # ---------------------------------------------------------------- outputs

    def _wall(self) -> float:
        return self.wall_before + (time.perf_counter() - self.t_start)

    def _load_init(self, directory: str) -> None:
        """Start from the EMA weights of a compatible model directory (``model.init``)."""
        from yoda.model.checkpoint import load_model

        c = self.config
        model, card = load_model(Path(directory).expanduser(), device=self.device)

        def layers(cfg: Any) -> dict[str, Any]:  # the architecture, not runtime switches
            return {**dataclasses.asdict(cfg), "use_flash_attention": None}

        pairs = {  # this run's setting, the model's
            "network": (layers(self.net_cfg), layers(card.network_config)),
            "slab thickness": (c.model.n_slices, card.n_slices),
            "number of sources": (len(c.data.sources), len(card.sources)),
            "prediction": (c.model.prediction, card.prediction),
            "schedule": (c.model.schedule, card.schedule),
            "T": (c.model.T, card.T),
        }
        differ = [name for name, (mine, theirs) in pairs.items() if mine != theirs]
        if differ:
            raise ConfigError(
                f"model.init {directory}: its {', '.join(differ)} differ from this run's; "
                "fine-tuning needs the same network and diffusion settings"
            )
        self.model.load_state_dict(model.state_dict())
        self.ema.load_state_dict(model.state_dict())

    def _card(self) -> Any:
        from yoda.model.checkpoint import ModelCard

        c = self.config
        method = c.data.normalization
        norm: dict[str, Any] = {"method": method}
        if method == "percentile":
            norm["percentile"] = 99.9
        overrides = {
            name: kw["method"]
            for name, kw in self.train_cohort.normalization.items()
            if kw["method"] != method
        }
        if overrides:
            norm["modalities"] = overrides
        training = {
            "manifest": str(self.manifest_path),
            "train_split": c.data.train_split,
            "subjects": len(self.train_cohort),
            "subject_ids": list(self.train_cohort.ids),
            "val_subjects": len(self.val_cohort) if self.val_cohort is not None else 0,
            "voxel_sizes": self.voxel_sizes,
            "roi_margins": list(self.train_cohort.margins),
            "slab_size": list(self.sampler.size),
            "views": list(c.data.views),
            "batch_size": c.optim.batch_size,
            "micro_batch": self.micro,
            "accumulation": self.accum,
            "world_size": self.dist.world_size,
            "total_steps": self.total,
            "lr": c.optim.lr,
            "lr_final": c.optim.lr_final,
            "ema_decay": c.optim.ema_decay,
            "ema_warmup": c.optim.ema_warmup,
            "high_t_share": c.optim.high_t_share,
            "init": None
            if c.model.init is None
            else str(Path(c.model.init).expanduser().resolve()),
            "mask_weighting": c.data.mask_weighting,
            "samples_per_volume": c.data.samples_per_volume,
            "device": str(self.device),
            "precision": self.precision,
            "seed": c.run.seed,
            "command": self.commands[0],
            "resumed_with": self.commands[1:],
            "config": config_to_dict(c),
            "validation": dict(self.last_val),
        }
        return ModelCard(
            sources=list(c.data.sources),
            target=c.data.target,
            network=self.net_cfg.to_dict(),
            n_slices=c.model.n_slices,
            schedule=c.model.schedule,
            T=c.model.T,
            prediction=c.model.prediction,
            normalization=norm,
            training=training,
            steps=self.step,
            wall_time_s=round(self._wall(), 3),
            notes=c.run.notes,
        )

    def _save_model_dir(self) -> None:
        from yoda.model.checkpoint import save_model

        if not self.is_main:
            return
        try:
            save_model(self.run_dir / MODEL_DIR, self.model, self.ema, self._card())
        except OSError as exc:
            log.warning(
                "could not write the model directory %s at step %d (%s: %s); training continues",
                self.run_dir / MODEL_DIR,
                self.step,
                type(exc).__name__,
                exc,
            )

    def _log(self, entry: dict[str, Any]) -> None:
        if not self.is_main:
            return
        line = json.dumps(entry, allow_nan=True)
        try:
            with open(self.run_dir / METRICS_FILE, "a") as fh:
                fh.write(line + "\n")
        except OSError as exc:
            log.warning("could not append to %s (%s)", self.run_dir / METRICS_FILE, exc)
        if self._tb is not None:
            for key, value in entry.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, entry.get("step", self.step))

    def _truncate_metrics(self, step: int) -> None:
        path = self.run_dir / METRICS_FILE
        if not self.is_main or not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if isinstance(entry, dict) and int(entry.get("step", 0)) <= step:
                kept.append(line)
        write_text_atomic(path, "".join(k + "\n" for k in kept))

    def _open_tensorboard(self) -> None:
        if not (self.is_main and self.config.run.tensorboard):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard is optional
            return
        self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step)

    # ---------------------------------------------------------------- validation

    def _prepare_validation(self) -> None:
        self.val_batch = None
        if self.val_cohort is None or not self.is_main:
            return
        from yoda.data.sampler import SlabSampler

        c = self.config
        k = max(c.run.val_slabs, c.run.val_images)
        if k == 0:
            return
        sampler = SlabSampler(
            self.val_cohort,
            n_slices=c.model.n_slices,
            in_multiple=self.model.in_multiple,
            views=c.data.views,
            seed=c.run.seed,
            rank=0,
            batch_size=1,
            use_mask_weights=c.data.mask_weighting,
            w_out=c.data.mask_weight_outside,
        )
        batch = collate_slabs([sampler.sample(g) for g in range(k)])
        gen = torch.Generator().manual_seed((c.run.seed + 104729) % 2**64)
        T = c.model.T
        self.val_batch = {
            "target": batch["target"],
            "cond": batch["cond"],
            "weight": batch["weight"],
            "t": torch.linspace(0, T - 1, k).round().long(),
            "noise": torch.randn(batch["target"].shape, generator=gen),
            "x_T": torch.randn(batch["target"].shape, generator=gen).masked_fill(
                ~batch["valid"], -1.0
            ),
            "valid": batch["valid"],
        }

    @torch.no_grad()
    def _validate(self) -> dict[str, float]:
        from yoda.model.checkpoint import unwrap_model

        vb = self.val_batch
        c = self.config
        c_idx = c.model.n_slices // 2
        out: dict[str, float] = {}
        models = {"val_loss": self.ema, "val_loss_raw": unwrap_model(self.model)}
        n_loss = min(c.run.val_slabs, vb["target"].shape[0])
        for key, model in models.items():
            if n_loss == 0:
                break
            was_training = model.training
            model.eval()
            num = torch.zeros((), dtype=torch.float64)
            den = torch.zeros((), dtype=torch.float64)
            for s in range(0, n_loss, self.micro):
                sl = slice(s, min(s + self.micro, n_loss))
                x0 = vb["target"][sl].to(self.device)
                cond = vb["cond"][sl].to(self.device)
                w = vb["weight"][sl].to(self.device)
                t = vb["t"][sl].to(self.device)
                noise = vb["noise"][sl].to(self.device)
                x_t = noisy_slab(self.schedule, x0, t, noise, vb["valid"][sl].to(self.device))
                target = training_target(
                    self.schedule,
                    c.model.prediction,
                    x0[:, c_idx : c_idx + 1],
                    noise[:, c_idx : c_idx + 1],
                    t,
                )
                with self._autocast():
                    pred = model(x_t, t, cond)
                num += ((pred.float() - target) ** 2 * w).sum().double().cpu()
                den += w.sum().double().cpu()
            out[key] = float(num / den.clamp_min(1e-12))
            model.train(was_training)
        n_img = min(c.run.val_images, vb["target"].shape[0])
        if n_img and c.model.prediction != "eps":
            preds = []
            T = self.schedule.T
            for s in range(0, n_img, self.micro):
                sl = slice(s, min(s + self.micro, n_img))
                x_T = vb["x_T"][sl].to(self.device)
                cond = vb["cond"][sl].to(self.device)
                with self._autocast():
                    raw = self.ema(x_T, T - 1, cond)
                x0 = predict_x0(
                    self.schedule, c.model.prediction, raw.float(), x_T[:, c_idx : c_idx + 1], T - 1
                )
                preds.append(x0.clamp(-1, 1).cpu())
            pred255 = (torch.cat(preds).double() + 1) * 127.5
            ref255 = (vb["target"][:n_img, c_idx : c_idx + 1].double() + 1) * 127.5
            inside = vb["weight"][:n_img] > 0
            mse = ((pred255 - ref255) ** 2)[inside].mean()
            out["val_psnr"] = float(10 * torch.log10(255.0**2 / mse.clamp_min(1e-12)))
            ssim = _ssim2d(pred255, ref255)
            out["val_ssim"] = float(ssim[inside].mean())
        return out

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # ---------------------------------------------------------------- main loop

    def _prepare(self) -> None:
        """Everything before the first step: device, data cache, model, optimizer, sampler."""
        self._check_run_dir()
        self._setup()
        self._batch_plan()
        self._prepare_data()
        self._build()

    def run(self) -> Path:
        c = self.config
        self._prepare()
        self.voxel_sizes = self._voxel_sizes() if self.is_main else []
        self.t_start = time.perf_counter()
        folder = latest_checkpoint(self.run_dir) if self.resume else None
        if folder is not None:
            self._load_checkpoint(folder)
            if self.is_main:  # also without a progress bar: it says what the run does
                print(f"resuming {self.run_dir} from step {self.step}", file=sys.stderr)
        else:
            if self.resume and self.is_main:
                print(f"no checkpoint in {self.run_dir}: starting from step 0", file=sys.stderr)
            if c.model.init:
                self._load_init(c.model.init)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(c, self.run_dir / CONFIG_FILE)
            self._truncate_metrics(self.step)
        self._barrier()
        self._open_tensorboard()
        self._prepare_validation()
        try:
            self._loop()
        finally:
            if self._bar is not None:  # before an error is printed below it
                self._bar.close()
            if self._tb is not None:
                self._tb.close()
        return self.run_dir / MODEL_DIR

    def _make_loader(self) -> Any:
        """The DataLoader of the training slabs (one micro-batch per item)."""
        from torch.utils.data import DataLoader

        workers = self.config.data.num_workers
        return DataLoader(
            self.sampler,
            batch_size=self.micro,
            collate_fn=collate_slabs,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
        )

    def _micro_inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Network inputs and loss terms of a micro-batch: ``(x_t, t, cond, target, weight)``.

        Draws the timesteps and the noise from the rank's generator.
        """
        c = self.config
        non_blocking = self.device.type == "cuda"
        T = c.model.T
        c_idx = c.model.n_slices // 2
        x0 = batch["target"].to(self.device, non_blocking=non_blocking)
        cond = batch["cond"].to(self.device, non_blocking=non_blocking)
        w = batch["weight"].to(self.device, non_blocking=non_blocking)
        valid = batch["valid"].to(self.device, non_blocking=non_blocking)
        b = x0.shape[0]
        t = torch.randint(0, T, (b,), generator=self.generator, device=self.device)
        if c.optim.high_t_share > 0:
            high = torch.rand(b, generator=self.generator, device=self.device)
            t = torch.where(high < c.optim.high_t_share, torch.full_like(t, T - 1), t)
        noise = torch.randn(x0.shape, generator=self.generator, device=self.device)
        x_t = noisy_slab(self.schedule, x0, t, noise, valid)
        target = training_target(
            self.schedule,
            c.model.prediction,
            x0[:, c_idx : c_idx + 1],
            noise[:, c_idx : c_idx + 1],
            t,
        )
        return x_t, t, cond, target, w

    def _loss(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Weighted mean squared error of the network output for one micro-batch."""
        x_t, t, cond, target, w = inputs
        with self._autocast():
            out = model(x_t, t, cond)
        return ((out.float() - target).square() * w).sum() / w.sum().clamp_min(1e-8)

    def _train_step(
        self,
        model: nn.Module,
        batches: Any,
        raw_params: list[torch.Tensor],
        ema_params: list[torch.Tensor],
    ) -> torch.Tensor:
        """One optimizer step: ``accumulation`` micro-batches, the update and the EMA update.

        Returns the target slabs of the step's first micro-batch (as delivered by the loader).
        """
        c = self.config
        first = None
        for k in range(self.accum):
            batch = next(batches)
            self.consumed += self.micro
            if first is None:
                first = batch["target"]
            inputs = self._micro_inputs(batch)
            sync = (
                model.no_sync()
                if self.dist.active and k < self.accum - 1
                else contextlib.nullcontext()
            )
            with sync:
                loss = self._loss(model, inputs)
                self.scaler.scale(loss / self.accum).backward()
            self._add_loss(loss, self.scaler.is_enabled())
        if c.optim.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(raw_params, c.optim.grad_clip, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        decay = ema_decay_at(c.optim.ema_decay, self.ema_updates, c.optim.ema_warmup)
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, raw_params, 1.0 - decay)
        self.ema_updates += 1
        return first

    def _add_loss(self, loss: torch.Tensor, skip_nonfinite: bool) -> None:
        """Add one micro-batch loss to the running sum, without a host sync.

        With ``skip_nonfinite`` (a gradient scaler, which skips the update of a step whose
        forward pass overflowed) a loss that is not finite is left out of the sum and counted
        in ``loss_skipped`` instead; otherwise it makes the sum non-finite and stops the run.
        """
        loss = loss.detach()
        if skip_nonfinite:
            finite = torch.isfinite(loss)
            self.loss_skipped += (~finite).to(self.loss_skipped.dtype)
            loss = torch.where(finite, loss, torch.zeros_like(loss))
        self.loss_sum += loss / self.accum

    def _window_loss(self) -> tuple[float, int]:
        """Mean loss since the last log step over all ranks, and the number of losses left out.

        The mean is over the micro-batch losses that went into the sum; NaN when there were
        none.
        """
        world = self.dist.world_size
        sums = torch.stack([self.loss_sum, self.loss_skipped])
        if self.dist.active:
            torch.distributed.all_reduce(sums)
        loss_sum, skipped = sums.tolist()
        steps = max(self.loss_count, 1) - skipped / (self.accum * world)
        if steps <= 0:
            return math.nan, int(skipped)
        return loss_sum / world / steps, int(skipped)

    def _loop(self) -> None:
        from yoda.model.checkpoint import unwrap_model

        c = self.config
        if self.is_main and self.step == 0:
            self._log(
                {
                    "step": 0,
                    "event": "start",
                    "total_steps": self.total,
                    "batch_size": c.optim.batch_size,
                    "micro_batch": self.micro,
                    "accumulation": self.accum,
                    "world_size": self.dist.world_size,
                    "slab_size": list(self.sampler.size),
                    "device": str(self.device),
                    "precision": self.precision,
                    "train_subjects": len(self.train_cohort),
                    "val_subjects": len(self.val_cohort) if self.val_cohort is not None else 0,
                }
            )
            if self.val_batch is not None:
                self._log({"step": 0, **self._validate()})
        model: nn.Module = self.model
        if self.dist.active:
            model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        model.train()
        raw_params = [p for p in unwrap_model(model).parameters()]
        ema_params = [p for p in self.ema.parameters()]
        batches = iter(self._make_loader())
        first_hash = None
        postfix: dict[str, str] = {}
        bar = None
        if self.is_main and self.progress:
            from tqdm import tqdm

            bar = self._bar = tqdm(
                total=self.total, initial=self.step, desc="train", unit="step", dynamic_ncols=True
            )
        t_log, step_log = time.perf_counter(), self.step
        start_step = self.step
        current_lr = None
        while self.step < self.total:
            lr = learning_rate(c, self.step, self.total)
            if lr != current_lr:
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                current_lr = lr
            first = self._train_step(model, batches, raw_params, ema_params)
            if first_hash is None:
                first_hash = _tensor_sha256(first)
            self.step += 1
            self.loss_count += 1
            if bar is not None:
                bar.update(1)

            if self.step % c.run.log_every == 0 or self.step == self.total:
                loss_value, skipped = self._window_loss()
                now = time.perf_counter()
                rate = (self.step - step_log) * c.optim.batch_size / max(now - t_log, 1e-9)
                window = f"steps {self.step - self.loss_count + 1}-{self.step}"
                t_log, step_log = now, self.step
                self.loss_sum.zero_()
                self.loss_skipped.zero_()
                self.loss_count = 0
                entry = {
                    "step": self.step,
                    "loss": loss_value,
                    "lr": current_lr,
                    "slabs_per_s": rate,
                }
                if skipped:
                    entry["losses_not_finite"] = skipped
                if self.scaler.is_enabled():  # a shrinking scale: overflows keep coming
                    entry["grad_scale"] = float(self.scaler.get_scale())
                self._log(entry)
                # the sums are all-reduced: every rank stops here together
                if not math.isfinite(loss_value):
                    raise self._diverged(
                        f"no loss of {window} is finite" if skipped else f"the loss is {loss_value}"
                    )
                postfix.update(loss=f"{loss_value:.4g}", slabs_s=f"{rate:.1f}")
                if bar is not None:
                    bar.set_postfix(postfix)
            if self.val_batch is not None and (
                self.step % c.run.val_every == 0 or self.step == self.total
            ):
                self.last_val = self._validate()
                self._log({"step": self.step, **self.last_val})
                postfix.update(
                    {k: f"{v:.4g}" for k, v in self.last_val.items() if k != "val_loss_raw"}
                )
                if bar is not None:
                    bar.set_postfix(postfix)
            every = c.run.checkpoint_every
            if (every and self.step % every == 0) or self.step == self.total:
                self._check_finite()
                self._save_checkpoint()
                self._save_model_dir()
                t_log = time.perf_counter()  # checkpoint time is not training throughput
        if bar is not None:
            bar.close()
        if self.step == start_step:  # nothing left to train: make sure the model is written
            self._save_model_dir()
        self._finish(first_hash)

    def _finish(self, first_hash: str | None) -> None:
        from yoda.model.checkpoint import unwrap_model

        hashes = {
            "raw": weights_sha256(unwrap_model(self.model)),
            "ema": weights_sha256(self.ema),
            "first_batch": first_hash,
        }
        if self.dist.active:
            gathered: list[Any] = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, hashes)
        else:
            gathered = [hashes]
        if self.is_main:
            entry = {
                "step": self.step,
                "event": "end",
                "wall_time_s": round(self._wall(), 3),
                "rank_weights_sha256": [g["raw"] for g in gathered],
                "rank_ema_sha256": [g["ema"] for g in gathered],
                "rank_first_batch_sha256": [g["first_batch"] for g in gathered],
            }
            if len({g["raw"] for g in gathered}) > 1:
                log.warning(
                    "the weights differ between processes: %s", entry["rank_weights_sha256"]
                )
            self._log(entry)
        self._barrier()


def _get(config: TrainConfig, dotted: str) -> Any:
    section, _, name = dotted.partition(".")
    return getattr(getattr(config, section), name)


def train(config: TrainConfig, *, progress: bool = True, resume: bool = False) -> Path:
    """Train a YODA model; return its model directory (``RUN_DIR/model``).

    Parameters
    ----------
    config : TrainConfig
        The run's configuration (validated here).
    progress : bool
        Show a progress bar (rank 0 only).
    resume : bool
        Continue from the newest complete checkpoint in ``config.run.out`` (start from step 0
        when there is none). Without it, a run directory that already holds a run is refused.

    Returns
    -------
    Path
        The model directory (EMA weights, raw weights, model card).

    Raises
    ------
    ConfigError
        Invalid options, unavailable device, a checkpoint of a different configuration, or a
        loss or weights that are no longer finite (the training diverged).
    InputError
        Missing or unusable training data.

    Notes
    -----
    Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is created here (NCCL on GPUs,
    gloo on CPUs) and destroyed at the end; rank 0 alone writes files. The effective batch is
    ``micro_batch x accumulation x world_size = batch_size``.
    """
    validate(config)
    trainer = _Trainer(config, progress=progress, resume=resume)
    previous_threads = torch.get_num_threads()
    previous_det = torch.are_deterministic_algorithms_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    try:
        return trainer.run()
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_det)
        torch.utils.deterministic.fill_uninitialized_memory = previous_fill
        if trainer.dist.initialized and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
