"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def phantom_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated cohort (4 mm voxels; 3 train, 1 val, 1 test subjects); its manifest.

    Shared by the whole session: tests must not modify its files.
    """
    from yoda.data.phantom import make_phantom

    out = tmp_path_factory.mktemp("phantom4mm")
    return make_phantom(out, 5, voxel_size=4.0, seed=0, counts=(3, 1, 1), progress=False)


#: Settings of the shared tiny model: fast learning for a short run (the paper's lr 1e-4
#: needs far more steps).
TINY_MODEL_STEPS = 160
TINY_MODEL_OVERRIDES = {
    "data.sources": ["t1w", "t2w"],
    "data.target": "flair",
    "data.normalization": "tissue",
    "model.preset": "tiny",
    "optim.batch_size": 8,
    "optim.lr": 2e-3,
    "optim.ema_decay": 0.99,
    "optim.high_t_share": 0.5,
    "run.steps": TINY_MODEL_STEPS,
    "run.device": "cpu",  # the same model on a GPU machine
    "run.precision": "fp32",
    "run.threads": 1,
    "run.log_every": 20,
    "run.val_every": 80,
    "run.val_slabs": 32,
    "run.val_images": 16,
    "run.checkpoint_every": 0,
}


@pytest.fixture(scope="session")
def tiny_model(phantom_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `tiny` model trained once per test session on ``phantom_cohort``; its model directory.

    The run directory (metrics.jsonl, cache/) is the model directory's parent. Shared by the
    whole session: tests must not modify its files.
    """
    import torch

    from yoda.config import TrainConfig, apply_overrides
    from yoda.train import train

    out = tmp_path_factory.mktemp("tiny-model") / "run"
    values = dict(
        TINY_MODEL_OVERRIDES, **{"data.manifest": str(phantom_cohort), "run.out": str(out)}
    )
    threads = torch.get_num_threads()
    try:
        return train(apply_overrides(TrainConfig(), values), progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch thread per test: the networks and volumes here are small, and on a busy
    2-core machine a second thread makes small operations many times slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def subject(phantom_cohort: Path) -> dict[str, Path]:
    """Files of the phantom's test subject (RAS, 4 mm): t1w, t2w, flair and mask."""
    folder = phantom_cohort.parent / "sub-004"
    return {role: folder / f"{role}.nii.gz" for role in ("t1w", "t2w", "flair", "mask")}
