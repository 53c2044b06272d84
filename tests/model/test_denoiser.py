"""Tests of the volume-level denoiser (the sampling hot path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from yoda.diffusion.schedule import make_schedule
from yoda.errors import ConfigError, InputError
from yoda.model import denoiser as denoiser_module
from yoda.model.denoiser import VolumeDenoiser, auto_batch_size
from yoda.model.network import Denoiser2p5D, NetworkConfig

AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
SHAPE = (13, 10, 11)  # no side is a multiple of 8: every view pads in-plane


class FakeNet(nn.Module):
    """Pixel-wise known function of its input channels.

    output = source 1 centre slice + 0.5 * x_t centre slice + 0.25 * x_t first slab slice
             + 0.125 * source 0 last slab slice

    The first and last slab slices reach beyond the volume's edges, where latent and sources
    must be padded with background (-1), as training pads them.
    """

    def __init__(self, n_slices=5, n_sources=2, in_multiple=8):
        super().__init__()
        self.n_slices, self.n_sources, self.in_multiple = n_slices, n_sources, in_multiple
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device
        self.calls = []

    def forward(self, x_t, t, cond):
        n = self.n_slices
        self.calls.append((tuple(x_t.shape), tuple(cond.shape), t.clone()))
        r = n // 2
        out = cond[:, n + r] + 0.5 * x_t[:, r] + 0.25 * x_t[:, 0] + 0.125 * cond[:, n - 1]
        return out.unsqueeze(1) + self.anchor


def shifted(vol: torch.Tensor, axis: int, offset: int, fill: float = -1.0) -> torch.Tensor:
    """``out[i] = vol[i + offset]`` along ``axis`` (leading dims kept), ``fill`` outside."""
    axis = vol.ndim - 3 + axis
    out = torch.full_like(vol, fill)
    size = vol.shape[axis]
    if offset <= 0:
        out.narrow(axis, -offset, size + offset).copy_(vol.narrow(axis, 0, size + offset))
    else:
        out.narrow(axis, 0, size - offset).copy_(vol.narrow(axis, offset, size - offset))
    return out


def expected_fake(x_t: torch.Tensor, cond: torch.Tensor, view: str, n: int) -> torch.Tensor:
    axis, r = AXIS[view], n // 2
    return cond[1] + 0.5 * x_t + 0.25 * shifted(x_t, axis, -r) + 0.125 * shifted(cond[0], axis, r)


@pytest.mark.parametrize("view", ["axial", "coronal", "sagittal"])
@pytest.mark.parametrize(("n", "batch_size"), [(5, 7), (1, 4), (9, 2), (5, 100)])
def test_fake_model_reproduces_expected_volume(view, n, batch_size):
    gen = torch.Generator().manual_seed(0)
    cond = torch.rand((2, *SHAPE), generator=gen) * 2 - 1
    x_t = torch.randn((3, *SHAPE), generator=gen)
    net = FakeNet(n_slices=n)
    denoise = VolumeDenoiser(net, make_schedule(), "x0", cond, batch_size=batch_size)
    out = denoise(x_t, 500, view)
    torch.testing.assert_close(out, expected_fake(x_t, cond, view, n), rtol=0, atol=1e-6)
    depth = SHAPE[AXIS[view]]
    rows = sum(call[0][0] for call in net.calls)
    assert rows == 3 * depth  # every slice of every trajectory exactly once
    for x_shape, c_shape, t in net.calls:
        assert x_shape[0] <= max(batch_size, 1)
        assert x_shape[1] == n and c_shape[1] == 2 * n
        assert x_shape[2] % 8 == 0 and x_shape[3] % 8 == 0
        assert torch.all(t == 500) and t.dtype == torch.long


@pytest.mark.parametrize("compiled", [False, True])
def test_more_trajectories_than_a_batch_are_split_evenly(compiled):
    """5 trajectories in batches of 4: groups of 3 and 2 slices' rows (a compiled network
    pads the 2 to 3: 6 rows per slice, not 8 as groups of 4 and 1 padded to 4 would be)."""
    gen = torch.Generator().manual_seed(0)
    cond = torch.rand((2, *SHAPE), generator=gen) * 2 - 1
    x_t = torch.randn((5, *SHAPE), generator=gen)
    net = FakeNet()
    if compiled:  # what marks a torch.compile wrapper (not registered as a submodule)
        object.__setattr__(net, "_orig_mod", net)
    out = VolumeDenoiser(net, make_schedule(), "x0", cond, batch_size=4)(x_t, 500, "axial")
    torch.testing.assert_close(out, expected_fake(x_t, cond, "axial", 5), rtol=0, atol=1e-6)
    rows = [call[0][0] for call in net.calls]
    assert rows == ([3, 3] if compiled else [3, 2]) * SHAPE[AXIS["axial"]]


def test_automatic_batch_size_is_a_pixel_budget_per_device():
    # CUDA: 32 slices of 256^2, more of smaller slices, fewer of larger ones
    assert [auto_batch_size("cuda", s, s) for s in (64, 128, 240, 256, 512)] == [
        512, 128, 36, 32, 8
    ]  # fmt: skip
    # CPU: 8 slices of 256^2, at most 32; at least one
    assert [auto_batch_size("cpu", s, s) for s in (64, 128, 160, 256, 1024)] == [32, 32, 20, 8, 1]
    assert auto_batch_size(torch.device("cpu"), 256, 128) == 16
    assert auto_batch_size("meta", 256, 256) == 8  # other devices as the CPU


@pytest.mark.parametrize("compiled", [False, True])
def test_default_batches_follow_the_pixel_budget(monkeypatch, compiled):
    """No batch size: calls hold the budget's rows (here 8 slices of the padded 16 x 16: 2
    slices of 4 trajectories); a compiled network's last call is padded to them."""
    monkeypatch.setitem(denoiser_module.AUTO_BATCH_PIXELS, "cpu", 8 * 16 * 16)
    gen = torch.Generator().manual_seed(0)
    cond = torch.rand((2, *SHAPE), generator=gen) * 2 - 1
    x_t = torch.randn((4, *SHAPE), generator=gen)
    net = FakeNet()
    if compiled:
        object.__setattr__(net, "_orig_mod", net)
    out = VolumeDenoiser(net, make_schedule(), "x0", cond)(x_t, 500, "axial")
    torch.testing.assert_close(out, expected_fake(x_t, cond, "axial", 5), rtol=0, atol=1e-6)
    assert [c[0][0] for c in net.calls] == [8] * 5 + [8 if compiled else 4]  # 11 slices


