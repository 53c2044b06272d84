"""yoda bench: every figure is emitted; the speed options keep the outputs of the plain path."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from yoda.bench import (
    FIGURES,
    TARGETS,
    _write_model,
    _write_subject,
    format_report,
    random_network,
    run_bench,
)
from yoda.cli import main
from yoda.diffusion import sampling
from yoda.diffusion.schedule import make_schedule
from yoda.errors import ConfigError
from yoda.model.denoiser import VolumeDenoiser, compile_network
from yoda.translate import Translator
from yoda.volume.views import VIEWS

SHAPE = (11, 14, 9)  # no side a multiple of 4: every view pads in-plane


@pytest.fixture(scope="module")
def net():
    return random_network("tiny")


@pytest.fixture(scope="module")
def volume():
    gen = torch.Generator().manual_seed(0)
    cond = torch.rand((2, *SHAPE), generator=gen) * 2 - 1
    x_t = torch.randn((3, *SHAPE), generator=gen)
    return cond, x_t


def _all_views(den, x_t, t=999):
    return torch.stack([den(x_t, t, view) for view in VIEWS])


def _plain(net, cond, x_t, **options):
    den = VolumeDenoiser(net, make_schedule(), "v", cond, batch_size=7, **options)
    return _all_views(den, x_t)


# ------------------------------------------------------------------------------ the bench


def test_quick_bench_emits_every_figure(tmp_path):
    """Run with every translation option, so that every figure is measured."""
    path = tmp_path / "bench.json"
    result = run_bench(
        "cpu", "tiny", size="tiny", json_path=path, progress=False, threads=1,
        channels_last=True, compile="eager",
    )  # fmt: skip
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    assert result["precision"] == "fp32"  # the default, auto, as translate runs on the CPU
    assert list(result["figures"]) == list(FIGURES)
    for name, value in result["figures"].items():
        if value is None:
            assert result["notes"].get(name), f"{name} is null without a reason"
        else:
            assert isinstance(value, float) and math.isfinite(value) and value > 0, name
    assert set(result["targets"]) == set(TARGETS)
    # ratios of the same work: a step is at least its forward+backward, per-voxel ratios >= 1
    figures = result["figures"]
    assert figures["per_voxel_cost_ratio"] >= 1 and figures["per_flop_cost_ratio"] >= 1
    assert 0 < figures["network_efficiency"] < 10
    a = result["absolute"]
    assert a["translate_s"] > 0 and a["translate_network_s"] > 0
    assert a["network_gflops"] == pytest.approx(
        a["regression_flops"] / a["regression_network_s"] / 1e9, rel=1e-3
    )
    spv = a["seconds_per_volume"]
    assert [spv[m]["nfe"] for m in ("regression", "diffusion", "expa")] == [3, 251, 1004]
    # extrapolation: per-NFE time x NFE
    assert spv["diffusion"]["seconds"] == pytest.approx(a["per_nfe_diffusion_s"] * 251, rel=1e-3)
    assert spv["expa"]["seconds"] == pytest.approx(a["per_nfe_expa_s"] * 1004, rel=1e-3)
    assert "extrapolated" in spv["diffusion"]["how"] and "extrapolated" in spv["expa"]["how"]
    # the memory volume: regression measured, the others from its time per NFE
    large = a["seconds_per_large_volume"]
    assert large["grid"] == "32^3" and large["regression"]["nfe"] == 3
    assert "measured" in large["regression"]["how"]
    assert 0 < large["regression"]["sampling_seconds"] < large["regression"]["seconds"]
    reg = large["regression"]["seconds"]
    step = large["diffusion"]["seconds"] - reg  # 248 more NFE than regression
    assert step > 0
    assert large["expa"]["seconds"] - reg == pytest.approx(step * (1004 - 3) / 248, rel=1e-3)
    # compiling with the eager backend runs the same kernels: the same output, bit for bit
    assert figures["compile_speedup"] > 0
    assert result["details"]["option_max_abs_diff"]["compiled"] <= 2e-5  # padded last batches
    assert result["compile"] == "eager" and result["channels_last"] is True
    assert set(a["per_slice_s"]) == {"16^3", "32^3", "64^3"}
    assert result["figures"]["peak_memory_translate_mb"] > 0.1  # a 32^3 translation allocates
    # the bench leaves the process as it found it
    assert torch.get_num_threads() == 1
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.utils.deterministic.fill_uninitialized_memory


@pytest.mark.parametrize(("batch_size", "compile"), [(None, None), (3, None), (None, "eager")])
def test_translate_overhead_times_the_translation_s_own_network_calls(
    tmp_path, monkeypatch, batch_size, compile
):
    """The pure-network reference of ``translate_overhead`` makes the calls that the
    translation makes, input shapes and all (here several per view of 24 slices of 24 x 24:
    5 slices by the automatic batch, or 3, or compiled: the last call padded to 5)."""
    from collections import Counter

    from yoda.bench import _Bench
    from yoda.model import denoiser

    monkeypatch.setitem(denoiser.AUTO_BATCH_PIXELS, "cpu", 5 * 24 * 24)
    b = _Bench(torch.device("cpu"), "tiny", "tiny", "fp32", batch_size, False, tmp_path,
               compile=compile)  # fmt: skip
    b.setup()
    calls = []
    hook = b.model.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    b.translator.translate(b.sources, mode="regression")
    translation = Counter(calls)
    calls.clear()
    b.translate(1)  # two translations and two runs of the reference
    hook.remove()
    assert b.details["translate_calls"] == translation.total() > 3
    assert Counter(calls) == Counter({shape: 4 * k for shape, k in translation.items()})
    expected_rows = {3} if batch_size else {5} if compile else {5, 4}
    assert {shape[0] for shape in translation} == expected_rows


def test_bench_options_are_checked():
    with pytest.raises(ConfigError, match="size"):
        run_bench("cpu", "tiny", size="huge", progress=False)
    with pytest.raises(ConfigError, match="preset"):
        run_bench("cpu", "medium", size="tiny", progress=False)
    with pytest.raises(ConfigError, match="batch"):
        run_bench("cpu", "tiny", size="tiny", progress=False, batch_size=0)
    with pytest.raises(ConfigError, match="compile option 'fast'"):
        run_bench("cpu", "tiny", size="tiny", progress=False, compile="fast")
    with pytest.raises(ConfigError, match="precision must be one of .*'auto'"):
        run_bench("cpu", "tiny", size="tiny", progress=False, precision="fp64")


def test_bench_json_path_is_checked_before_the_bench_runs(tmp_path, capsys):
    """A path that cannot take the JSON fails at once, not after minutes of measuring."""
    (tmp_path / "t1.nii").write_bytes(b"an image")
    (tmp_path / "folder.json").mkdir()
    cases = {
        "t1.nii": "must end in .json",
        "folder.json": "is a folder",
        "t1.nii/x.json": "its folder cannot be made or written to",
    }
    for name, words in cases.items():
        assert main(["bench", "--quick", "--json", str(tmp_path / name), "--no-progress"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert (tmp_path / "t1.nii").read_bytes() == b"an image"


def _volume_result(device: str, preset: str, regression: float, diffusion: float) -> dict:
    row = {"nfe": 3, "how": "measured"}
    return {
        "preset": preset, "device": device, "size": "default", "precision": "fp32",
        "batch_size": 32, "seconds": 1.0, "machine": {"threads": 1},
        "figures": {}, "targets": {}, "notes": {},
        "absolute": {"seconds_per_large_volume": {
            "grid": "256^3",
            "regression": {**row, "seconds": regression},
            "diffusion": {**row, "nfe": 251, "seconds": diffusion},
            "expa": {**row, "nfe": 1004, "seconds": 4 * diffusion},
        }},
    }  # fmt: skip


def test_report_checks_the_gpu_targets_for_the_small_preset_on_cuda():
    lines = format_report(_volume_result("cuda:0", "small", 1.5, 200.0)).splitlines()
    rows = {line.split()[0]: line for line in lines if line.startswith("    ")}
    assert rows["regression"].endswith("[H100 target <= 2 s: ok]")
    assert rows["diffusion"].endswith("[H100 target <= 180 s: MISSED]")
    assert "target" not in rows["expa"]
    for device, preset in (("cpu", "small"), ("cuda", "tiny")):
        assert "H100" not in format_report(_volume_result(device, preset, 1.5, 200.0))
    quick = _volume_result("cuda", "small", 1.5, 200.0)
    quick["absolute"]["seconds_per_large_volume"]["grid"] = "32^3"  # --quick: no 256^3
    assert "H100" not in format_report(quick)


def test_cli_parses_and_reports_errors(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--preset", "medium"])
    assert "invalid choice" in capsys.readouterr().err
    assert main(["bench", "--device", "tpu", "--quick"]) == 1
    assert "device" in capsys.readouterr().err


# --------------------------------------------------------------- options keep the results


def test_source_cache_and_attention_setting_are_bitwise_identical(net, volume):
    cond, x_t = volume
    ref = _plain(net, cond, x_t)
    assert ref.abs().mean() > 1e-2  # a non-trivial network output
    assert torch.equal(_plain(net, cond, x_t, cache_cond=True), ref)
    assert torch.equal(_plain(net, cond, x_t, flash_attention=True), ref)  # the model's own


def test_compiled_network_sees_one_batch_shape_per_view(net, volume):
    """Partial batches are padded to the full batch for a compiled network (static shapes);
    the padding rows leave the other rows' x0_hat as they were."""
    from torch._dynamo.utils import counters

    cond, x_t = volume
    den = VolumeDenoiser(net, make_schedule(), "v", cond, batch_size=7, compile="eager")
    compiled, shapes = den._net, {}

    def spy(x, t, c):
        shapes.setdefault(x.shape[-2:], set()).add((x.shape[0], len(t), c.shape[0]))
        return compiled(x, t, c)

    spy._orig_mod = compiled._orig_mod  # the spy passes for the compiled network it wraps
    den._net = spy
    graphs = counters["stats"]["unique_graphs"]
    out = _all_views(den, x_t)  # 3 trajectories: 2 slices x 3 per call, then a partial call
    assert len(shapes) == 3 and all(s == {(6, 6, 6)} for s in shapes.values()), shapes
    assert counters["stats"]["unique_graphs"] - graphs == 3  # static: one graph per shape
    torch.testing.assert_close(out, _plain(net, cond, x_t), rtol=0, atol=2e-5)
    shapes.clear()
    one = torch.stack([den(x_t[0], 999, view) for view in VIEWS])  # 1 trajectory: 7 slices
    assert all(s == {(7, 7, 7)} for s in shapes.values()), shapes
    torch.testing.assert_close(one, out[:, 0], rtol=0, atol=2e-5)
    # a network compiled beforehand (as Translator and the bench pass it) is padded alike
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    given = VolumeDenoiser(net_compiled := compile_network(net, "eager"), make_schedule(), "v",
                           cond, batch_size=7)  # fmt: skip
    torch.testing.assert_close(_all_views(given, x_t), out, rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] - graphs == 3 and net_compiled is given._net


