"""The model directory: weights (safetensors), EMA weights, and a JSON model card.

A model directory holds three files::

    model.safetensors   EMA weights (what inference uses by default)
    raw.safetensors     raw (non-averaged) weights of the last training step
    model.json          the ModelCard: sources in order, target, network, diffusion process,
                        intensity normalization, training summary, package version

Loading reads only safetensors and JSON, so it never executes code from the files. Every
problem (missing, corrupted, foreign or inconsistent files) is a :class:`ModelError` naming
the file.

The module also imports checkpoints of the reference YODA implementation, which stores the
state dict of MONAI Generative's (older) ``DiffusionModelUNet``; see
:func:`convert_reference_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from yoda import __version__
from yoda.atomic import atomic_path, can_create, write_text_atomic
from yoda.data.subject import method_of
from yoda.errors import ConfigError, ModelError
from yoda.model.network import Denoiser2p5D, NetworkConfig
from yoda.volume.views import VIEWS

__all__ = [
    "FORMAT_VERSION",
    "MAX_T",
    "MODEL_FILE",
    "RAW_FILE",
    "CARD_FILE",
    "ModelCard",
    "save_model",
    "load_model",
    "read_card",
    "unwrap_model",
    "weights_sha256",
    "load_reference_state_dicts",
    "map_reference_state_dict",
    "convert_reference_checkpoint",
]

#: Version of the model-directory layout written by this package.
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
RAW_FILE = "raw.safetensors"
CARD_FILE = "model.json"
#: Largest number of diffusion timesteps a model may declare (the paper uses 1000). Sampling
#: builds schedule tables of T entries and may step through all of them, so a mistyped T
#: (e.g. 10**12) would exhaust memory instead of failing clearly.
MAX_T = 100_000


@dataclass(kw_only=True)
class ModelCard:
    """Everything needed to use a model besides its weights (stored as ``model.json``).

    Attributes
    ----------
    format_version : int
        Layout version of the model directory (``FORMAT_VERSION``).
    sources : list of str
        Source modalities in the order of the network's input channels.
    target : str
        Target modality.
    network : dict
        ``NetworkConfig.to_dict()`` of the backbone (preset name included).
    n_slices : int
        Slab thickness n.
    schedule : str
        Noise schedule ("linear" or "cosine").
    T : int
        Number of diffusion timesteps.
    prediction : str
        Network output: "v", "eps" or "x0".
    normalization : dict
        Intensity normalization: ``{"method": ..., **parameters}`` (see yoda.data.normalize).
    training : dict
        Summary of the training run (subjects, voxel sizes, manifest, batch size, slab size,
        learning rate, ...); free-form but JSON-able.
    steps : int
        Optimizer steps done.
    wall_time_s : float
        Training wall time in seconds.
    yoda_version : str
        Version of the package that wrote the card.
    notes : str
        Free-form notes (e.g. the exact command that trained the model).
    """

    format_version: int = FORMAT_VERSION
    sources: list[str]
    target: str
    network: dict[str, Any]
    n_slices: int
    schedule: str
    T: int
    prediction: str
    normalization: dict[str, Any] = field(default_factory=lambda: {"method": "percentile"})
    training: dict[str, Any] = field(default_factory=dict)
    steps: int = 0
    wall_time_s: float = 0.0
    yoda_version: str = __version__
    notes: str = ""

    @property
    def network_config(self) -> NetworkConfig:
        """The backbone configuration as a :class:`NetworkConfig`."""
        try:
            return NetworkConfig.from_dict(dict(self.network))
        except ConfigError as exc:
            raise ModelError(f"model card: invalid network configuration: {exc}") from None

    @property
    def target_normalization(self) -> str:
        """The intensity method of the target (a target named ``ct`` uses the CT window unless
        the card says otherwise): the scale of the network's output."""
        try:
            return method_of(self.normalization, self.target)
        except ConfigError as exc:
            raise ModelError(f"model card: {exc}") from None

    @property
    def slab_size(self) -> tuple[int, int] | None:
        """In-plane size (H, W) of the training slabs, or None where the card does not say
        (e.g. converted checkpoints)."""
        size = self.training.get("slab_size")
        if size is None:
            return None
        if (
            not isinstance(size, (list, tuple))
            or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)
        ):
            raise ModelError(f"model card: training.slab_size must be [H, W], got {size!r}")
        return (size[0], size[1])

    @property
    def voxel_sizes(self) -> list[tuple[float, float, float]]:
        """Voxel sizes (mm, canonical axes) of the training images; empty where the card does
        not say."""
        sizes = self.training.get("voxel_sizes") or []
        ok = isinstance(sizes, list) and all(
            isinstance(v, (list, tuple))
            and len(v) == 3
            and all(isinstance(z, (int, float)) and not isinstance(z, bool) and z > 0 for z in v)
            for v in sizes
        )
        if not ok:
            raise ModelError(
                f"model card: training.voxel_sizes must be [[x, y, z], ...], got {sizes!r}"
            )
        return [(float(v[0]), float(v[1]), float(v[2])) for v in sizes]

    @property
    def views(self) -> tuple[str, ...]:
        """The slicing views of the training slabs; empty where the card does not say."""
        views = self.training.get("views") or []
        if not isinstance(views, list) or not all(v in VIEWS for v in views):
            raise ModelError(f"model card: training.views must be a list of {VIEWS}, got {views!r}")
        return tuple(views)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dictionary."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, *, origin: str = "model card") -> ModelCard:
        """Build and check a card from a mapping (e.g. parsed JSON).

        Raises
        ------
        ModelError
            For an unknown ``format_version``, a missing or unknown key, or a wrongly typed value.
        """
        if not isinstance(data, dict):
            raise ModelError(f"{origin}: expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if not _is_int(version):
            raise ModelError(f"{origin}: 'format_version' must be an integer, got {version!r}")
        if version != FORMAT_VERSION:
            raise ModelError(
                f"{origin}: unknown format_version {version} (this yoda {__version__} reads "
                f"version {FORMAT_VERSION}); upgrade yoda or re-export the model"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ModelError(f"{origin}: unknown keys {unknown}")
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [k for k in required if k not in data]
        if missing:
            raise ModelError(f"{origin}: missing keys {missing}")
        for key, value in data.items():
            check = _CARD_TYPES[key]
            if not check(value):
                raise ModelError(f"{origin}: '{key}' has the wrong type or value: {value!r}")
        card = cls(**data)
        if card.prediction not in ("v", "eps", "x0"):
            raise ModelError(f"{origin}: unknown prediction {card.prediction!r}")
        if card.schedule not in ("linear", "cosine"):
            raise ModelError(f"{origin}: unknown schedule {card.schedule!r}")
        if card.n_slices < 1 or card.n_slices % 2 == 0 or card.steps < 0:
            raise ModelError(f"{origin}: invalid n_slices={card.n_slices} or steps={card.steps}")
        if not 1 <= card.T <= MAX_T:
            raise ModelError(f"{origin}: T must be in 1..{MAX_T}, got T={card.T}")
        if not card.sources or "method" not in card.normalization:
            raise ModelError(f"{origin}: needs at least one source and a normalization method")
        _ = card.network_config  # validates the network description
        _ = card.target_normalization  # and the normalization methods
        return card


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) and s for s in v)


