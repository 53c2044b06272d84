"""Slicing views as axis permutations, 2.5D slab extraction and in-plane padding.

A canonical volume is indexed (..., X, Y, Z) (RAS+). A view moves its slicing axis to the
front of the last three dims, keeping the other two in canonical order:

=========  =============  ======================
view       slicing axis   (..., D, H, W)
=========  =============  ======================
axial      z              (..., Z, X, Y)
coronal    y              (..., Y, X, Z)
sagittal   x              (..., X, Y, Z)
=========  =============  ======================
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import torch
import torch.nn.functional as F

from yoda.errors import ConfigError, InputError

VIEWS = ("axial", "coronal", "sagittal")
VIEW_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}

# permutation of the last three dims (canonical -> view) and its inverse (view -> canonical)
_FORWARD = {"axial": (2, 0, 1), "coronal": (1, 0, 2), "sagittal": (0, 1, 2)}
_INVERSE = {name: tuple(perm.index(i) for i in range(3)) for name, perm in _FORWARD.items()}


def view_name(view: str | int) -> str:
    """Validate a view given by name or by its index in ``VIEWS``; return its name."""
    if isinstance(view, Integral) and not isinstance(view, bool) and 0 <= int(view) < 3:
        return VIEWS[int(view)]
    if isinstance(view, str) and view in VIEW_AXIS:
        return view
    raise ConfigError(f"unknown view {view!r}; choose one of {VIEWS} (or an index 0..2)")


def _permute_last3(x: torch.Tensor, perm: tuple[int, int, int], what: str) -> torch.Tensor:
    if x.ndim < 3:
        raise InputError(f"{what}: expected a tensor with >= 3 dims, got shape {tuple(x.shape)}")
    lead = x.ndim - 3
    return x.permute(*range(lead), *(lead + p for p in perm))


def to_view(vol: torch.Tensor, view: str | int) -> torch.Tensor:
    """Permute (..., X, Y, Z) to (..., D, H, W) with the view's slicing axis first.

    Returns a permuted view of ``vol`` (no copy; generally not contiguous).
    """
    return _permute_last3(vol, _FORWARD[view_name(view)], "to_view")


def from_view(v: torch.Tensor, view: str | int) -> torch.Tensor:
    """Exact inverse of :func:`to_view`: (..., D, H, W) back to (..., X, Y, Z)."""
    return _permute_last3(v, _INVERSE[view_name(view)], "from_view")


def _slice_index(index: torch.Tensor | Sequence[int] | None, D: int, device) -> torch.Tensor:
    if index is None:
        return torch.arange(D, device=device)
    if not isinstance(index, torch.Tensor):
        index = torch.as_tensor(list(index), dtype=torch.long)
    if index.ndim != 1 or index.dtype.is_floating_point or index.dtype == torch.bool:
        raise InputError(
            f"extract_slabs: index must be a 1-D integer tensor, got {index.dtype} "
            f"{tuple(index.shape)}"
        )
    if index.device.type == "cpu" and index.numel():
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= D:
            raise InputError(f"extract_slabs: slice index {lo}..{hi} outside 0..{D - 1}")
    return index.to(device=device, dtype=torch.long)


def extract_slabs(
    vol: torch.Tensor,
    n: int,
    pad_value: float = -1.0,
    index: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Gather the 2.5D slabs of n consecutive slices around each requested slice.

    Parameters
    ----------
    vol : torch.Tensor
        (B, C, D, H, W), already in view order (see :func:`to_view`).
    n : int
        Odd slab thickness; slice ``i`` gets slices ``i - n//2 .. i + n//2``.
    pad_value : float
        Value of slices beyond the volume's edges (background, -1 on the network scale).
    index : 1-D LongTensor or sequence of int, optional
        Centre slices (default: all ``D``). Ranges are checked for CPU tensors and sequences.

    Returns
    -------
    torch.Tensor
        (B * L, C * n, H, W) with L = len(index), volume-major (row ``b * L + j`` is volume
        ``b``, centre slice ``index[j]``) and channel-major (channel ``c`` occupies
        ``c*n .. c*n + n - 1``, slices in increasing order, the centre at ``c*n + n//2``).
    """
    if vol.ndim != 5:
        raise InputError(f"extract_slabs: expected (B, C, D, H, W), got shape {tuple(vol.shape)}")
    if isinstance(n, bool) or not isinstance(n, Integral) or n < 1 or n % 2 == 0:
        raise ConfigError(f"slab thickness n must be a positive odd integer, got {n!r}")
    B, C, D, H, W = vol.shape
    idx = _slice_index(index, D, vol.device)
    L = idx.shape[0]
    r = n // 2
    offsets = torch.arange(-r, r + 1, device=vol.device)
    pos = idx[:, None] + offsets[None, :]  # (L, n)
    inside = (pos >= 0) & (pos < D)
    slabs = vol.index_select(2, pos.clamp(0, D - 1).reshape(-1)).reshape(B, C, L, n, H, W)
    if r > 0:
        slabs.masked_fill_(~inside[None, None, :, :, None, None], pad_value)
    return slabs.permute(0, 2, 1, 3, 4, 5).reshape(B * L, C * n, H, W)


def _check_multiple(multiple: int) -> int:
    if isinstance(multiple, bool) or not isinstance(multiple, Integral) or multiple < 1:
        raise ConfigError(f"in-plane multiple must be a positive integer, got {multiple!r}")
    return int(multiple)


def pad_inplane(
    x: torch.Tensor,
    multiple: int,
    value: float = -1.0,
    size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Pad the last two dims (H, W) with ``value`` up to multiples of ``multiple``.

    With ``size`` the result is at least that large (each dimension still a multiple of
    ``multiple``): the image is centred on a canvas like the training slabs. The padding is
    split between both sides (the extra voxel, if odd, goes after).

    Returns
    -------
    padded : torch.Tensor
        ``x`` itself when no padding is needed.
    pads : tuple of int
        ``(w_before, w_after, h_before, h_after)`` in ``torch.nn.functional.pad`` order.
    """
    m = _check_multiple(multiple)
    if x.ndim < 2:
        raise InputError(f"pad_inplane: expected >= 2 dims, got shape {tuple(x.shape)}")
    H, W = x.shape[-2:]
    ph, pw = -H % m, -W % m
    if size is not None:
        ph = max(ph, int(size[0]) - H + (-int(size[0]) % m))
        pw = max(pw, int(size[1]) - W + (-int(size[1]) % m))
    pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    if ph == 0 and pw == 0:
        return x, pads
    return F.pad(x, pads, mode="constant", value=value), pads


def crop_inplane(x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """Undo :func:`pad_inplane` exactly (a slicing view of ``x``)."""
    wb, wa, hb, ha = pads
    H, W = x.shape[-2:]
    return x[..., hb : H - ha, wb : W - wa]