def test_channels_last_and_attention_kernel_agree_to_float32_rounding(net, volume):
    cond, x_t = volume
    ref = _plain(net, cond, x_t)
    for options in ({"channels_last": True}, {"flash_attention": False}):
        out = _plain(net, cond, x_t, **options)
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-5, msg=str(options))
    # the attention setting is the network's own again after the call
    flags = {m.use_flash_attention for m in net.modules() if hasattr(m, "use_flash_attention")}
    assert flags == {True}


def test_bf16_autocast_within_stated_tolerance(net, volume):
    """bf16 keeps 8 bits of mantissa: |x0_hat difference| <= 0.1 on [-1, 1] (13 on 0-255)."""
    cond, x_t = volume
    ref = _plain(net, cond, x_t)
    out = _plain(net, cond, x_t, autocast_dtype="bf16")
    diff = (out - ref).abs()
    assert diff.max() <= 0.1 and diff.mean() <= 0.01
    assert not torch.equal(out, ref)  # autocast really ran in bf16


def test_model_modes_are_restored_exactly(net, volume):
    cond, x_t = volume
    net.train()
    net.unet.time_embed.eval()  # a mixed state
    before = {name: m.training for name, m in net.named_modules()}
    VolumeDenoiser(net, make_schedule(), "v", cond)(x_t, 999, "axial")
    assert {name: m.training for name, m in net.named_modules()} == before
    net.eval()


