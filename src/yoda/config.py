"""The typed training configuration: one dataclass tree, readable from and written to YAML.

Defaults follow the paper (Sec. III-D): preset ``small``, 5-slice slabs, v-prediction, linear
schedule with T=1000, Adam with lr 1e-4, EMA decay 0.999, batch size 96, each training volume
sampled 20k times, the slicing view drawn uniformly. Options marked *departure* are not part
of the paper's method; all are off by default except the tissue-median normalization,
measured more stable than the paper's 99.9th percentile on the phantom.

Precedence when a run is configured: dataclass defaults < YAML file < command-line flags.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Any

from yoda.atomic import write_text_atomic
from yoda.errors import ConfigError

#: The slicing views (same order as ``yoda.volume.views.VIEWS``).
VIEWS = ("axial", "coronal", "sagittal")
#: Learning-rate decay shapes used when ``optim.lr_final`` is set.
LR_DECAYS = ("cosine", "step")
#: Arithmetic precisions: "auto" = bf16 autocast on CUDA where supported, else fp16 with a
#: gradient scaler; fp32 on CPU.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: Intensity normalizations (same names as ``yoda.data.normalize.NORMALIZATIONS``).
NORMALIZATIONS = ("percentile", "tissue", "ct")


@dataclass
class DataConfig:
    """Training data: which images, how they are scaled and how slabs are drawn."""

    #: Path of the manifest (CSV or JSON) listing the subjects and their images.
    manifest: str | None = None
    #: Source modalities, in the order the network sees them (e.g. ["t1w", "t2w"]).
    sources: tuple[str, ...] = ()
    #: Target modality (e.g. "flair").
    target: str | None = None
    #: Intensity normalization of yoda.data.normalize: "tissue" (default, a departure: the
    #: foreground median -> 102; on the phantom its scale error between a noisy image and its
    #: noise-free truth is 0.3 % +- 0.3 % against -1.1 % +- 1.1 % for "percentile"),
    #: "percentile" (the paper: 0 -> 0, the 99.9th percentile -> 255), or "ct" (HU window).
    normalization: str = "tissue"
    #: Weight the loss by the brain mask: 1 inside, ``mask_weight_outside`` outside (paper, RS).
    mask_weighting: bool = False
    #: Loss weight of voxels outside the brain mask when ``mask_weighting`` is on (paper: 0.01).
    mask_weight_outside: float = 0.01
    #: Slicing views drawn uniformly per sample; one view (e.g. ["axial"]) trains a single
    #: fixed view as in the paper's ablations.
    views: tuple[str, ...] = VIEWS
    #: How often each training volume is sampled over the run (paper: 20k); sets the number of
    #: steps: ceil(n_train_subjects * samples_per_volume / batch_size) unless run.steps is given.
    samples_per_volume: int = 20000
    #: Manifest split used for training.
    train_split: str = "train"
    #: Manifest split used for validation (skipped when the manifest has no such subjects).
    val_split: str = "val"
    #: Folder of the preprocessed array cache; default RUN_DIR/cache.
    cache_dir: str | None = None
    #: DataLoader worker processes (0: slabs are drawn in the training process).
    num_workers: int = 0


@dataclass
class ModelConfig:
    """Network and diffusion process."""

    #: Network preset of yoda.model.network.PRESETS: "tiny" (CPU), "small" (paper, 53 M),
    #: "large" (paper's final model, 214 M).
    preset: str = "small"
    #: Slices per slab n (odd; paper: 5, ablations 1 and 9).
    n_slices: int = 5
    #: Prediction target of the network: "v" (paper), "eps" or "x0".
    prediction: str = "v"
    #: Noise schedule: "linear" (paper default) or "cosine".
    schedule: str = "linear"
    #: Number of diffusion timesteps (paper: 1000; T=1 trains a dedicated regression model).
    T: int = 1000
    #: Start from the (EMA) weights of this model directory instead of a random network
    #: (fine-tuning); its preset, slab thickness, number of sources, prediction, schedule and T
    #: must be this run's. The optimizer, EMA warm-up and learning-rate schedule start afresh.
    init: str | None = None


@dataclass
class OptimConfig:
    """Optimizer, batch, EMA and the loss's timestep distribution."""

    #: Adam learning rate (paper: 1e-4).
    lr: float = 1e-4
    #: Departure: decay the learning rate to this value over the run (None: constant lr).
    lr_final: float | None = None
    #: Shape of the decay to ``lr_final``: "cosine", or "step" (lr until ``lr_step_at`` of the
    #: run, then lr_final).
    lr_decay: str = "cosine"
    #: Fraction of the run after which the "step" decay switches to ``lr_final``.
    lr_step_at: float = 0.75
    #: Effective batch size (paper: 96) = micro_batch x accumulation steps x world size.
    batch_size: int = 96
    #: Slabs per forward pass on one process (None: batch_size / world size, no accumulation);
    #: gradients are accumulated to reach ``batch_size``.
    micro_batch: int | None = None
    #: Decay of the exponential moving average of the weights (paper: 0.999).
    ema_decay: float = 0.999
    #: EMA warm-up: the decay at update k is min(ema_decay, (1 + k) / (10 + k)).
    ema_warmup: bool = True
    #: Departure: clip the gradient norm to this value (None: no clipping).
    grad_clip: float | None = None
    #: Departure: probability that a sample's timestep is T-1 (the regression step) instead of
    #: uniform over 0..T-1; strengthens the one-step regression output.
    high_t_share: float = 0.0


