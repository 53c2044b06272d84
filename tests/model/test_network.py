"""Tests of the U-Net presets and the 2.5D denoiser wrapper."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from yoda.errors import ConfigError, ModelError
from yoda.model.network import PRESETS, Denoiser2p5D, NetworkConfig, count_parameters


def meta_model(preset: str, n_slices: int = 5, n_sources: int = 2) -> Denoiser2p5D:
    with torch.device("meta"):
        return Denoiser2p5D(preset, n_slices=n_slices, n_sources=n_sources)


def test_parameter_counts_of_presets():
    assert 0.6e6 < count_parameters(meta_model("tiny")) < 1e6
    assert count_parameters(meta_model("small")) == pytest.approx(53.5e6, rel=0.01)
    assert count_parameters(meta_model("large")) == pytest.approx(213.9e6, rel=0.01)


def test_attention_heads_follow_the_paper():
    """small: heads 0/0/1/1/2 over the levels (and 2 in the middle block)."""
    model = meta_model("small")
    heads = []
    for block in model.unet.down_blocks:
        attns = getattr(block, "attentions", [])
        heads.append(sum(a.attn.num_heads for a in attns) // max(len(attns), 1))
    assert heads == [0, 0, 1, 1, 2]
    assert model.unet.middle_block.attention.attn.num_heads == 2
    large = meta_model("large")
    assert large.unet.middle_block.attention.attn.num_heads == 2


@pytest.mark.parametrize("n", [1, 5, 9])
def test_output_shape_and_in_channels(n):
    torch.manual_seed(0)
    model = Denoiser2p5D("tiny", n_slices=n, n_sources=2).eval()
    assert model.in_channels == 3 * n
    assert model.unet.conv_in.conv.in_channels == 3 * n
    x_t = torch.randn(3, n, 16, 12)
    cond = torch.randn(3, 2 * n, 16, 12)
    with torch.no_grad():
        out = model(x_t, torch.tensor([0, 10, 999]), cond)
    assert out.shape == (3, 1, 16, 12)


class Recorder(nn.Module):
    """Stands in for the U-Net and records what it receives."""

    def forward(self, x, timesteps):
        self.x, self.timesteps = x, timesteps
        return x[:, :1]


def test_channel_layout_is_xt_then_sources():
    model = Denoiser2p5D("tiny", n_slices=5, n_sources=2)
    model.unet = Recorder()
    x_t = torch.randn(2, 5, 8, 8)
    cond = torch.randn(2, 10, 8, 8)
    t = torch.tensor([3, 7])
    model(x_t, t, cond)
    torch.testing.assert_close(model.unet.x[:, :5], x_t, rtol=0, atol=0)
    torch.testing.assert_close(model.unet.x[:, 5:10], cond[:, :5], rtol=0, atol=0)
    torch.testing.assert_close(model.unet.x[:, 10:], cond[:, 5:], rtol=0, atol=0)
    assert torch.equal(model.unet.timesteps, t)
    model(x_t, 42, cond)  # an int timestep is broadcast over the batch
    assert torch.equal(model.unet.timesteps, torch.tensor([42, 42]))


@pytest.mark.parametrize("n", [0, 2, 4, -1])
def test_even_or_nonpositive_slab_raises(n):
    with pytest.raises(ConfigError, match="odd"):
        Denoiser2p5D("tiny", n_slices=n)


def test_wrong_input_shapes_raise():
    model = Denoiser2p5D("tiny", n_slices=5, n_sources=2)
    assert model.in_multiple == 4
    with pytest.raises(ModelError):
        model(torch.zeros(1, 5, 8, 8), 0, torch.zeros(1, 5, 8, 8))
    with pytest.raises(ModelError, match="multiple of 4"):
        model(torch.zeros(1, 5, 10, 8), 0, torch.zeros(1, 10, 10, 8))


def test_config_json_round_trip():
    for name in PRESETS:
        cfg = NetworkConfig.from_preset(name)
        back = NetworkConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg
        assert back.levels == len(PRESETS[name]["channels"])
    custom = NetworkConfig(
        preset="custom",
        channels=(8, 16),
        attention_levels=(False, True),
        num_res_blocks=2,
        norm_num_groups=4,
        num_head_channels=8,
        use_flash_attention=False,
    )
    back = NetworkConfig.from_dict(json.loads(json.dumps(custom.to_dict())))
    assert back == custom and back.in_multiple == 2
    assert NetworkConfig.from_preset("small").in_multiple == 16


def test_config_validation():
    with pytest.raises(ConfigError, match="unknown network preset"):
        NetworkConfig.from_preset("huge")
    with pytest.raises(ConfigError, match="unknown network configuration keys"):
        NetworkConfig.from_dict({"preset": "tiny", "depth": 3})
    with pytest.raises(ConfigError, match="norm_num_groups"):
        NetworkConfig.from_preset("tiny", norm_num_groups=5)
    with pytest.raises(ConfigError, match="num_head_channels"):
        NetworkConfig.from_preset("small", num_head_channels=384)
    with pytest.raises(ConfigError, match="attention_levels"):
        NetworkConfig(channels=(8, 16), attention_levels=(False,), norm_num_groups=8)


def test_fused_attention_gives_the_same_function():
    torch.manual_seed(0)
    cfg = NetworkConfig(
        preset="custom",
        channels=(16, 32),
        attention_levels=(False, True),
        norm_num_groups=8,
        num_head_channels=16,
    )
    fused = Denoiser2p5D(cfg, n_slices=1, n_sources=1).eval()
    plain = Denoiser2p5D(
        NetworkConfig.from_dict({**cfg.to_dict(), "use_flash_attention": False}), 1, 1
    ).eval()
    with torch.no_grad():
        for p in fused.parameters():  # the output convolution starts at zero
            p.normal_(0, 0.2)
    plain.load_state_dict(fused.state_dict())  # same weights, same keys
    x, c = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        a, b = fused(x, 5, c), plain(x, 5, c)
    assert a.abs().mean() > 1e-2
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
