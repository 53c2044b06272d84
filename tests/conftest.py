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
