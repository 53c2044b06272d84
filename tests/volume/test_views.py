from __future__ import annotations

import pytest
import torch

from yoda.errors import ConfigError, InputError
from yoda.volume.views import (
    VIEW_AXIS,
    VIEWS,
    crop_inplane,
    extract_slabs,
    from_view,
    pad_inplane,
    to_view,
)


def _volume(*shape: int) -> torch.Tensor:
    # distinct values everywhere, so any misplaced voxel shows
    return torch.arange(int(torch.tensor(shape).prod()), dtype=torch.float32).reshape(shape)


def test_view_axes() -> None:
    assert VIEWS == ("axial", "coronal", "sagittal")
    assert VIEW_AXIS == {"sagittal": 0, "coronal": 1, "axial": 2}


@pytest.mark.parametrize(
    ("view", "expected"),
    [("axial", (2, 5, 3, 4)), ("coronal", (2, 4, 3, 5)), ("sagittal", (2, 3, 4, 5))],
)
def test_to_view_shapes_and_slices(view: str, expected: tuple[int, ...]) -> None:
    vol = _volume(2, 3, 4, 5)  # (B, X, Y, Z)
    v = to_view(vol, view)
    assert tuple(v.shape) == expected
    axis = VIEW_AXIS[view]
    for i in range(vol.shape[1 + axis]):
        # slice i of the view is the canonical slice i along the view's axis
        assert torch.equal(v[:, i], vol.select(1 + axis, i))


@pytest.mark.parametrize("view", [*VIEWS, 0, 1, 2])
@pytest.mark.parametrize("lead", [(), (2,), (2, 3)])
def test_view_round_trip_exact(view: str | int, lead: tuple[int, ...]) -> None:
    vol = torch.randn(*lead, 3, 4, 5)
    assert torch.equal(from_view(to_view(vol, view), view), vol)
    v = torch.randn(*lead, 6, 7, 8)
    assert torch.equal(to_view(from_view(v, view), view), v)


def test_view_errors() -> None:
    with pytest.raises(ConfigError):
        to_view(torch.zeros(2, 2, 2), "transverse")
    with pytest.raises(ConfigError):
        from_view(torch.zeros(2, 2, 2), 3)
    with pytest.raises(InputError):
        to_view(torch.zeros(2, 2), "axial")


def _naive_slabs(vol: torch.Tensor, n: int, pad: float, index: list[int]) -> torch.Tensor:
    B, C, D, H, W = vol.shape
    r = n // 2
    out = torch.empty(B * len(index), C * n, H, W, dtype=vol.dtype)
    for b in range(B):
        for j, i in enumerate(index):
            for c in range(C):
                for o in range(-r, r + 1):
                    k = i + o
                    if 0 <= k < D:
                        out[b * len(index) + j, c * n + o + r] = vol[b, c, k]
                    else:
                        out[b * len(index) + j, c * n + o + r] = pad
    return out


@pytest.mark.parametrize("n", [1, 5, 9])
@pytest.mark.parametrize(("B", "C"), [(1, 1), (2, 3)])
@pytest.mark.parametrize("D", [4, 7])
def test_extract_slabs_matches_naive(n: int, B: int, C: int, D: int) -> None:
    vol = _volume(B, C, D, 3, 2) + 1.0
    got = extract_slabs(vol, n)
    assert tuple(got.shape) == (B * D, C * n, 3, 2)
    assert torch.equal(got, _naive_slabs(vol, n, -1.0, list(range(D))))


@pytest.mark.parametrize("n", [1, 5, 9])
@pytest.mark.parametrize("as_tensor", [True, False])
def test_extract_slabs_index_subset(n: int, as_tensor: bool) -> None:
    vol = _volume(2, 2, 7, 4, 3)
    index = [6, 0, 3]
    idx = torch.tensor(index) if as_tensor else index
    got = extract_slabs(vol, n, pad_value=7.5, index=idx)
    assert torch.equal(got, _naive_slabs(vol, n, 7.5, index))
    if n == 5:
        # both edges padded: slice 0 lacks two before, slice 6 two after
        assert bool((got[1, :2] == 7.5).all()) and bool((got[0, 3:5] == 7.5).all())