def test_expa_batch_equals_trajectories_of_its_own_chunks(net):
    """The batched ExpA the bench times is the same computation as one trajectory per chunk."""
    gen = torch.Generator().manual_seed(1)
    cond = torch.rand((2, 8, 8, 6), generator=gen) * 2 - 1
    den = VolumeDenoiser(net, make_schedule(), "v", cond, batch_size=16)
    steps = sampling.timesteps_preview(make_schedule(), 3)
    sched = make_schedule()
    a = sampling.expa(den, (8, 8, 6), sched, n_ex=1, timesteps=steps, generator=gen.manual_seed(3))
    b = sampling.diffusion(den, (8, 8, 6), sched, timesteps=steps, generator=gen.manual_seed(3))
    torch.testing.assert_close(a.image, b.image, rtol=0, atol=1e-6)
    assert den.nfe == 2 * len(steps)


def test_translator_options_give_the_same_translation(tmp_path):
    model_dir = _write_model(tmp_path / "model", "tiny")
    paths = _write_subject(tmp_path / "subject", 20, seed=3)
    sources = {k: str(paths[k]) for k in ("t1w", "t2w")}
    plain = Translator.load(model_dir, device="cpu").translate(sources, seed=0).image
    assert plain.std() > 0
    for options in (
        {"cache_cond": True},
        {"channels_last": True},
        {"flash_attention": False},
        {"batch_size": 5},
    ):
        out = Translator.load(model_dir, device="cpu", **options).translate(sources, seed=0).image
        # 0-255 scale: float32 rounding of the network scale times 127.5
        np.testing.assert_allclose(out, plain, rtol=0, atol=5e-3, err_msg=str(options))
    cached = Translator.load(model_dir, device="cpu", cache_cond=True).translate(sources, seed=0)
    np.testing.assert_array_equal(cached.image, plain)