_CARD_TYPES = {
    "format_version": _is_int,
    "sources": _is_str_list,
    "target": lambda v: isinstance(v, str) and bool(v),
    "network": lambda v: isinstance(v, dict),
    "n_slices": _is_int,
    "schedule": lambda v: isinstance(v, str),
    "T": _is_int,
    "prediction": lambda v: isinstance(v, str),
    "normalization": lambda v: isinstance(v, dict) and isinstance(v.get("method"), str),
    "training": lambda v: isinstance(v, dict),
    "steps": _is_int,
    "wall_time_s": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "yoda_version": lambda v: isinstance(v, str),
    "notes": lambda v: isinstance(v, str),
}


# --------------------------------------------------------------------------------------------
# writing


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        else:
            return model


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, shapes, dtypes and bytes, in key order)."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().to("cpu", copy=True).contiguous()
        for k, v in unwrap_model(model).state_dict().items()
    }


def save_model(
    directory: str | os.PathLike,
    model: nn.Module,
    ema_model: nn.Module | None,
    card: ModelCard,
) -> Path:
    """Write a model directory (raw weights, EMA weights, then the card; each file atomically).

    Parameters
    ----------
    directory : path
        Created if needed; existing files are replaced.
    model, ema_model : Denoiser2p5D (possibly wrapped in DDP / torch.compile)
        Raw and EMA networks; ``ema_model=None`` stores the raw weights as the EMA weights.
    card : ModelCard
        Written as ``model.json``.

    Returns
    -------
    Path
        The directory.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    raw = _cpu_state(model)
    ema = _cpu_state(ema_model) if ema_model is not None else raw
    meta = {"format": "pt", "yoda_format_version": str(FORMAT_VERSION)}
    with atomic_path(directory / RAW_FILE) as tmp:
        save_file(raw, str(tmp), metadata=meta)
    with atomic_path(directory / MODEL_FILE) as tmp:
        save_file(ema, str(tmp), metadata=meta)
    write_text_atomic(directory / CARD_FILE, json.dumps(card.to_dict(), indent=2) + "\n")
    return directory


# --------------------------------------------------------------------------------------------
# reading


def read_card(directory: str | os.PathLike) -> ModelCard:
    """Read and check ``model.json`` of a model directory.

    Raises
    ------
    ModelError
        When the directory or card is missing, not JSON, or not a valid card.
    """
    directory = Path(directory)
    if not directory.exists():
        raise ModelError(f"model directory {directory} does not exist")
    if not directory.is_dir():
        raise ModelError(f"model path {directory} is not a directory")
    path = directory / CARD_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing: {directory} is not a yoda model directory")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from None
    return ModelCard.from_dict(data, origin=str(path))


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelError(f"{path} is missing")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises SafetensorError, OSError, ValueError, ...
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{path} is corrupted or not a safetensors file ({detail})") from None


def _check_state(path: Path, state: dict[str, torch.Tensor], expected: dict[str, Any]) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. '{missing[0]}')")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. '{unexpected[0]}')")
        raise ModelError(
            f"{path} does not hold the weights of the network described by {CARD_FILE}: "
            + "; ".join(parts)
        )
    for name, ref in expected.items():
        got = state[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise ModelError(
                f"{path}: tensor '{name}' has shape {tuple(got.shape)}, the network described "
                f"by {CARD_FILE} needs {tuple(ref.shape)}"
            )
        if not got.dtype.is_floating_point:
            raise ModelError(f"{path}: tensor '{name}' has non-float dtype {got.dtype}")
        if not bool(torch.isfinite(got).all()):
            raise ModelError(f"{path}: tensor '{name}' contains NaN or Inf values")


def build_model(card: ModelCard) -> Denoiser2p5D:
    """An untrained network with the architecture described by ``card``."""
    try:
        return Denoiser2p5D(
            card.network_config, n_slices=card.n_slices, n_sources=len(card.sources)
        )
    except ConfigError as exc:
        raise ModelError(f"model card describes an invalid network: {exc}") from None


def load_model(
    directory: str | os.PathLike,
    device: str | torch.device = "cpu",
    weights: str = "ema",
) -> tuple[Denoiser2p5D, ModelCard]:
    """Load a model directory (no code is executed: safetensors and JSON only).

    Parameters
    ----------
    directory : path
        A model directory written by :func:`save_model`.
    device : str or torch.device
        Where to put the network.
    weights : {"ema", "raw"}
        Which weights to load.

    Returns
    -------
    (Denoiser2p5D, ModelCard)
        The network in eval mode on ``device`` and its card.

    Raises
    ------
    ModelError
        Missing directory/files, corrupted weights, tensors that do not match the card's
        network (foreign file), or an invalid card.
    """
    if weights not in ("ema", "raw"):
        raise ConfigError(f"weights must be 'ema' or 'raw', got {weights!r}")
    directory = Path(directory)
    card = read_card(directory)
    path = directory / (MODEL_FILE if weights == "ema" else RAW_FILE)
    state = _read_weights(path)
    model = build_model(card)
    expected = model.state_dict()
    _check_state(path, state, expected)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model.to(device), card


# --------------------------------------------------------------------------------------------
# reference checkpoints (MONAI Generative DiffusionModelUNet state dicts)

_ANCHOR = "conv_in.conv.weight"
_EMA_HINTS = ("ema",)


def _reference_candidates(obj: Any, path: str = "", depth: int = 0) -> dict[str, dict]:
    """Flat tensor dicts found in a loaded checkpoint, keyed by "path|prefix"."""
    found: dict[str, dict] = {}
    if not isinstance(obj, dict) or depth > 4:
        return found
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}
    prefixes = sorted({k[: -len(_ANCHOR)] for k in tensors if k.endswith(_ANCHOR)})
    for prefix in prefixes:
        sub = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        found[f"{path}|{prefix}"] = sub
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, dict):
            found.update(_reference_candidates(value, f"{path}.{key}" if path else key, depth + 1))
    return found


def load_reference_state_dicts(
    checkpoint: str | os.PathLike, key: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Read a reference-implementation checkpoint safely and pick its raw and EMA state dicts.

    The file is read with ``torch.load(weights_only=True)``: tensors and plain containers
    only, so a file that would run code when unpickled is refused.

    Parameters
    ----------
    checkpoint : path
        ``.pt``/``.pth`` file holding a ``DiffusionModelUNet`` state dict, possibly nested under
        keys such as ``"model"``, ``"state_dict"`` or ``"ema"`` and possibly with a prefix such
        as ``"module."``.
    key : str, optional
        Dotted path of the entry to use for both raw and EMA weights (e.g. ``"ema"`` or
        ``"model.state_dict"``). By default an entry whose path contains "ema" is the EMA
        weights and another one the raw weights (the same entry when there is only one).

    Returns
    -------
    (raw, ema, info)
        Two old-format state dicts (prefix removed) and ``{"raw": where, "ema": where,
        "step": int | None}``.
    """
    import pickle

    path = Path(checkpoint)
    if path.is_dir():
        raise ModelError(f"checkpoint {path} is a folder, not a checkpoint file")
    if not path.exists():
        raise ModelError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise ModelError(f"checkpoint {path} is not a regular file")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"{path}: refused to load: the file holds Python objects other than tensors and "
            f"plain containers, which could run code ({_unpickling_reason(exc)}); "
            "export a plain state dict from a trusted copy instead"
        ) from None
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path} is not a readable PyTorch checkpoint ({detail})") from None
    candidates = _reference_candidates(obj)
    if not candidates:
        top = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise ModelError(
            f"{path}: no DiffusionModelUNet state dict found (no '*{_ANCHOR}' tensor; "
            f"top-level entries: {top})"
        )
    if key is not None:
        chosen = {c: sd for c, sd in candidates.items() if c.split("|")[0] == key}
        if len(chosen) != 1:
            where = sorted({c.split("|")[0] or "(top level)" for c in candidates})
            raise ModelError(
                f"{path}: --key {key!r} does not select one state dict; available: {where}"
            )
        (name, sd) = next(iter(chosen.items()))
        info = {"raw": name, "ema": name}
        raw = ema = sd
    else:
        emas = sorted(c for c in candidates if any(h in c.lower() for h in _EMA_HINTS))
        raws = sorted(c for c in candidates if c not in emas)
        ema_name = emas[0] if emas else raws[0]
        raw_name = raws[0] if raws else ema_name
        raw, ema = candidates[raw_name], candidates[ema_name]
        info = {"raw": raw_name, "ema": ema_name}
    step = None
    if isinstance(obj, dict):
        for k in ("global_step", "step", "steps", "iteration"):
            if _is_int(obj.get(k)):
                step = obj[k]
                break
            if torch.is_tensor(obj.get(k)) and obj[k].numel() == 1:
                step = int(obj[k])
                break
    info["step"] = step
    return raw, ema, info


