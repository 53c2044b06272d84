"""The CUDA paths against the CPU: translation, reduced precision, compilation, training, bench.

Skipped where no GPU is present. ``pytest tests/test_cuda.py`` checks a GPU machine in a few
minutes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from yoda.bench import FIGURES, run_bench
from yoda.config import TrainConfig, apply_overrides
from yoda.diffusion.schedule import make_schedule
from yoda.model.checkpoint import load_model
from yoda.model.denoiser import VolumeDenoiser
from yoda.train import train
from yoda.translate import Translator
from yoda.volume.views import VIEWS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

#: fp32 against the CPU on the network's [-1, 1] scale (TF32 is off in these tests: its
#: 10-bit mantissa, cuDNN's default for fp32 convolutions, would add errors of ~1e-3).
FP32_ATOL = 1e-3
#: bf16 / fp16 autocast: within 0.1 of fp32 on the network's [-1, 1] scale (12.75 of 255).
AMP_ATOL = 12.75


@pytest.fixture(scope="module", autouse=True)
def _no_tf32():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture(scope="module")
def sources(subject) -> dict[str, Path]:
    return {"t1w": subject["t1w"], "t2w": subject["t2w"]}


@pytest.fixture(scope="module")
def cuda_regression(tiny_model, sources) -> np.ndarray:
    """fp32 regression on the GPU (its x_T comes from a CUDA generator: not the CPU's)."""
    res = Translator.load(tiny_model, device="cuda", precision="fp32").translate(sources, seed=0)
    assert res.info["device"].startswith("cuda")
    assert 0 < res.info["sampling_seconds"] <= res.info["seconds"]
    return res.image


def test_the_denoiser_on_cuda_matches_the_cpu(tiny_model):
    gen = torch.Generator().manual_seed(0)
    cond = torch.rand((2, 20, 24, 16), generator=gen) * 2 - 1
    x_t = torch.randn((2, 20, 24, 16), generator=gen)
    sched = make_schedule("linear", 1000)
    out = {}
    for device in ("cpu", "cuda"):
        model, _ = load_model(tiny_model, device=device)
        den = VolumeDenoiser(model, sched, "v", cond, batch_size=7, device=device)
        out[device] = torch.stack([den(x_t, t, v).cpu() for t in (999, 100) for v in VIEWS])
    assert out["cpu"].abs().mean() > 0.05
    torch.testing.assert_close(out["cuda"], out["cpu"], rtol=0, atol=FP32_ATOL)


def test_regression_on_cuda_differs_from_the_cpu_as_another_seed_does(
    tiny_model, sources, cuda_regression
):
    """Each device draws its own x_T; the one-step estimate barely depends on it."""
    tr = Translator.load(tiny_model, device="cpu")
    cpu = tr.translate(sources, seed=0).image
    spread = np.abs(tr.translate(sources, seed=1).image - cpu).max()
    assert cpu.std() > 1
    assert np.abs(cuda_regression - cpu).max() <= 2 * spread + 127.5 * FP32_ATOL


@pytest.mark.parametrize("precision", ["bf16", "fp16", "auto"])
def test_reduced_precision_on_cuda_within_tolerance(
    tiny_model, sources, cuda_regression, precision
):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    tr = Translator.load(tiny_model, device="cuda", precision=precision)
    assert tr.precision == ("fp16" if precision == "auto" else precision)
    out = tr.translate(sources, seed=0).image
    diff = np.abs(out - cuda_regression)  # the same seed on the same device: the same x_T
    assert diff.max() <= AMP_ATOL and diff.mean() <= AMP_ATOL / 10
    assert diff.max() > 0  # autocast really ran in reduced precision


@pytest.mark.parametrize(
    "options", [{"channels_last": True}, {"compile": "reduce-overhead"}, {"batch_size": 5}]
)
def test_speed_options_on_cuda_keep_the_translation(tiny_model, sources, cuda_regression, options):
    tr = Translator.load(tiny_model, device="cuda", precision="fp32", **options)
    first = tr.translate(sources, seed=0).image
    if "compile" in options:  # the network really ran as CUDA graphs
        from torch._dynamo.utils import counters

        assert counters["inductor"]["cudagraph_skips"] == 0
    np.testing.assert_allclose(
        first, cuda_regression, rtol=0, atol=127.5 * FP32_ATOL, err_msg=str(options)
    )
    # again on the same Translator: compiled code and CUDA graphs are replayed
    np.testing.assert_allclose(tr.translate(sources, seed=0).image, first, rtol=0, atol=0.05)


def test_diffusion_on_cuda_is_seeded(tiny_model, sources, cuda_regression):
    tr = Translator.load(tiny_model, device="cuda", precision="fp32")
    a = tr.translate(sources, mode="expa", n_ex=2, steps=3, seed=1).image
    b = tr.translate(sources, mode="expa", n_ex=2, steps=3, seed=1).image
    c = tr.translate(sources, mode="expa", n_ex=2, steps=3, seed=2).image
    np.testing.assert_allclose(a, b, rtol=0, atol=0.05)
    assert np.abs(a - c).max() > 1  # another seed, other noise
    # a short ExpA is still an estimate of the same image as regression
    mask = cuda_regression > 10
    assert np.corrcoef(a[mask], cuda_regression[mask])[0, 1] > 0.5  # 0.72 on the CPU


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_on_cuda(phantom_cohort, tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    overrides = {
        "data.manifest": str(phantom_cohort),
        "data.sources": ["t1w", "t2w"],
        "data.target": "flair",
        "data.cache_dir": str(tmp_path / "cache"),
        "model.preset": "tiny",
        "optim.batch_size": 8,
        "run.out": str(tmp_path / "run"),
        "run.device": "cuda",
        "run.precision": precision,
        "run.steps": 6,
        "run.log_every": 1,
        "run.val_every": 0,
        "run.checkpoint_every": 0,
        "run.tensorboard": False,
    }
    model_dir = train(apply_overrides(TrainConfig(), overrides), progress=False)
    model, card = load_model(model_dir, device="cpu", weights="raw")
    assert card.training["device"].startswith("cuda") and card.training["precision"] == precision
    assert all(torch.isfinite(p).all() for p in model.parameters())
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
    assert len(losses) >= 5 and all(math.isfinite(v) and v > 0 for v in losses)


def test_quick_bench_on_cuda_emits_every_figure():
    result = run_bench(
        "cuda", "tiny", size="tiny", progress=False, compile="default", precision="fp32"
    )
    assert result["machine"]["gpu"] == torch.cuda.get_device_name()
    for name in FIGURES:
        value = result["figures"][name]
        assert (value is not None and math.isfinite(value) and value > 0) or result["notes"][name]
    large = result["absolute"]["seconds_per_large_volume"]
    assert large["regression"]["seconds"] < large["diffusion"]["seconds"]
    assert result["details"]["option_max_abs_diff"]["compiled"] < 1e-2