@dataclass
class RunConfig:
    """Where and how the run executes, logs and checkpoints (none of it changes the math)."""

    #: Run directory: config.yaml, metrics.jsonl, checkpoint/, model/.
    out: str | None = None
    #: Total optimizer steps (None: derived from data.samples_per_volume).
    steps: int | None = None
    #: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
    device: str = "auto"
    #: Arithmetic: "auto", "fp32", "bf16" or "fp16" (fp16 on CUDA only; bf16 on CPU is opt-in).
    precision: str = "auto"
    #: Seed of weights, data stream, timesteps and noise.
    seed: int = 0
    #: Use deterministic algorithms on CPU (bitwise reproducible runs and resumes).
    deterministic: bool = True
    #: CPU threads per process (None: the CPU count divided by the local process count).
    threads: int | None = None
    #: Steps between log entries (loss, lr, throughput); the only per-step host syncs.
    log_every: int = 50
    #: Steps between checkpoints (RUN_DIR/checkpoint and RUN_DIR/model); 0 disables them.
    checkpoint_every: int = 1000
    #: Steps between validations on the val split; 0 disables validation.
    val_every: int = 1000
    #: Number of fixed validation slabs for the validation loss.
    val_slabs: int = 64
    #: Number of fixed validation slabs whose regression samples are scored (SSIM, PSNR).
    val_images: int = 16
    #: Write TensorBoard events when the tensorboard package is installed.
    tensorboard: bool = True
    #: Free-form notes stored in the model card.
    notes: str = ""


@dataclass
class TrainConfig:
    """Complete configuration of one training run."""

    #: Training data.
    data: DataConfig = field(default_factory=DataConfig)
    #: Network and diffusion process.
    model: ModelConfig = field(default_factory=ModelConfig)
    #: Optimization.
    optim: OptimConfig = field(default_factory=OptimConfig)
    #: Execution, logging and checkpoints.
    run: RunConfig = field(default_factory=RunConfig)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "run": RunConfig}

#: Fields that do not change the training arithmetic: a run may be resumed with other values.
#: (``run.steps`` changes where the run stops and, with ``optim.lr_final``, the lr schedule.)
NON_MATH_FIELDS = frozenset(
    {
        "data.cache_dir",
        "data.num_workers",  # the slab stream does not depend on the number of workers
        "data.val_split",
        "run.out",
        "run.steps",
        "run.device",
        "run.deterministic",
        "run.threads",
        "run.log_every",
        "run.checkpoint_every",
        "run.val_every",
        "run.val_slabs",
        "run.val_images",
        "run.tensorboard",
        "run.notes",
    }
)