def _unpickling_reason(exc: Exception) -> str:
    """The informative part of torch's weights-only unpickling error."""
    import re

    text = str(exc)
    match = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if match:
        return f"it references {match.group(1)}"
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip()
    return "not a weights-only file"


def _old_names(new_key: str) -> list[str]:
    """Names a tensor of the current DiffusionModelUNet had in MONAI Generative (best first)."""
    names = [new_key]
    if ".attn.to_q." in new_key or ".attn.to_k." in new_key or ".attn.to_v." in new_key:
        names.append(new_key.replace(".attn.to_", ".to_"))
    if ".attn.out_proj." in new_key:
        names.append(new_key.replace(".attn.out_proj.", ".proj_attn."))
    if "transformer_blocks" in new_key and ".out_proj." in new_key:
        names.append(new_key.replace(".out_proj.", ".to_out.0."))
    if "postconv" in new_key:
        names.append(new_key.replace("postconv", "conv"))
    return names


def map_reference_state_dict(
    old: dict[str, torch.Tensor], unet: nn.Module, *, origin: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename an old-format (MONAI Generative) ``DiffusionModelUNet`` state dict for ``unet``.

    The renaming is that of MONAI's ``DiffusionModelUNet.load_old_state_dict`` (attention
    ``to_q/to_k/to_v`` moved under ``attn.``, ``proj_attn`` -> ``attn.out_proj``, upsampler
    ``conv`` -> ``postconv``; names already in the new format are kept), but strict: every
    tensor of ``unet`` must be found with the right shape and no tensor may be left over.

    Raises
    ------
    ModelError
        Naming the missing, left-over or mis-shaped tensors.
    """
    expected = unet.state_dict()
    new: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing = []
    for key, ref in expected.items():
        name = next((n for n in _old_names(key) if n in old and n not in used), None)
        if name is None:
            missing.append(key)
            continue
        tensor = old[name]
        if tuple(tensor.shape) != tuple(ref.shape):
            hint = ""
            if key == _ANCHOR:
                hint = (
                    f" (the checkpoint's network takes {tensor.shape[1]} input channels; "
                    f"n_slices x (1 + number of sources) must match)"
                )
            raise ModelError(
                f"{origin}: tensor '{name}' has shape {tuple(tensor.shape)}, the chosen network "
                f"needs {tuple(ref.shape)}{hint}; check --preset, --n-slices and --sources"
            )
        new[key] = tensor.to(ref.dtype)
        used.add(name)
    leftover = sorted(set(old) - used)
    if missing or leftover:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors of the network not found (e.g. '{missing[0]}')")
        if leftover:
            parts.append(f"{len(leftover)} unused tensors (e.g. '{leftover[0]}')")
        raise ModelError(
            f"{origin} does not match the chosen network: " + "; ".join(parts) + "; check --preset"
        )
    return new


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_modalities(sources: list[str], target: str) -> None:
    """Apply ``yoda train``'s rules to the modality names (shape, no duplicates, target apart)."""
    from yoda.config import DataConfig, TrainConfig, validate

    if not sources or not target:
        raise ConfigError("the sources and the target of the checkpoint must be named")
    validate(
        TrainConfig(data=DataConfig(sources=tuple(sources), target=target)), require_data=False
    )