def test_training_step_does_not_depend_on_the_nan_fill(tmp_path):
    """Turning off the NaN fill of new tensors (deterministic mode) changes no result."""
    from yoda.config import TrainConfig, apply_overrides, validate
    from yoda.data.manifest import Manifest, Subject, write_manifest
    from yoda.train import _Trainer, weights_sha256

    subjects = [
        Subject(f"s{i}", "train", dict(_write_subject(tmp_path / f"s{i}", 16, seed=i)))
        for i in range(2)
    ]
    manifest = write_manifest(Manifest(subjects, tmp_path), tmp_path / "m.csv")
    hashes = []
    for fill in (True, False):
        config = apply_overrides(
            TrainConfig(),
            {
                "data.manifest": str(manifest),
                "data.sources": ["t1w", "t2w"],
                "data.target": "flair",
                "data.cache_dir": str(tmp_path / "cache"),
                "model.preset": "tiny",
                "optim.batch_size": 2,
                "optim.high_t_share": 0.5,
                "run.out": str(tmp_path / f"run{fill}"),
                "run.threads": 1,
                "run.steps": 3,
                "run.val_every": 0,
                "run.tensorboard": False,
            },
        )
        validate(config)
        trainer = _Trainer(config, progress=False, resume=False)
        try:
            trainer._prepare()
            torch.utils.deterministic.fill_uninitialized_memory = fill
            model = trainer.model.train()
            batches = iter(trainer._make_loader())
            params, ema = list(model.parameters()), list(trainer.ema.parameters())
            for _ in range(3):
                trainer._train_step(model, batches, params, ema)
            hashes.append((weights_sha256(model), weights_sha256(trainer.ema)))
        finally:
            torch.use_deterministic_algorithms(False)
            torch.utils.deterministic.fill_uninitialized_memory = True
    assert hashes[0] == hashes[1]
    assert trainer.ema_updates == 3


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("system", ["False", "False"]), ("keep", ["True", "False"]), ("", ["True", "True"])],
)
def test_cpu_allocator_switch(mode, expected):
    """YODA_CPU_ALLOCATOR: system leaves malloc alone, keep never gives memory back, default
    reuses blocks and gives free memory back after each denoiser call (glibc only)."""
    import os
    import platform
    import subprocess
    import sys

    if mode != "system" and platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt thresholds are glibc's")
    code = (
        "from yoda.model import denoiser as d; ok = d.tune_cpu_allocator(); "
        "d.release_cpu_memory(); print(ok, 'trim' in d._ALLOCATOR)"
    )
    env = {**os.environ, "YODA_CPU_ALLOCATOR": mode}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == expected
