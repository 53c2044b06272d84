"""Cohort cache (prepare_cache) and the random slab sampler."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare
from torch.utils.data import DataLoader

from yoda.data.cache import CachedCohort, index_path, load_subject_arrays, prepare_cache
from yoda.data.io import load_image
from yoda.data.manifest import Manifest, Subject
from yoda.data.normalize import (
    apply_intensity,
    crop,
    fit_intensity,
    foreground_mask,
    roi_bbox,
    to_network,
)
from yoda.data.sampler import SlabSampler
from yoda.errors import ConfigError, InputError
from yoda.volume.views import VIEWS, extract_slabs, to_view

SHAPE = (26, 30, 22)
MARGINS = (2, 3, 1)
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def _blob(shape, centre, radii):
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1


def _write(path: Path, data: np.ndarray) -> Path:
    nib.Nifti1Image(data.astype(np.float32), AFFINE).to_filename(path)
    return path


def make_subject(root: Path, sid: str, seed: int, *, with_mask: bool) -> Subject:
    rng = np.random.default_rng(seed)
    d = root / sid
    d.mkdir(parents=True, exist_ok=True)
    centre = np.array(SHAPE) / 2 + rng.uniform(-2, 2, 3)
    radii = np.array(SHAPE) * rng.uniform(0.25, 0.35, 3)
    head = _blob(SHAPE, centre, radii)
    brain = _blob(SHAPE, centre, radii * 0.7)
    images = {}
    for k, (name, level) in enumerate([("t1w", 100.0), ("t2w", 60.0), ("flair", 80.0)]):
        vol = head * level * (1 + 0.3 * brain * (k - 1)) + rng.normal(0, 2, SHAPE) ** 2
        images[name] = _write(d / f"{name}.nii.gz", vol)
    mask = _write(d / "mask.nii.gz", brain) if with_mask else None
    return Subject(sid, "train", images, mask=mask)


@pytest.fixture()
def cohort_files(tmp_path) -> Manifest:
    subjects = [make_subject(tmp_path / "data", f"s{i}", i, with_mask=i != 1) for i in range(3)]
    return Manifest(subjects, tmp_path / "data")


def _expected(subject: Subject, sources, target, method="tissue") -> np.ndarray:
    """Oracle: load + normalize + crop with the io/normalize functions directly."""
    vols = {m: load_image(subject.images[m])[0] for m in [target, *sources]}
    if subject.mask is not None:
        mask = load_image(subject.mask)[0] > 0
    else:
        mask = foreground_mask(vols[sources[0]])
    bbox = roi_bbox(mask, MARGINS)
    chans = [
        to_network(apply_intensity(vols[m], fit_intensity(vols[m], mask, method)))
        for m in [target, *sources]
    ]
    return np.stack([crop(c, bbox) for c in [*chans, mask.astype(np.float32)]])


# ----------------------------------------------------------------------------- cache


def test_cache_arrays_match_load_normalize_crop(cohort_files, tmp_path):
    cohort = prepare_cache(
        cohort_files, ["t1w", "t2w"], "flair", tmp_path / "cache", margins=MARGINS
    )
    assert cohort.ids == ["s0", "s1", "s2"] and sorted(cohort.rebuilt) == ["s0", "s1", "s2"]
    assert cohort.channels == ["flair", "t1w", "t2w", "mask"]
    for i, subject in enumerate(cohort_files):
        arr = cohort.load(i)
        assert isinstance(arr, np.memmap) and arr.dtype == np.float32
        ref = _expected(subject, ["t1w", "t2w"], "flair")
        assert arr.shape == ref.shape == tuple(cohort.entries[i]["shape"])
        assert arr.shape[1] < SHAPE[0]  # really cropped
        np.testing.assert_allclose(arr, ref, atol=1e-6)
        assert arr[:3].min() >= -1 and arr[:3].max() <= 1
        direct = load_subject_arrays(subject, ["t1w", "t2w"], "flair", "tissue", margins=MARGINS)
        np.testing.assert_array_equal(direct.data, np.asarray(arr))
        assert direct.mask_source == ("mask" if subject.mask else "foreground:t1w")
        assert set(cohort.entries[i]["intensity"]) == {"flair", "t1w", "t2w"}
    reopened = CachedCohort.open(cohort.index_path)
    assert reopened.entries == cohort.entries and reopened.sources == ["t1w", "t2w"]


def test_cache_is_reused_and_rebuilt_on_change(cohort_files, tmp_path):
    cache = tmp_path / "cache"
    first = prepare_cache(cohort_files, ["t1w"], "t2w", cache, margins=MARGINS)
    files = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npy")}
    assert len(files) == 3
    second = prepare_cache(cohort_files, ["t1w"], "t2w", cache, margins=MARGINS)
    assert second.rebuilt == [] and second.entries == first.entries
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npy")} == files

    # change one input file: only that subject is rebuilt, with the new content
    s2 = cohort_files.subject("s2")
    vol = nib.load(s2.images["t2w"]).get_fdata() * 0.5 + 7
    _write(s2.images["t2w"], vol)
    os.utime(s2.images["t2w"], ns=(1, 1))  # a different mtime even on coarse clocks
    third = prepare_cache(cohort_files, ["t1w"], "t2w", cache, margins=MARGINS)
    assert third.rebuilt == ["s2"]
    np.testing.assert_allclose(third.load(2), _expected(s2, ["t1w"], "t2w"), atol=1e-6)
    assert third.entries[2]["file"] != first.entries[2]["file"]
    assert not (cache / first.entries[2]["file"]).exists()  # the stale array is gone
    assert len(list(cache.glob("*.npy"))) == 3

    # a different normalization rebuilds everything
    fourth = prepare_cache(
        cohort_files, ["t1w"], "t2w", cache, margins=MARGINS, normalization="percentile"
    )
    assert sorted(fourth.rebuilt) == ["s0", "s1", "s2"]
    assert fourth.normalization["t2w"] == {"method": "percentile", "percentile": 99.9}
    assert not list(cache.glob(".*tmp"))

    # ... beside the other options' cache: each has its own index, and neither loses its arrays
    assert fourth.index_path != third.index_path
    assert fourth.index_path == index_path(
        cache, ["t1w"], "t2w", margins=MARGINS, normalization="percentile"
    )
    np.testing.assert_array_equal(CachedCohort.open(third.index_path).load(2), third.load(2))
    fifth = prepare_cache(cohort_files, ["t1w"], "t2w", cache, margins=MARGINS)
    assert fifth.rebuilt == [] and fifth.index_path == third.index_path
    assert len(list(cache.glob("*.npy"))) == 6


def test_cache_of_the_older_index_name_is_reused_and_its_index_removed(cohort_files, tmp_path):
    """A cache written as index-<split>.json (older yoda) is taken over without a rebuild."""
    cache = tmp_path / "cache"
    first = prepare_cache(cohort_files, ["t1w"], "t2w", cache, margins=MARGINS)
    files = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npy")}
    index = json.loads(first.index_path.read_text())
    first.index_path.unlink()
    (cache / "index-val.json").write_text(json.dumps({**index, "split": "val"}))
    # the older index also lists a subject since removed from the manifest
    gone = cache / f"s9.{'0' * 16}.npy"
    gone.write_bytes((cache / first.entries[0]["file"]).read_bytes())
    entry = {**index["subjects"][0], "id": "s9", "file": gone.name, "key": "0" * 64}
    (cache / "index-train.json").write_text(
        json.dumps({**index, "subjects": [*index["subjects"], entry]})
    )

    second = prepare_cache(cohort_files, ["t1w"], "t2w", cache, margins=MARGINS)
    assert second.rebuilt == [] and second.entries == first.entries
    assert second.index_path == first.index_path and second.index_path.is_file()
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npy")} == files
    assert not (cache / "index-train.json").exists()  # with the array only it listed
    assert (cache / "index-val.json").is_file()  # another split's index is not touched


def test_an_older_index_of_other_options_is_left_alone(cohort_files, tmp_path):
    """The older name held one index per split whatever its options: another run's index
    under that name, and its arrays, survive a run with other options."""
    cache = tmp_path / "cache"
    other = prepare_cache(
        cohort_files, ["t1w"], "t2w", cache, margins=MARGINS, normalization="percentile"
    )
    legacy = cache / "index-train.json"
    other.index_path.rename(legacy)
    arrays = sorted(p.name for p in cache.glob("*.npy"))
    mine = prepare_cache(cohort_files, ["t1w"], "t2w", cache, margins=MARGINS)
    assert sorted(mine.rebuilt) == ["s0", "s1", "s2"]
    assert legacy.is_file() and all((cache / name).is_file() for name in arrays)
    assert len(list(cache.glob("*.npy"))) == 6


def test_cache_input_errors(cohort_files, tmp_path):
    with pytest.raises(InputError, match="mask"):
        prepare_cache(cohort_files, ["t1w"], "t2w", tmp_path / "c", use_mask_weights=True)
    with pytest.raises(InputError, match="lacks pd"):
        prepare_cache(cohort_files, ["t1w"], "pd", tmp_path / "c")
    with pytest.raises(ConfigError):
        prepare_cache(cohort_files, ["t1w"], "t1w", tmp_path / "c")
    with pytest.raises(InputError, match="no subjects in split"):
        prepare_cache(cohort_files, ["t1w"], "t2w", tmp_path / "c", split="val")


# ----------------------------------------------------------------------------- sampler


@pytest.fixture()
def cohort(cohort_files, tmp_path) -> CachedCohort:
    return prepare_cache(cohort_files, ["t1w", "t2w"], "flair", tmp_path / "cache", margins=MARGINS)


def _same(a: dict, b: dict) -> bool:
    return all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def test_view_subject_and_slice_frequencies_are_uniform(cohort):
    sampler = SlabSampler(cohort, n_slices=5, in_multiple=8, seed=3, block=500)
    draws = np.array([sampler.draw(g) for g in range(6000)])
    subj, view, sl = draws.T
    assert chisquare(np.bincount(view, minlength=3)).pvalue > 1e-3
    assert chisquare(np.bincount(subj, minlength=3)).pvalue > 1e-3
    depth = sampler._depth
    for v in range(3):
        pick = (subj == 0) & (view == v)
        counts = np.bincount(sl[pick], minlength=depth[0, v])
        assert len(counts) == depth[0, v]  # never outside the ROI
        assert chisquare(counts).pvalue > 1e-3
    # a stream moving a third of the sagittal draws to axial fails the same test (power)
    skewed = np.bincount(np.where((view == 2) & (np.arange(view.size) % 3 == 0), 0, view))
    assert chisquare(skewed).pvalue < 1e-3


def test_sample_shapes_fixed_and_equal_reference_extraction(cohort):
    n = 5
    sampler = SlabSampler(cohort, n_slices=n, in_multiple=8, use_mask_weights=True, w_out=0.01)
    H, W = sampler.size
    assert H % 8 == 0 and W % 8 == 0
    seen_views, seen_edges = set(), 0
    for g in range(60):
        item = sampler.sample(g)
        assert item["target"].shape == (n, H, W) and item["cond"].shape == (2 * n, H, W)
        assert item["weight"].shape == (1, H, W) and item["target"].dtype == torch.float32
        i, v, s = sampler.draw(g)
        view = VIEWS[item["view"]]
        assert view == sampler.views[v] and item["subject"] == i and item["index"] == g
        vol = to_view(torch.from_numpy(cohort.load(i, mmap=False)), view)  # (C, D, h, w)
        ref = extract_slabs(vol[None, :3], n, -1.0, index=torch.tensor([s]))[0]
        h, w = ref.shape[-2:]
        pads = ((W - w) // 2, W - w - (W - w) // 2, (H - h) // 2, H - h - (H - h) // 2)
        ref = F.pad(ref, pads, value=-1.0)
        torch.testing.assert_close(torch.cat([item["target"], item["cond"]]), ref, rtol=0, atol=0)
        wref = F.pad(vol[3, s] * 0.99 + 0.01, pads, value=0.0)
        torch.testing.assert_close(item["weight"][0], wref)
        seen_views.add(view)
        seen_edges += s < n // 2 or s >= vol.shape[1] - n // 2
    assert seen_views == set(VIEWS) and seen_edges > 0
    # without mask weighting: ones inside the image, zero in the padding
    plain = SlabSampler(cohort, n_slices=n, in_multiple=8, use_mask_weights=False)
    wt = plain.sample(0)["weight"][0]
    assert set(wt.unique().tolist()) <= {0.0, 1.0} and wt.sum() > 0


def test_streams_per_worker_and_rank_and_reproducibility(cohort):
    def take(it, k):
        return [next(it) for _ in range(k)]

    def make(**kw):
        return SlabSampler(cohort, n_slices=3, in_multiple=4, seed=11, batch_size=4, **kw)

    w0 = take(make().iterate(0, 2), 12)
    w1 = take(make().iterate(1, 2), 12)
    assert [x["index"] for x in w0] == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]
    assert [x["index"] for x in w1] == [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]
    assert not any(_same(a, b) for a, b in zip(w0, w1, strict=True))
    r1 = take(make(rank=1).iterate(0, 2), 12)
    assert [x["index"] for x in r1] == [x["index"] for x in w0]
    assert [make(rank=1).draw(g) for g in range(50)] != [make().draw(g) for g in range(50)]
    again = take(make().iterate(0, 2), 12)
    assert all(_same(a, b) for a, b in zip(w0, again, strict=True))
    other_seed = SlabSampler(cohort, n_slices=3, in_multiple=4, seed=12)
    assert [other_seed.draw(g) for g in range(50)] != [make().draw(g) for g in range(50)]


def test_state_dict_resumes_the_identical_stream(cohort):
    a = SlabSampler(cohort, n_slices=3, in_multiple=4, seed=5, block=16)
    it = iter(a)
    first = [next(it) for _ in range(37)]
    state = a.state_dict()
    assert state["samples"] == 37
    rest = [next(it) for _ in range(20)]
    b = SlabSampler(cohort, n_slices=3, in_multiple=4, seed=0, block=16)
    b.load_state_dict(state)
    resumed = list(zip(range(20), b, strict=False))
    assert all(_same(x, y) for x, (_, y) in zip(rest, resumed, strict=True))
    fresh = SlabSampler(cohort, n_slices=3, in_multiple=4, seed=5, block=16)
    assert [x["index"] for x in first] == list(range(37))
    assert _same(fresh.sample(40), rest[3])
    with pytest.raises(ConfigError):
        b.load_state_dict({"samples": -1})


def test_dataloader_workers_deliver_the_rank_stream_in_order(cohort):
    sampler = SlabSampler(cohort, n_slices=3, in_multiple=4, seed=2, batch_size=4, num_samples=24)
    loader = DataLoader(sampler, batch_size=4, num_workers=2)
    batches = list(loader)
    assert len(batches) == 6
    index = torch.cat([b["index"] for b in batches])
    assert index.tolist() == list(range(24))
    ref = SlabSampler(cohort, n_slices=3, in_multiple=4, seed=2)
    target = torch.cat([b["target"] for b in batches])
    torch.testing.assert_close(target, torch.stack([ref.sample(g)["target"] for g in range(24)]))
    assert batches[0]["cond"].shape == (4, 6, *sampler.size)


def test_sampler_options_are_checked(cohort):
    with pytest.raises(ConfigError):
        SlabSampler(cohort, n_slices=4)
    with pytest.raises(ConfigError):
        SlabSampler(cohort, size=(8, 8))
    with pytest.raises(ConfigError):
        SlabSampler(cohort, views=("axial", "axial"))
    only_axial = SlabSampler(cohort, views=("axial",), in_multiple=4)
    assert {only_axial.sample(g)["view"] for g in range(20)} == {VIEWS.index("axial")}


class _Spy(torch.nn.Module):
    """Records the slabs it is given (one slice per call) and predicts zeros."""

    def __init__(self, n_slices: int, n_sources: int, in_multiple: int) -> None:
        super().__init__()
        self.n_slices, self.n_sources, self.in_multiple = n_slices, n_sources, in_multiple
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x_t, t, cond):
        self.inputs.append((x_t.clone(), cond.clone()))
        return torch.zeros_like(x_t[:, :1]) + self.anchor


def test_inference_on_the_training_canvas_sees_exactly_the_training_slabs(cohort):
    """A denoiser given the sampler's slab size feeds the network the very slabs training drew
    (same centring, same background), slice by slice and view by view."""
    from yoda.diffusion.schedule import make_schedule
    from yoda.model.denoiser import VolumeDenoiser

    n = 5
    sampler = SlabSampler(cohort, n_slices=n, in_multiple=8, seed=1)
    arr = torch.from_numpy(cohort.load(0, mmap=False))  # [target, t1w, t2w, mask]
    found = {}
    for g in range(2000):
        i, v, s = sampler.draw(g)
        if i == 0 and v not in found:
            found[v] = (g, s)
    assert len(found) == 3
    for v, (g, s) in found.items():
        item = sampler.sample(g)
        spy = _Spy(n, 2, 8)
        den = VolumeDenoiser(
            spy, make_schedule(), "x0", arr[1:3], batch_size=1, canvas=sampler.size
        )
        den(arr[0], 0, sampler.views[v])  # x_t = the clean target, as at t = 0
        x_slab, c_slab = spy.inputs[s]
        assert torch.equal(x_slab[0], item["target"]) and torch.equal(c_slab[0], item["cond"])
        plain = _Spy(n, 2, 8)
        VolumeDenoiser(plain, make_schedule(), "x0", arr[1:3], batch_size=1)(
            arr[0], 0, sampler.views[v]
        )
        assert plain.inputs[s][0].shape[-2:] != item["target"].shape[-2:]  # no canvas: differs
