"""Training loop: learning, distributed training, checkpoints, exact resume, options, CLI."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import yoda.train as train_module
from yoda.cli import main
from yoda.config import TrainConfig, apply_overrides
from yoda.errors import ConfigError, ModelError
from yoda.model.checkpoint import build_model, load_model, read_card
from yoda.train import ema_decay_at, latest_checkpoint, learning_rate, train, weights_sha256


def _config(manifest: Path, out: Path, cache: Path | None = None, **overrides) -> TrainConfig:
    values = {
        "data.manifest": str(manifest),
        "data.sources": ["t1w", "t2w"],
        "data.target": "flair",
        "data.cache_dir": str(cache) if cache else None,
        "run.out": str(out),
        "model.preset": "tiny",
        "optim.batch_size": 4,
        "run.steps": 12,
        "run.threads": 1,
        "run.log_every": 1,
        "run.val_every": 4,
        "run.val_slabs": 8,
        "run.val_images": 4,
        "run.checkpoint_every": 4,
    }
    values.update(overrides)
    return apply_overrides(TrainConfig(), values)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _curve(run_dir: Path) -> list[tuple]:
    """Loss and validation entries in order (everything that depends on the arithmetic)."""
    out = []
    for e in _metrics(run_dir):
        if "loss" in e:
            out.append((e["step"], "loss", e["loss"], e["lr"]))
        if "val_loss" in e:
            out.append((e["step"], "val", e["val_loss"], e["val_loss_raw"], e.get("val_psnr")))
    return out


def _end(run_dir: Path) -> dict:
    return [e for e in _metrics(run_dir) if e.get("event") == "end"][-1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference_run(phantom_cohort, cache_dir, tmp_path_factory) -> Path:
    """An uninterrupted 24-step run (the oracle for the resume tests)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    cfg = _config(phantom_cohort, out, cache_dir, **{"run.steps": 24, "run.checkpoint_every": 0})
    train(cfg, progress=False)
    return out


# ------------------------------------------------------------------------------------------
# closed forms