@pytest.mark.parametrize(
    ("depth", "budget", "eager", "compiled"),
    [(11, 100, [11], [32]), (70, 100, [70], [96]), (70, 40, [40, 30], [40, 40])],
)
def test_views_shorter_than_the_batch(monkeypatch, depth, budget, eager, compiled):
    """A call never holds more slices than the view; a compiled network's calls are padded
    to a multiple of 32 slices (few input shapes), not to the whole batch."""
    monkeypatch.setattr(denoiser_module, "_AUTO_BATCH_MAX_CPU", 1000)
    monkeypatch.setitem(denoiser_module.AUTO_BATCH_PIXELS, "cpu", budget * 16 * 16)
    gen = torch.Generator().manual_seed(0)
    cond = torch.rand((2, 9, 10, depth), generator=gen) * 2 - 1
    x_t = torch.randn((1, 9, 10, depth), generator=gen)
    for rows, is_compiled in ((eager, False), (compiled, True)):
        net = FakeNet()
        if is_compiled:
            object.__setattr__(net, "_orig_mod", net)
        out = VolumeDenoiser(net, make_schedule(), "x0", cond)(x_t, 500, "axial")
        torch.testing.assert_close(out, expected_fake(x_t, cond, "axial", 5), rtol=0, atol=1e-6)
        assert [c[0][0] for c in net.calls] == rows


def test_predictions_are_converted_with_the_schedule():
    """A network that outputs 0: x0 = sqrt(ab) x_t for v, x_t / sqrt(ab) for eps, 0 for x0."""

    class Zero(FakeNet):
        def forward(self, x_t, t, cond):
            return torch.zeros_like(x_t[:, :1])

    sched = make_schedule("cosine", T=100)
    x_t = torch.randn(2, 6, 5, 7)
    cond = torch.zeros(2, 6, 5, 7)
    ab = float(sched.alpha_bar[40])
    for prediction, expected in [
        ("v", x_t * ab**0.5),
        ("eps", x_t / ab**0.5),
        ("x0", torch.zeros_like(x_t)),
    ]:
        out = VolumeDenoiser(Zero(), sched, prediction, cond, batch_size=5)(x_t, 40, "coronal")
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_nfe_counts_whole_volume_calls_and_3d_input():
    cond = torch.zeros(2, *SHAPE)
    denoise = VolumeDenoiser(FakeNet(), make_schedule(), "x0", cond, batch_size=16)
    assert denoise.nfe == 0
    denoise(torch.zeros(4, *SHAPE), 999, "axial")
    denoise(torch.zeros(1, *SHAPE), 999, "sagittal")
    single = denoise(torch.zeros(SHAPE), 999, "coronal")
    assert denoise.nfe == 3
    assert single.shape == SHAPE