def _check_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse an output path that is not a folder, or a non-empty folder unless ``force``."""
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise ConfigError(f"output {out_dir} exists and is not a folder")
        if not os.access(out_dir, os.R_OK | os.W_OK | os.X_OK):
            raise ConfigError(f"output folder {out_dir} is not writable")
        if not force and any(out_dir.iterdir()):
            raise ConfigError(
                f"output folder {out_dir} is not empty; pass --force to replace its model files"
            )
        return
    if not can_create(out_dir):
        raise ConfigError(f"cannot create {out_dir}: its parent cannot be made or written to")


def _save_staged(out_dir: Path, model: nn.Module, ema_model: nn.Module, card: ModelCard) -> Path:
    """Write a model directory in a hidden folder, then move its files into ``out_dir``.

    Nothing in ``out_dir`` changes before every file is written, so a failed write leaves no
    partial model behind; each move replaces one file atomically, the card last. Other files
    in ``out_dir`` are kept.
    """
    if out_dir.is_dir():
        stage_in = out_dir
    else:
        stage_in = out_dir.parent
        stage_in.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=stage_in))
    try:
        save_model(stage, model, ema_model, card)
        out_dir.mkdir(exist_ok=True)
        for name in (RAW_FILE, MODEL_FILE, CARD_FILE):
            os.replace(stage / name, out_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out_dir


def convert_reference_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    sources: list[str] | tuple[str, ...],
    target: str,
    network: NetworkConfig | str = "small",
    n_slices: int = 5,
    prediction: str = "v",
    schedule: str = "linear",
    T: int = 1000,
    normalization: dict[str, Any] | None = None,
    key: str | None = None,
    notes: str = "",
    force: bool = False,
) -> Path:
    """Import a checkpoint of the reference YODA implementation as a model directory.

    Parameters
    ----------
    checkpoint : path
        The reference ``.pt``/``.pth`` file (read with ``weights_only=True``).
    out_dir : path
        Model directory to write.
    sources, target : modality names
        Sources in the order the reference model was trained with, and the target; checked
        as ``yoda train`` checks them (lower-case words, distinct, the target not a source).
    network : NetworkConfig or preset name
        The architecture of the checkpoint ("small" for the paper's 53 M models).
    n_slices, prediction, schedule, T
        The diffusion set-up of the checkpoint (paper: 5, "v", "linear", 1000); T is at most
        ``MAX_T``.
    normalization : dict, optional
        Intensity normalization to record (default ``{"method": "percentile"}``).
    key : str, optional
        Entry of the checkpoint holding the weights (see :func:`load_reference_state_dicts`).
    notes : str
        Stored in the card.
    force : bool
        Replace the model files of an existing non-empty ``out_dir`` (refused otherwise, before
        the checkpoint is read).

    Returns
    -------
    Path
        The model directory.
    """
    from yoda.diffusion.schedule import PREDICTIONS, SCHEDULES

    if prediction not in PREDICTIONS:
        raise ConfigError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= MAX_T:
        raise ConfigError(f"T must be an integer in 1..{MAX_T}, got {T!r}")
    sources = list(sources)
    _check_modalities(sources, target)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, force)
    net_cfg = network if isinstance(network, NetworkConfig) else NetworkConfig.from_preset(network)
    model = Denoiser2p5D(net_cfg, n_slices=n_slices, n_sources=len(sources))
    ema_model = Denoiser2p5D(net_cfg, n_slices=n_slices, n_sources=len(sources))
    raw_old, ema_old, info = load_reference_state_dicts(checkpoint, key=key)
    path = Path(checkpoint)
    model.unet.load_state_dict(map_reference_state_dict(raw_old, model.unet, origin=str(path)))
    ema_model.unet.load_state_dict(map_reference_state_dict(ema_old, model.unet, origin=str(path)))
    card = ModelCard(
        sources=sources,
        target=target,
        network=net_cfg.to_dict(),
        n_slices=n_slices,
        schedule=schedule,
        T=T,
        prediction=prediction,
        normalization=dict(normalization or {"method": "percentile"}),
        training={
            "origin": "reference YODA checkpoint",
            "checkpoint": str(path.resolve()),
            "checkpoint_sha256": _sha256(path),
            "raw_entry": info["raw"],
            "ema_entry": info["ema"],
        },
        steps=int(info["step"] or 0),
        notes=notes,
    )
    return _save_staged(out_dir, model, ema_model, card)
