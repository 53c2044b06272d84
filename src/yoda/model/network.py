"""The 2.5D denoiser: MONAI ``DiffusionModelUNet`` presets and the slab wrapper.

The network sees ``n`` consecutive slices of the noisy target (the diffusion latent ``x_t``)
and the same ``n`` slices of every source image, concatenated on the channel axis in the order
``[x_t slab, source_1 slab, ..., source_S slab]``, and predicts one channel for the centre
slice (v, eps or x0, depending on how it was trained; see :mod:`yoda.diffusion.schedule`).

Presets (parameter counts for ``n_slices=5`` and two sources, i.e. 15 input channels):

========  ==========================  ====================  =========  =========
preset    channels                    attention levels      heads      params
========  ==========================  ====================  =========  =========
tiny      16/32/64                    none (mid block only)  1 (mid)   0.64 M
small     128/128/256/256/512         F/F/T/T/T             0/0/1/1/2  53.5 M
large     256/256/512/512/1024        F/F/T/T/T             0/0/1/1/2  213.9 M
========  ==========================  ====================  =========  =========

``small`` is the paper's 53 M configuration (Sec. III-D) and ``large`` the 214 M one. MONAI's
U-Net always has one self-attention layer in its middle block, so ``tiny`` has a single
attention head at the coarsest level (64 channels, 1/16 of the slice's pixels).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from yoda.errors import ConfigError, ModelError

__all__ = ["PRESETS", "NetworkConfig", "Denoiser2p5D", "count_parameters"]

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "spatial_dims": 2,
        "num_res_blocks": 1,
        "channels": (16, 32, 64),
        "attention_levels": (False, False, False),
        "norm_num_groups": 8,
        "num_head_channels": 64,
    },
    "small": {
        "spatial_dims": 2,
        "num_res_blocks": 1,
        "channels": (128, 128, 256, 256, 512),
        "attention_levels": (False, False, True, True, True),
        "norm_num_groups": 32,
        "num_head_channels": 256,
    },
    "large": {
        "spatial_dims": 2,
        "num_res_blocks": 1,
        "channels": (256, 256, 512, 512, 1024),
        "attention_levels": (False, False, True, True, True),
        "norm_num_groups": 32,
        "num_head_channels": 512,
    },
}
"""Keyword arguments of ``DiffusionModelUNet`` (without in/out channels) for each preset."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class NetworkConfig:
    """Architecture of the U-Net backbone.

    Attributes
    ----------
    preset : str
        Name of the preset the fields came from (``"custom"`` when set by hand).
    channels : tuple of int
        Output channels of each resolution level (one ResNet block group per level).
    attention_levels : tuple of bool
        Whether each level has self-attention (the middle block always has it).
    num_res_blocks : int
        ResNet blocks per level in the encoder (the decoder has one more).
    norm_num_groups : int
        Groups of the group normalization; must divide every channel count.
    num_head_channels : int
        Channels per attention head (heads = channels // num_head_channels).
    use_flash_attention : bool
        Compute attention with ``torch.nn.functional.scaled_dot_product_attention`` (fused,
        memory-efficient). The same function with the same weights as the plain einsum
        attention (equal up to float rounding), so it is on by default; weights are
        interchangeable between both settings.
    """

    preset: str = "small"
    channels: tuple[int, ...] = (128, 128, 256, 256, 512)
    attention_levels: tuple[bool, ...] = (False, False, True, True, True)
    num_res_blocks: int = 1
    norm_num_groups: int = 32
    num_head_channels: int = 256
    use_flash_attention: bool = field(default=True)

    def __post_init__(self) -> None:
        if not isinstance(self.preset, str):
            raise ConfigError(f"network.preset must be a string, got {self.preset!r}")
        try:
            self.channels = tuple(self.channels)
            self.attention_levels = tuple(self.attention_levels)
        except TypeError as exc:
            raise ConfigError(
                "network.channels and network.attention_levels must be sequences"
            ) from exc
        if not self.channels or not all(_is_int(c) and c > 0 for c in self.channels):
            raise ConfigError(
                f"network.channels must be positive integers, got {list(self.channels)}"
            )
        if not all(isinstance(a, bool) for a in self.attention_levels):
            raise ConfigError(
                f"network.attention_levels must be booleans, got {list(self.attention_levels)}"
            )
        if len(self.attention_levels) != len(self.channels):
            raise ConfigError(
                f"network.attention_levels has {len(self.attention_levels)} entries but "
                f"network.channels has {len(self.channels)}"
            )
        for name in ("num_res_blocks", "norm_num_groups", "num_head_channels"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"network.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.use_flash_attention, bool):
            raise ConfigError(
                "network.use_flash_attention must be true or false, "
                f"got {self.use_flash_attention!r}"
            )
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(
                f"network.norm_num_groups={self.norm_num_groups} does not divide channels {bad}"
            )
        attn_channels = [c for c, a in zip(self.channels, self.attention_levels, strict=True) if a]
        attn_channels.append(self.channels[-1])  # the middle block always has attention
        bad = sorted({c for c in attn_channels if c % self.num_head_channels})
        if bad:
            raise ConfigError(
                f"network.num_head_channels={self.num_head_channels} does not divide the "
                f"attention channels {bad}"
            )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> NetworkConfig:
        """Configuration of the preset ``name`` (tiny, small, large) with optional overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown network preset {name!r}; choose one of {sorted(PRESETS)}")
        kwargs = {k: v for k, v in PRESETS[name].items() if k != "spatial_dims"}
        kwargs.update(overrides)
        return cls(preset=name, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dictionary (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["channels"] = list(self.channels)
        out["attention_levels"] = list(self.attention_levels)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        if not isinstance(data, dict):
            raise ConfigError(f"network configuration must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown network configuration keys {unknown}")
        return cls(**data)

    @property
    def levels(self) -> int:
        """Number of resolution levels."""
        return len(self.channels)

    @property
    def in_multiple(self) -> int:
        """In-plane sizes must be multiples of this (``2 ** (levels - 1)``)."""
        return 2 ** (self.levels - 1)

    def unet_kwargs(self, in_channels: int, out_channels: int = 1) -> dict[str, Any]:
        """Keyword arguments of ``monai.networks.nets.DiffusionModelUNet``."""
        return {
            "spatial_dims": 2,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "num_res_blocks": self.num_res_blocks,
            "channels": self.channels,
            "attention_levels": self.attention_levels,
            "norm_num_groups": self.norm_num_groups,
            "num_head_channels": self.num_head_channels,
            "use_flash_attention": self.use_flash_attention,
        }


def _as_config(net_cfg: NetworkConfig | str | dict[str, Any]) -> NetworkConfig:
    if isinstance(net_cfg, NetworkConfig):
        return net_cfg
    if isinstance(net_cfg, str):
        return NetworkConfig.from_preset(net_cfg)
    if isinstance(net_cfg, dict):
        return NetworkConfig.from_dict(net_cfg)
    raise ConfigError(
        f"network configuration must be a NetworkConfig, preset name or dict, "
        f"got {type(net_cfg).__name__}"
    )


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module`` (works on the meta device too)."""
    return sum(p.numel() for p in module.parameters())


class Denoiser2p5D(nn.Module):
    """2.5D denoiser: ``n`` slices of ``x_t`` and of each source in, the centre slice out.

    Parameters
    ----------
    net_cfg : NetworkConfig, str or dict
        Backbone configuration (a preset name is accepted).
    n_slices : int
        Slab thickness ``n`` (odd: 1, 5 (default), 9, ...).
    n_sources : int
        Number of source images ``S``.

    Notes
    -----
    Input channels are ``n * (1 + S)``: channels ``0 .. n-1`` hold the ``x_t`` slab and channels
    ``n * (1 + s) .. n * (2 + s) - 1`` the slab of source ``s``; within a slab the slices run
    from ``i - n // 2`` to ``i + n // 2``.
    """

    def __init__(
        self,
        net_cfg: NetworkConfig | str | dict[str, Any],
        n_slices: int = 5,
        n_sources: int = 2,
    ) -> None:
        super().__init__()
        if not _is_int(n_slices) or n_slices < 1 or n_slices % 2 == 0:
            raise ConfigError(
                f"n_slices must be an odd positive integer (1, 5, 9), got {n_slices!r}"
            )
        if not _is_int(n_sources) or n_sources < 1:
            raise ConfigError(f"n_sources must be a positive integer, got {n_sources!r}")
        self.net_cfg = _as_config(net_cfg)
        self.n_slices = n_slices
        self.n_sources = n_sources
        self.unet = DiffusionModelUNet(**self.net_cfg.unet_kwargs(self.in_channels, 1))

    @property
    def in_channels(self) -> int:
        """Input channels of the U-Net: ``n_slices * (1 + n_sources)``."""
        return self.n_slices * (1 + self.n_sources)

    @property
    def in_multiple(self) -> int:
        """In-plane sizes must be multiples of this (``2 ** (levels - 1)``)."""
        return self.net_cfg.in_multiple

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor) -> torch.Tensor:
        """Raw network output for the centre slice.

        Parameters
        ----------
        x_t : Tensor (B, n, H, W)
            Slab of the noisy target.
        t : LongTensor (B,) or int
            Timesteps (0 .. T-1); an int or 0-d tensor is used for the whole batch.
        cond : Tensor (B, n * S, H, W)
            Source slabs, source-major.

        Returns
        -------
        Tensor (B, 1, H, W)
            v, eps or x0 of the centre slice, depending on the training target.
        """
        n, s = self.n_slices, self.n_sources
        if x_t.ndim != 4 or x_t.shape[1] != n or cond.ndim != 4 or cond.shape[1] != n * s:
            raise ModelError(
                f"denoiser expects x_t (B, {n}, H, W) and cond (B, {n * s}, H, W), got "
                f"{tuple(x_t.shape)} and {tuple(cond.shape)}"
            )
        m = self.in_multiple
        if x_t.shape[-1] % m or x_t.shape[-2] % m:
            raise ModelError(
                f"in-plane size {tuple(x_t.shape[-2:])} is not a multiple of {m}; pad the slices"
            )
        batch = x_t.shape[0]
        if not torch.is_tensor(t):
            t = torch.full((batch,), int(t), dtype=torch.long, device=x_t.device)
        elif t.ndim == 0:
            t = t.to(device=x_t.device).expand(batch)
        x = torch.cat([x_t, cond.to(x_t.dtype)], dim=1)
        return self.unet(x, timesteps=t)