# --------------------------------------------------------------------------------------------
# dict <-> dataclasses with type checks


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"list of {_describe(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': expected {_describe(tp)}, got {value!r}")
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise ConfigError(f"config key '{key}': expected {_describe(tp)}, got {value!r}")
        return tuple(_coerce(v, item_tp, key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - every annotation above is one of these
        raise TypeError(f"unsupported annotation {tp!r}")
    raise ConfigError(f"config key '{key}': expected {_describe(tp)}, got {value!r}")


def _section_from_dict(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{prefix}' must be a mapping, got {values!r}")
    hints = _type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(hints)
            raise ConfigError(f"unknown config key '{prefix}.{key}' (known keys: {known})")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}")
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from a nested mapping (missing keys keep their defaults).

    Raises
    ------
    ConfigError
        For an unknown section or key (named), or a value of the wrong type.
    """
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"a training config must be a mapping of sections, got {values!r}")
    sections = {}
    for name, sub in values.items():
        if name not in SECTIONS:
            raise ConfigError(
                f"unknown config key '{name}' (known sections: {', '.join(SECTIONS)})"
            )
        sections[name] = _section_from_dict(SECTIONS[name], sub or {}, name)
    return TrainConfig(**sections)


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """Nested plain dict (lists instead of tuples) of a config; YAML- and JSON-able."""

    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    return {
        name: {f.name: plain(getattr(getattr(config, name), f.name)) for f in _fields(cls)}
        for name, cls in SECTIONS.items()
    }


def _fields(cls: type) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(cls)


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read a training config from a YAML file.

    Raises
    ------
    ConfigError
        When the file is missing, not YAML, or holds unknown keys or wrongly typed values.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    try:
        return config_from_dict(values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def config_yaml(config: TrainConfig) -> str:
    """The YAML text of a config (sections in order, keys in declaration order)."""
    import yaml

    header = "# yoda training configuration (see yoda.config for every field's meaning)\n"
    return header + yaml.safe_dump(config_to_dict(config), sort_keys=False)


def save_config(config: TrainConfig, path: str | os.PathLike) -> Path:
    """Write the config as YAML, atomically."""
    path = Path(path)
    write_text_atomic(path, config_yaml(config))
    return path


def apply_overrides(config: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Return a copy of ``config`` with dotted keys (e.g. ``"optim.lr"``) replaced.

    Raises
    ------
    ConfigError
        For an unknown key or a value of the wrong type.
    """
    values = config_to_dict(config)
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in values or name not in values[section]:
            known = [f"{sec}.{field}" for sec, fields in values.items() for field in fields]
            field_name = key.rpartition(".")[2]
            close = [k for k in known if k.endswith("." + field_name)][:1] or (
                difflib.get_close_matches(key, known, n=1)
            )
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint}")
        values[section][name] = list(value) if isinstance(value, tuple) else value
    return config_from_dict(values)


def parse_assignment(text: str) -> tuple[str, Any]:
    """Parse ``KEY=VALUE``, the value read as YAML (``optim.lr=3e-4``, ``data.views=[axial]``)."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot read value {raw!r}: {exc}") from None
    return key.strip(), value


# --------------------------------------------------------------------------------------------
# semantic checks


def validate(config: TrainConfig, *, require_data: bool = True) -> TrainConfig:
    """Check every option's value; return the config unchanged.

    Raises
    ------
    ConfigError
        Naming the first invalid option and the allowed values.
    """
    d, m, o, r = config.data, config.model, config.optim, config.run
    if require_data:
        if not d.manifest:
            raise ConfigError("data.manifest is required (--data MANIFEST)")
        if not d.sources:
            raise ConfigError("data.sources is required (--sources t1w t2w ...)")
        if not d.target:
            raise ConfigError("data.target is required (--target flair)")
        if not r.out:
            raise ConfigError("run.out is required (--out RUN_DIR)")
    names = [*d.sources, *([d.target] if d.target else [])]
    for name in names:
        if not name or name != name.lower() or not name.replace("_", "").isalnum():
            raise ConfigError(f"modality names are lower-case words, got {name!r}")
    if len(set(d.sources)) != len(d.sources):
        raise ConfigError(f"data.sources has duplicates: {list(d.sources)}")
    if d.target in d.sources:
        raise ConfigError(f"data.target {d.target!r} is also a source")
    from yoda.data.normalize import NORMALIZATIONS as known_normalizations
    from yoda.volume.views import VIEWS as known_views

    _choice("data.normalization", d.normalization, known_normalizations)
    if not d.views:
        raise ConfigError("data.views must name at least one view")
    for view in d.views:
        _choice("data.views", view, known_views)
    if len(set(d.views)) != len(d.views):
        raise ConfigError(f"data.views has duplicates: {list(d.views)}")
    _range("data.mask_weight_outside", d.mask_weight_outside, 0.0, 1.0)
    _positive("data.samples_per_volume", d.samples_per_volume)
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {d.num_workers}")

    from yoda.diffusion.schedule import PREDICTIONS, SCHEDULES
    from yoda.model.checkpoint import MAX_T
    from yoda.model.network import PRESETS

    _choice("model.preset", m.preset, tuple(PRESETS))
    if m.n_slices < 1 or m.n_slices % 2 == 0:
        raise ConfigError(f"model.n_slices must be odd and >= 1 (paper: 1, 5, 9), got {m.n_slices}")
    _choice("model.prediction", m.prediction, PREDICTIONS)
    _choice("model.schedule", m.schedule, SCHEDULES)
    _positive("model.T", m.T)
    if m.T > MAX_T:  # the model card of such a run could not be read
        raise ConfigError(f"model.T must be at most {MAX_T}, got {m.T}")
    if m.init is not None and require_data and not Path(m.init).expanduser().is_dir():
        raise ConfigError(f"model.init {m.init}: not a model directory")
    if m.T == 1 and m.prediction == "eps":
        raise ConfigError(
            "model.prediction 'eps' cannot train a T=1 regression model (x_T is pure noise); "
            "use 'v' or 'x0'"
        )

    if not 0 < o.lr < math.inf:
        raise ConfigError(f"optim.lr must be a finite number > 0, got {o.lr}")
    if o.lr_final is not None and not 0 <= o.lr_final < math.inf:
        raise ConfigError(f"optim.lr_final must be a finite number >= 0, got {o.lr_final}")
    _choice("optim.lr_decay", o.lr_decay, LR_DECAYS)
    _range("optim.lr_step_at", o.lr_step_at, 0.0, 1.0)
    _positive("optim.batch_size", o.batch_size)
    if o.micro_batch is not None:
        _positive("optim.micro_batch", o.micro_batch)
    if not 0 <= o.ema_decay < 1:
        raise ConfigError(f"optim.ema_decay must be in [0, 1), got {o.ema_decay}")
    if o.grad_clip is not None and not o.grad_clip > 0:
        raise ConfigError(f"optim.grad_clip must be > 0, got {o.grad_clip}")
    _range("optim.high_t_share", o.high_t_share, 0.0, 1.0)

    if r.steps is not None:
        _positive("run.steps", r.steps)
    check_seed(r.seed, "run.seed")
    parse_device(r.device)  # syntax only; availability is checked when the run starts
    _choice("run.precision", r.precision, PRECISIONS)
    if r.threads is not None:
        _positive("run.threads", r.threads)
    _positive("run.log_every", r.log_every)
    for key in ("checkpoint_every", "val_every", "val_slabs", "val_images"):
        if getattr(r, key) < 0:
            raise ConfigError(f"run.{key} must be >= 0, got {getattr(r, key)}")
    return config


def check_seed(seed: object, name: str = "seed") -> int:
    """``seed`` as an int: an integer from 0 to 2**64 - 1, the range that the random generators
    used here (torch's, numpy's) all accept; otherwise :class:`ConfigError`."""
    if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed < 2**64:
        raise ConfigError(f"{name} must be an integer from 0 to 2**64 - 1; got {seed!r}")
    return int(seed)


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _positive(key: str, value: int) -> None:
    if not value >= 1:
        raise ConfigError(f"{key} must be >= 1, got {value}")


def _range(key: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{key} must be in [{lo}, {hi}], got {value}")


def parse_device(text: str) -> tuple[str, int | None]:
    """Split a device option into (kind, index): "auto", "cpu", "cuda" or "cuda:N".

    Raises
    ------
    ConfigError
        For anything else.
    """
    if text in ("auto", "cpu", "cuda"):
        return text, None
    kind, sep, idx = text.partition(":")
    if kind == "cuda" and sep and idx.isdigit():
        return "cuda", int(idx)
    raise ConfigError(f"run.device must be auto, cpu, cuda or cuda:N; got {text!r}")


#: Fields that hold paths: the hash and the diff compare them resolved to absolute paths.
PATH_FIELDS = frozenset({"data.manifest", "model.init"})


def _comparable(dotted: str, value: Any) -> Any:
    """A field's value as :func:`config_hash` and :func:`config_diff` compare it."""
    if dotted in PATH_FIELDS and value:
        return str(Path(value).expanduser().resolve())
    return value


def config_hash(config: TrainConfig) -> str:
    """SHA-256 of the fields that change the training arithmetic (see NON_MATH_FIELDS)."""
    values = config_to_dict(config)
    math = {}
    for section, sub in values.items():
        for key, value in sub.items():
            dotted = f"{section}.{key}"
            if dotted in NON_MATH_FIELDS:
                continue
            if dotted == "model.init" and value is None:
                continue  # absent from the hashes of runs made before the option existed
            math[dotted] = _comparable(dotted, value)
    text = json.dumps(math, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def config_diff(a: TrainConfig, b: TrainConfig, *, math_only: bool = True) -> list[str]:
    """Dotted keys whose values differ between two configs (math fields only by default)."""
    da, db = config_to_dict(a), config_to_dict(b)
    out = []
    for section in da:
        for key in da[section]:
            dotted = f"{section}.{key}"
            if math_only and dotted in NON_MATH_FIELDS:
                continue
            if _comparable(dotted, da[section][key]) != _comparable(dotted, db[section][key]):
                out.append(dotted)
    return out