def test_output_is_a_regular_tensor_and_cache_options_agree():
    gen = torch.Generator().manual_seed(1)
    cond = torch.rand((2, *SHAPE), generator=gen)
    x_t = torch.randn((2, *SHAPE), generator=gen)
    cached = VolumeDenoiser(FakeNet(), make_schedule(), "x0", cond, batch_size=6, cache_cond=True)
    direct = VolumeDenoiser(
        FakeNet(), make_schedule(), "x0", cond.numpy(), batch_size=6, cache_cond=False
    )
    for view in ("axial", "sagittal", "axial"):  # the second axial call reads the cache
        a, b = cached(x_t, 10, view), direct(x_t, 10, view)
        assert torch.equal(a, b)
        torch.testing.assert_close(a, expected_fake(x_t, cond, view, 5), rtol=0, atol=1e-6)
    assert set(cached._cache) == {"axial", "sagittal"}
    a.clamp_(-1, 1)  # the sampler may modify the result in place
    assert not a.is_inference()


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    cfg = NetworkConfig.from_preset("tiny")
    net = Denoiser2p5D(cfg, n_slices=5, n_sources=2).eval()
    with torch.no_grad():
        for p in net.parameters():  # the output convolution starts at zero
            p.add_(0.05 * torch.randn_like(p))
    return net


def test_batch_size_does_not_change_results(tiny_net):
    gen = torch.Generator().manual_seed(2)
    shape = (9, 12, 10)
    cond = torch.rand((2, *shape), generator=gen) * 2 - 1
    x_t = torch.randn((2, *shape), generator=gen)
    sched = make_schedule()
    small = VolumeDenoiser(tiny_net, sched, "v", cond, batch_size=3)
    big = VolumeDenoiser(tiny_net, sched, "v", cond, batch_size=64)
    for view in ("axial", "sagittal"):
        a, b = small(x_t, 999, view), big(x_t, 999, view)
        assert a.abs().mean() > 1e-3
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_is_close_to_float32(tiny_net):
    gen = torch.Generator().manual_seed(3)
    shape = (8, 8, 6)
    cond = torch.rand((2, *shape), generator=gen) * 2 - 1
    x_t = torch.randn((1, *shape), generator=gen)
    sched = make_schedule()
    ref = VolumeDenoiser(tiny_net, sched, "v", cond, batch_size=8)(x_t, 999, "axial")
    low = VolumeDenoiser(tiny_net, sched, "v", cond, batch_size=8, autocast_dtype="bf16")
    out = low(x_t, 999, "axial")
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.02


def test_invalid_arguments_raise():
    cond = torch.zeros(2, *SHAPE)
    sched = make_schedule()
    with pytest.raises(InputError, match="source"):
        VolumeDenoiser(FakeNet(), sched, "v", torch.zeros(3, *SHAPE))
    with pytest.raises(InputError):
        VolumeDenoiser(FakeNet(), sched, "v", np.zeros(SHAPE))
    with pytest.raises(ConfigError):
        VolumeDenoiser(FakeNet(), sched, "score", cond)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="batch size"):
            VolumeDenoiser(FakeNet(), sched, "v", cond, batch_size=bad)
    with pytest.raises(ConfigError):
        VolumeDenoiser(FakeNet(), sched, "v", cond, autocast_dtype="fp16")  # CPU
    denoise = VolumeDenoiser(FakeNet(), sched, "v", cond)
    with pytest.raises(InputError):
        denoise(torch.zeros(1, 13, 10, 12), 0, "axial")
    with pytest.raises(ConfigError):
        denoise(torch.zeros(1, *SHAPE), 1000, "axial")
    with pytest.raises(ConfigError):
        denoise(torch.zeros(1, *SHAPE), 0, "oblique")