def test_learning_rate_schedules():
    base = TrainConfig()
    assert learning_rate(base, 0, 100) == learning_rate(base, 99, 100) == 1e-4
    cos = apply_overrides(base, {"optim.lr_final": 1e-6})
    assert learning_rate(cos, 0, 100) == pytest.approx(1e-4)
    assert learning_rate(cos, 50, 100) == pytest.approx((1e-4 + 1e-6) / 2)
    assert learning_rate(cos, 100, 100) == pytest.approx(1e-6)
    lrs = [learning_rate(cos, s, 100) for s in range(100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    step = apply_overrides(cos, {"optim.lr_decay": "step", "optim.lr_step_at": 0.5})
    assert learning_rate(step, 49, 100) == 1e-4 and learning_rate(step, 50, 100) == 1e-6


def test_ema_warmup_formula():
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.999, 10) == pytest.approx(11 / 20)
    assert ema_decay_at(0.999, 10**6) == 0.999
    assert ema_decay_at(0.999, 0, warmup=False) == 0.999


# ------------------------------------------------------------------------------------------
# learning


@pytest.mark.slow
def test_tiny_model_learns_and_beats_the_mean_image(tiny_model):
    """A few hundred steps lower the validation loss clearly, and regression sampling of the
    EMA model beats the mean training target in PSNR on the held-out subject."""
    from yoda.data.cache import CachedCohort
    from yoda.data.normalize import from_network
    from yoda.diffusion.sampling import regression
    from yoda.diffusion.schedule import make_schedule
    from yoda.evaluate.metrics import psnr
    from yoda.model.denoiser import VolumeDenoiser

    model_dir = tiny_model
    out = model_dir.parent
    cache = out / "cache"
    vals = [e for e in _metrics(out) if "val_loss" in e]
    assert [e["step"] for e in vals] == [0, 80, 160]
    assert vals[-1]["val_loss"] < 0.5 * vals[0]["val_loss"]
    assert vals[-1]["val_psnr"] > vals[0]["val_psnr"] + 10

    model, card = load_model(model_dir)
    assert card.steps == 160 and card.training["subjects"] == 3
    assert card.training["voxel_sizes"] == [[4.0, 4.0, 4.0]]
    val = CachedCohort.open(next(cache.glob("index-val-*.json")))
    arr = val.load(0, mmap=False)
    sched = make_schedule(card.schedule, card.T)
    denoise = VolumeDenoiser(model, sched, card.prediction, torch.from_numpy(arr[1:3]))
    gen = torch.Generator().manual_seed(0)
    pred = regression(denoise, arr.shape[1:], sched, prediction=card.prediction, generator=gen)
    train_cohort = CachedCohort.open(next(cache.glob("index-train-*.json")))
    full_shape = tuple(val.entries[0]["full_shape"])
    fulls = []
    for i in range(len(train_cohort)):
        assert tuple(train_cohort.entries[i]["full_shape"]) == full_shape  # one phantom grid
        full = np.full(full_shape, -1.0, dtype=np.float32)
        full[train_cohort.bbox(i)] = train_cohort.load(i)[0]
        fulls.append(full)
    baseline = np.mean(fulls, axis=0)[val.bbox(0)]
    mask = arr[-1] > 0
    ref = from_network(arr[0])
    p_model = psnr(from_network(pred.image.numpy()), ref, mask)
    p_mean = psnr(from_network(baseline), ref, mask)
    assert p_model > p_mean + 1.0, (p_model, p_mean)


# ------------------------------------------------------------------------------------------
# distributed


def test_two_process_gloo_run_keeps_ranks_identical(phantom_cohort, cache_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
        "-m", "yoda", "train",
        "--data", str(phantom_cohort), "--sources", "t1w", "t2w", "--target", "flair",
        "--out", str(out), "--cache-dir", str(cache_dir), "--preset", "tiny",
        "--steps", "4", "--batch-size", "8", "--micro-batch", "2", "--log-every", "1",
        "--val-every", "0", "--checkpoint-every", "2", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = _metrics(out)[0]
    assert start["world_size"] == 2 and start["accumulation"] == 2 and start["micro_batch"] == 2
    end = _end(out)
    raw, ema, first = (
        end["rank_weights_sha256"],
        end["rank_ema_sha256"],
        end["rank_first_batch_sha256"],
    )
    assert len(raw) == 2 and raw[0] == raw[1]  # identical weights on both ranks
    assert ema[0] == ema[1]
    assert first[0] != first[1]  # each rank drew its own slabs
    model, card = load_model(out / "model")
    assert weights_sha256(model) == ema[0]  # rank 0 saved what the ranks agree on
    assert card.training["world_size"] == 2 and card.steps == 4
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == "step-00000004"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "COMPLETE",
        "rank-0.pt",
        "rank-1.pt",
        "state.pt",
    ]


# ------------------------------------------------------------------------------------------
# checkpoints and resume


class _Killed(BaseException):
    """Stands for the process being killed (not an Exception: nothing may catch it)."""


def test_kill_during_checkpoint_save_then_resume_is_exact(
    phantom_cohort, cache_dir, reference_run, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    cfg = _config(phantom_cohort, out, cache_dir, **{"run.steps": 24, "run.checkpoint_every": 8})
    real_save = train_module._save_file

    def dying_save(obj, path):
        if ".tmp-step-00000016" in str(path) and path.name == "state.pt":
            raise _Killed  # rank file of step 16 written, state not yet
        real_save(obj, path)

    monkeypatch.setattr(train_module, "_save_file", dying_save)
    monkeypatch.setattr(sys, "argv", ["yoda", "train", "--out", "run", "--steps", "24"])
    with pytest.raises(_Killed):
        train(cfg, progress=False)
    monkeypatch.setattr(train_module, "_save_file", real_save)
    monkeypatch.setattr(sys, "argv", ["yoda", "train", "--out", "run", "--resume"])
    assert latest_checkpoint(out).name == "step-00000008"
    assert (out / "checkpoint" / ".tmp-step-00000016").exists()  # the torn save
    assert max(e["step"] for e in _metrics(out)) == 16  # logged past the checkpoint

    train(cfg, progress=False, resume=True)
    assert _curve(out) == _curve(reference_run)
    assert _end(out)["rank_weights_sha256"] == _end(reference_run)["rank_weights_sha256"]
    assert _end(out)["rank_ema_sha256"] == _end(reference_run)["rank_ema_sha256"]
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["step-00000024"]
    a, card = load_model(out / "model")
    b, _ = load_model(reference_run / "model")
    assert weights_sha256(a) == weights_sha256(b)
    # the card keeps the command that started the run, and the one that resumed it
    assert card.training["command"] == "yoda train --out run --steps 24"
    assert card.training["resumed_with"] == ["yoda train --out run --resume"]


def test_sigkill_at_any_moment_then_resume_is_exact(
    phantom_cohort, cache_dir, reference_run, tmp_path
):
    out = tmp_path / "run"
    cfg = _config(phantom_cohort, out, cache_dir, **{"run.steps": 24, "run.checkpoint_every": 3})
    from yoda.config import save_config

    cfg_path = save_config(cfg, tmp_path / "cfg.yaml")
    cmd = [sys.executable, "-m", "yoda", "train", "--config", str(cfg_path), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marker = out / "checkpoint" / "step-00000006" / "COMPLETE"
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    done = latest_checkpoint(out)
    assert done is not None and int(done.name[5:]) < 24  # killed before the end

    # resume with a fresh call of the command line (the run's config.yaml is the base)
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert _curve(out) == _curve(reference_run)
    assert _end(out)["rank_weights_sha256"] == _end(reference_run)["rank_weights_sha256"]


def test_disk_full_keeps_previous_checkpoint_and_training_goes_on(
    phantom_cohort, cache_dir, tmp_path, monkeypatch, caplog
):
    out = tmp_path / "run"
    # two DataLoader workers here, none when resuming: the slab stream must not depend on it
    cfg = _config(phantom_cohort, out, cache_dir, **{"run.val_every": 0, "data.num_workers": 2})
    real_save = train_module._save_file

    def full_disk(obj, path):
        if "step-00000004" not in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(obj, path)

    monkeypatch.setattr(train_module, "_save_file", full_disk)
    with caplog.at_level(logging.WARNING, logger="yoda.train"):
        model_dir = train(cfg, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.name == "yoda.train"]
    assert len(warnings) == 2  # steps 8 and 12
    assert all("previous checkpoint is kept" in w and "No space left" in w for w in warnings)
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["step-00000004"]
    assert read_card(model_dir).steps == 12  # training finished
    finished = _end(out)["rank_weights_sha256"]
    curve = _curve(out)

    monkeypatch.setattr(train_module, "_save_file", real_save)
    cfg = apply_overrides(cfg, {"data.num_workers": 0})
    train(cfg, progress=False, resume=True)  # replays steps 5..12 from the kept checkpoint
    assert _end(out)["rank_weights_sha256"] == finished
    assert _curve(out) == curve

    # options that change the arithmetic cannot change on resume ...
    changed = apply_overrides(cfg, {"optim.lr": 5e-4})
    with pytest.raises(ConfigError, match=r"optim\.lr \(0\.0001 -> 0\.0005\)"):
        train(changed, progress=False, resume=True)
    # ... but the run can be extended
    longer = apply_overrides(cfg, {"run.steps": 14, "run.log_every": 2})
    train(longer, progress=False, resume=True)
    assert read_card(out / "model").steps == 14
    assert [e["step"] for e in _metrics(out) if "loss" in e][-2:] == [12, 14]


def test_run_directory_is_not_reused_without_resume(phantom_cohort, cache_dir, tmp_path):
    out = tmp_path / "run"
    cfg = _config(phantom_cohort, out, cache_dir, **{"run.steps": 1, "run.val_every": 0})
    train(cfg, progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg, progress=False)


@pytest.mark.parametrize("log_every", [1, 100], ids=["at-a-log-step", "at-a-checkpoint"])
def test_diverged_loss_stops_the_run_and_keeps_the_last_finite_checkpoint(
    phantom_cohort, cache_dir, tmp_path, log_every
):
    """lr 50 makes the loss NaN within a few steps: the run stops with a ConfigError before it
    saves anything, and the checkpoint and model directory of the step before stay usable."""
    out = tmp_path / "run"
    overrides = {
        "optim.lr": 50.0,
        "run.steps": 10,
        "run.log_every": log_every,
        "run.checkpoint_every": 1,
        "run.val_every": 0,
        "run.device": "cpu",
    }
    cfg = _config(phantom_cohort, out, cache_dir, **overrides)
    with pytest.raises(ConfigError, match=r"training diverged: .* at step (\d+) ") as info:
        train(cfg, progress=False)
    step = int(re.search(r"at step (\d+) ", str(info.value)).group(1))
    assert 2 <= step < 10
    assert f"checkpoint of step {step - 1} is kept" in str(info.value)
    # optim.lr is part of the configuration hash: a lower --lr needs a new run, not --resume
    assert (
        "start a new run (another --out) with a lower --lr, from the kept model "
        f"(--init {out / 'model'}) or from scratch"
    ) in str(info.value)
    assert [p.name for p in (out / "checkpoint").iterdir()] == [f"step-{step - 1:08d}"]
    state = train_module._load_file(latest_checkpoint(out) / "state.pt")
    assert all(torch.isfinite(v).all() for v in [*state["model"].values(), *state["ema"].values()])
    _, card = load_model(out / "model")  # refuses NaN weights
    assert card.steps == step - 1

    # the kept checkpoint resumes: the same run diverges again at the same step
    with pytest.raises(ConfigError, match=f"at step {step} "):
        train(cfg, progress=False, resume=True)
    assert latest_checkpoint(out).name == f"step-{step - 1:08d}"


def test_weights_that_are_not_finite_are_not_saved(
    phantom_cohort, cache_dir, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    overrides = {"run.steps": 6, "run.checkpoint_every": 2, "run.val_every": 0}
    cfg = _config(phantom_cohort, out, cache_dir, **overrides)
    real_step = train_module._Trainer._train_step

    def poisoning_step(self, *args):
        first = real_step(self, *args)
        if self.step == 2:  # step 3: the EMA (not part of the loss) gets an Inf
            next(self.ema.parameters()).data[0] = math.inf
        return first

    monkeypatch.setattr(train_module._Trainer, "_train_step", poisoning_step)
    with pytest.raises(ConfigError, match="the weights are not finite at step 4 .* step 2 is kept"):
        train(cfg, progress=False)
    assert [p.name for p in (out / "checkpoint").iterdir()] == ["step-00000002"]
    assert load_model(out / "model")[1].steps == 2


def _killed_before_step_4(phantom_cohort, cache_dir, tmp_path, monkeypatch, **overrides):
    """An uninterrupted 6-step run and one killed while saving its step-4 checkpoint (the
    step-2 one is complete): (reference run, killed run, its config)."""
    reference = tmp_path / "reference"
    train(
        _config(phantom_cohort, reference, cache_dir, **overrides, **{"run.checkpoint_every": 0}),
        progress=False,
    )
    out = tmp_path / "run"
    cfg = _config(phantom_cohort, out, cache_dir, **overrides, **{"run.checkpoint_every": 2})
    real_save = train_module._save_file

    def dying_save(obj, path):
        if ".tmp-step-00000004" in str(path):
            raise _Killed
        real_save(obj, path)

    monkeypatch.setattr(train_module, "_save_file", dying_save)
    with pytest.raises(_Killed):
        train(cfg, progress=False)
    monkeypatch.setattr(train_module, "_save_file", real_save)
    return reference, out, cfg


SIX_STEPS = {"run.steps": 6, "run.log_every": 3, "run.val_every": 0}


def test_running_loss_is_saved_per_rank_and_resumes_exactly(
    phantom_cohort, cache_dir, tmp_path, monkeypatch
):
    """A checkpoint between two log steps holds each rank's own running loss sum."""
    reference, out, cfg = _killed_before_step_4(
        phantom_cohort, cache_dir, tmp_path, monkeypatch, **SIX_STEPS
    )
    folder = latest_checkpoint(out)
    assert folder.name == "step-00000002"
    rank0 = train_module._load_file(folder / "rank-0.pt")
    assert rank0["loss_count"] == 2 and float(rank0["loss_sum"]) > 0  # steps 1 and 2
    assert "loss_sum" not in train_module._load_file(folder / "state.pt")

    # rank 1 restores its own sum, not rank 0's
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    train_module._save_file(
        {**rank0, "rank": 1, "loss_sum": torch.tensor(123.0), "loss_count": 2},
        copy / "checkpoint" / folder.name / "rank-1.pt",
    )
    other = apply_overrides(cfg, {"run.out": str(copy), "run.deterministic": False})
    trainer = train_module._Trainer(other, progress=False, resume=True)
    trainer._prepare()
    trainer.dist.rank = 1
    trainer._load_checkpoint(copy / "checkpoint" / folder.name)
    assert float(trainer.loss_sum) == 123.0 and trainer.loss_count == 2

    train(cfg, progress=False, resume=True)
    losses = [(e["step"], e["loss"]) for e in _metrics(out) if "loss" in e]
    assert [s for s, _ in losses] == [3, 6]
    assert losses == [(e["step"], e["loss"]) for e in _metrics(reference) if "loss" in e]
    assert _end(out)["rank_weights_sha256"] == _end(reference)["rank_weights_sha256"]


def test_checkpoint_of_the_previous_version_resumes_exactly(
    phantom_cohort, cache_dir, tmp_path, monkeypatch
):
    """Version 1 kept the running loss in state.pt; this yoda resumes it, writes version 2 and
    refuses a newer version cleanly."""
    reference, out, cfg = _killed_before_step_4(
        phantom_cohort, cache_dir, tmp_path, monkeypatch, **SIX_STEPS
    )
    real_save = train_module._save_file
    folder = latest_checkpoint(out)
    state = train_module._load_file(folder / "state.pt")
    rank0 = train_module._load_file(folder / "rank-0.pt")
    assert state["version"] == 2 and rank0["loss_count"] == 2
    state = {**state, "version": 1, "loss_sum": rank0.pop("loss_sum")}
    state["loss_count"] = rank0.pop("loss_count")
    del rank0["loss_skipped"]
    real_save(state, folder / "state.pt")
    real_save(rank0, folder / "rank-0.pt")

    newer = tmp_path / "newer"
    shutil.copytree(out, newer)
    real_save({**state, "version": 3}, latest_checkpoint(newer) / "state.pt")
    with pytest.raises(ModelError, match="checkpoint version 3 is not supported"):
        train(apply_overrides(cfg, {"run.out": str(newer)}), progress=False, resume=True)

    train(cfg, progress=False, resume=True)
    losses = [(e["step"], e["loss"]) for e in _metrics(out) if "loss" in e]
    assert losses == [(e["step"], e["loss"]) for e in _metrics(reference) if "loss" in e]
    assert _end(out)["rank_weights_sha256"] == _end(reference)["rank_weights_sha256"]
    assert train_module._load_file(latest_checkpoint(out) / "state.pt")["version"] == 2


class _SkippingScaler:
    """CUDA's GradScaler as the CPU can run it: an update whose gradients are not finite is
    skipped (at a fixed scale of 1)."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def is_enabled(self) -> bool:
        return True

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def unscale_(self, optimizer) -> None:
        pass

    def step(self, optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if all(bool(torch.isfinite(g).all()) for g in grads):
            optimizer.step()

    def update(self) -> None:
        pass

    def get_scale(self) -> float:
        return 1.0

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def test_scaled_run_leaves_an_overflowing_loss_out_of_the_mean(phantom_cohort, cache_dir, tmp_path):
    """With a gradient scaler, non-finite micro-batch losses are left out of the logged mean
    (and of the count it divides by); a window without any finite loss stops the run."""
    cfg = _config(
        phantom_cohort,
        tmp_path / "run",
        cache_dir,
        **{"optim.micro_batch": 2, "run.val_every": 0, "run.deterministic": False},
    )
    trainer = train_module._Trainer(cfg, progress=False, resume=False)
    trainer._prepare()
    assert trainer.accum == 2
    for loss in [1.0, 3.0, math.inf, 5.0]:  # step 2's first micro-batch overflowed
        trainer._add_loss(torch.tensor(loss), True)
    trainer.loss_count = 2
    assert trainer._window_loss() == (3.0, 1)  # (1 + 3 + 5) / 3
    assert float(trainer.loss_sum) == 4.5 and float(trainer.loss_skipped) == 1

    trainer.loss_sum.zero_()
    trainer.loss_skipped.zero_()
    for loss in [math.nan, math.inf]:
        trainer._add_loss(torch.tensor(loss), True)
    trainer.loss_count = 1
    value, skipped = trainer._window_loss()
    assert math.isnan(value) and skipped == 2

    # without a scaler (fp32, bf16) every loss counts: a non-finite one stops the run
    trainer.loss_sum.zero_()
    trainer.loss_skipped.zero_()
    for loss in [1.0, math.inf]:
        trainer._add_loss(torch.tensor(loss), False)
    assert trainer._window_loss() == (math.inf, 0)


def test_scaled_run_survives_an_overflow_and_resumes_exactly(
    phantom_cohort, cache_dir, tmp_path, monkeypatch
):
    """One overflowing forward pass: the scaler skips that update, the run goes on, and the
    count of left-out losses is part of the checkpoint."""
    monkeypatch.setattr(torch.amp, "GradScaler", _SkippingScaler)
    real_loss = train_module._Trainer._loss
    seen: list[tuple[str, int, float]] = []
    overflow = {"all": False}

    def overflowing_loss(self, model, inputs):
        loss = real_loss(self, model, inputs)
        if overflow["all"] or self.consumed == 6:  # step 2, first micro-batch
            loss = loss * math.inf
        seen.append((Path(self.config.run.out).name, self.consumed, float(loss.detach())))
        return loss

    monkeypatch.setattr(train_module._Trainer, "_loss", overflowing_loss)
    overrides = {**SIX_STEPS, "optim.micro_batch": 2, "run.device": "cpu"}
    reference, out, cfg = _killed_before_step_4(
        phantom_cohort, cache_dir, tmp_path, monkeypatch, **overrides
    )

    def logged(run_dir: Path) -> list[tuple]:
        entries = [e for e in _metrics(run_dir) if "loss" in e]
        return [(e["step"], e["loss"], e.get("losses_not_finite")) for e in entries]

    curve = logged(reference)
    assert [(step, left_out) for step, _, left_out in curve] == [(3, 1), (6, None)]
    assert [e["grad_scale"] for e in _metrics(reference) if "loss" in e] == [1.0, 1.0]
    first = [v for run, c, v in seen if run == "reference" and c <= 12 and math.isfinite(v)]
    assert len(first) == 5 and curve[0][1] == pytest.approx(sum(first) / 5, rel=1e-6)  # 1-3

    rank0 = train_module._load_file(latest_checkpoint(out) / "rank-0.pt")
    assert rank0["loss_count"] == 2 and float(rank0["loss_skipped"]) == 1
    train(cfg, progress=False, resume=True)
    assert logged(out) == curve
    assert _end(out)["rank_weights_sha256"] == _end(reference)["rank_weights_sha256"]

    overflow["all"] = True
    stopped = _config(phantom_cohort, tmp_path / "stopped", cache_dir, **overrides)
    with pytest.raises(ConfigError, match="no loss of steps 1-3 is finite at step 3"):
        train(stopped, progress=False)


def test_largest_seed_trains_and_validates(phantom_cohort, cache_dir, tmp_path):
    out = tmp_path / "run"
    overrides = {"run.seed": 2**64 - 1, "run.steps": 1, "run.val_every": 1, "run.val_slabs": 2}
    train(_config(phantom_cohort, out, cache_dir, **overrides), progress=False)
    assert [e["step"] for e in _metrics(out) if "val_loss" in e] == [0, 1]


# ------------------------------------------------------------------------------------------
# options of the paper and departures


@pytest.mark.parametrize(
    "overrides",
    [
        {"model.T": 1, "model.prediction": "x0", "model.n_slices": 1, "data.views": ["axial"]},
        {"model.prediction": "eps", "model.schedule": "cosine", "model.n_slices": 9},
        {
            "data.mask_weighting": True,
            "optim.micro_batch": 2,
            "optim.lr_final": 1e-5,
            "optim.lr_decay": "step",
            "optim.grad_clip": 1.0,
            "optim.high_t_share": 0.5,
            "data.normalization": "tissue",
        },
    ],
    ids=["regression-T1-x0-n1-axial", "eps-cosine-n9", "departures"],
)
def test_paper_options_and_departures_train(phantom_cohort, cache_dir, tmp_path, overrides):
    out = tmp_path / "run"
    cfg = _config(
        phantom_cohort,
        out,
        cache_dir,
        **{"run.steps": 4, "run.val_every": 4, "run.checkpoint_every": 0, **overrides},
    )
    model_dir = train(cfg, progress=False)
    model, card = load_model(model_dir)
    assert card.T == cfg.model.T and card.prediction == cfg.model.prediction
    assert card.n_slices == cfg.model.n_slices and card.schedule == cfg.model.schedule
    assert card.normalization["method"] == cfg.data.normalization
    assert model.in_channels == cfg.model.n_slices * 3
    losses = [e["loss"] for e in _metrics(out) if "loss" in e]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    val = [e for e in _metrics(out) if "val_loss" in e][-1]
    assert ("val_psnr" in val) == (cfg.model.prediction != "eps")  # no regression for eps
    start = _metrics(out)[0]
    assert start["accumulation"] == cfg.optim.batch_size // (cfg.optim.micro_batch or 4)
    if cfg.optim.lr_final is not None:
        assert [e["lr"] for e in _metrics(out) if "loss" in e] == [1e-4, 1e-4, 1e-4, 1e-5]


def test_ema_with_zero_decay_equals_raw_weights(phantom_cohort, cache_dir, tmp_path):
    out = tmp_path / "run"
    cfg = _config(
        phantom_cohort,
        out,
        cache_dir,
        **{"run.steps": 3, "optim.ema_decay": 0.0, "run.val_every": 0, "run.checkpoint_every": 0},
    )
    train(cfg, progress=False)
    end = _end(out)
    assert end["rank_weights_sha256"] == end["rank_ema_sha256"]
    ema, _ = load_model(out / "model")
    raw, _ = load_model(out / "model", weights="raw")
    assert weights_sha256(ema) == weights_sha256(raw)


# ------------------------------------------------------------------------------------------
# command line


def test_fine_tuning_starts_from_the_given_models_weights(
    phantom_cohort, cache_dir, tiny_model, tmp_path
):
    """One Adam step of lr 1e-9 moves no weight by more than ~1e-9 from the initial model."""
    out = tmp_path / "tuned"
    overrides = {"model.init": str(tiny_model), "run.steps": 1, "optim.lr": 1e-9}
    train(_config(phantom_cohort, out, cache_dir, **overrides), progress=False)
    start, _ = load_model(tiny_model)
    tuned, card = load_model(out / "model", weights="raw")
    fresh = build_model(card)  # randomly initialized
    a, b, c = (torch.cat([p.flatten() for p in m.parameters()]) for m in (start, tuned, fresh))
    assert (a - b).abs().max() < 1e-8
    assert (a - c).abs().max() > 1e-2  # a random network is far away
    assert card.training["init"] == str(tiny_model.resolve())


def test_fine_tuning_refuses_an_incompatible_model(
    phantom_cohort, cache_dir, tiny_model, tmp_path, capsys
):
    argv = [
        "train", "--data", str(phantom_cohort), "--sources", "t1w", "t2w", "--target", "flair",
        "--preset", "tiny", "--cache-dir", str(cache_dir), "--batch-size", "2", "--steps", "1",
        "--val-every", "0", "--threads", "1", "--no-progress", "--init", str(tiny_model),
        "--n-slices", "3", "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "slab thickness differ" in err[0]
    assert not (tmp_path / "run" / "model").exists()


def test_cli_train_and_errors(phantom_cohort, cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    base = [
        "train", "--data", str(phantom_cohort), "--sources", "t1w", "t2w", "--target", "flair",
        "--preset", "tiny", "--cache-dir", str(cache_dir), "--batch-size", "2", "--steps", "2",
        "--val-every", "0", "--threads", "1", "--no-progress",
    ]  # fmt: skip
    assert main([*base, "--out", str(out)]) == 0
    saved = (out / "config.yaml").read_text()
    assert "preset: tiny" in saved and "steps: 2" in saved
    assert read_card(out / "model").training["batch_size"] == 2

    assert main([*base, "--out", str(out)]) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "b"), "--device", "gpu"]) == 1
    assert "run.device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*base, "--out", str(tmp_path / "c"), "--device", "cuda"]) == 1
        assert "CUDA is not available" in capsys.readouterr().err
    assert (
        main([*base, "--out", str(tmp_path / "d"), "--batch-size", "6", "--micro-batch", "4"]) == 1
    )
    assert "micro_batch" in capsys.readouterr().err
    missing = tmp_path / "none.csv"
    assert main([*base[:2], str(missing), *base[3:], "--out", str(tmp_path / "e")]) == 1
    assert "does not exist" in capsys.readouterr().err