def test_extract_slabs_centre_channel_is_the_slice() -> None:
    vol = torch.randn(2, 3, 6, 5, 4)
    got = extract_slabs(vol, 5).reshape(2, 6, 3, 5, 5, 4)
    assert torch.equal(got[:, :, :, 2], vol.permute(0, 2, 1, 3, 4))


def test_extract_slabs_from_view_of_volume() -> None:
    # the usual call: a canonical (B, X, Y, Z) volume through to_view, not contiguous
    vol = torch.randn(2, 5, 6, 4)
    v = to_view(vol, "coronal").unsqueeze(1)
    got = extract_slabs(v, 3, index=[2])
    assert torch.equal(got[0, 1], vol[0, :, 2, :]) and torch.equal(got[1, 0], vol[1, :, 1, :])


def test_extract_slabs_errors() -> None:
    vol = torch.zeros(1, 1, 4, 2, 2)
    for n in (0, 2, 4, -1):
        with pytest.raises(ConfigError):
            extract_slabs(vol, n)
    with pytest.raises(InputError):
        extract_slabs(torch.zeros(1, 4, 2, 2), 3)
    with pytest.raises(InputError):
        extract_slabs(vol, 3, index=[0, 4])
    with pytest.raises(InputError):
        extract_slabs(vol, 3, index=torch.zeros(2, 2, dtype=torch.long))


@pytest.mark.parametrize(("H", "W"), [(13, 7), (5, 9), (16, 8), (1, 1)])
@pytest.mark.parametrize("multiple", [1, 4, 8])
def test_pad_crop_round_trip(H: int, W: int, multiple: int) -> None:
    x = torch.randn(2, 3, H, W)
    padded, pads = pad_inplane(x, multiple, value=-1.0)
    Hp, Wp = padded.shape[-2:]
    assert Hp % multiple == 0 and Wp % multiple == 0
    assert H <= Hp < H + multiple and W <= Wp < W + multiple
    assert torch.equal(crop_inplane(padded, pads), x)
    wb, wa, hb, ha = pads
    assert (wb + wa, hb + ha) == (Wp - W, Hp - H)
    assert torch.equal(padded[..., hb : hb + H, wb : wb + W], x)
    border = torch.ones_like(padded, dtype=torch.bool)
    border[..., hb : hb + H, wb : wb + W] = False
    assert bool((padded[border] == -1.0).all())


def test_pad_inplane_errors() -> None:
    with pytest.raises(ConfigError):
        pad_inplane(torch.zeros(3, 3), 0)
    with pytest.raises(InputError):
        pad_inplane(torch.zeros(3), 4)


@pytest.mark.parametrize(("H", "W", "size"), [(13, 7, (16, 16)), (20, 9, (16, 12)), (5, 5, (6, 7))])
def test_pad_to_a_canvas_centres_the_image(H: int, W: int, size: tuple[int, int]) -> None:
    x = torch.randn(3, H, W)
    padded, pads = pad_inplane(x, 4, value=-1.0, size=size)
    Hp, Wp = padded.shape[-2:]
    assert (
        Hp == max(-(-H // 4), -(-size[0] // 4)) * 4 and Wp == max(-(-W // 4), -(-size[1] // 4)) * 4
    )
    wb, _, hb, _ = pads
    assert (hb, wb) == ((Hp - H) // 2, (Wp - W) // 2)  # the training sampler's placement
    assert torch.equal(crop_inplane(padded, pads), x)
    assert float(padded.sum()) == pytest.approx(float(x.sum()) - (Hp * Wp - H * W) * 3, abs=1e-3)
