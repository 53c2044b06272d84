"""Tests of yoda.data.normalize: intensity maps, foreground masks, ROI boxes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from yoda.data.normalize import (
    CT_WINDOW,
    NORMALIZATIONS,
    TISSUE_LEVEL,
    Intensity,
    apply_intensity,
    crop,
    fill_holes,
    fit_intensity,
    foreground_mask,
    from_network,
    gaussian,
    in_parts,
    invert_intensity,
    roi_bbox,
    to_network,
    uncrop,
)
from yoda.errors import ConfigError, InputError

SHAPE = (48, 56, 44)


def _radius(shape=SHAPE, semi_axes=(20.0, 24.0, 18.0)) -> np.ndarray:
    """Normalized ellipsoid radius (1 on the surface) around the volume centre."""
    grid = np.meshgrid(*[np.arange(n) - n / 2 + 0.5 for n in shape], indexing="ij")
    return np.sqrt(sum((g / a) ** 2 for g, a in zip(grid, semi_axes, strict=True)))


def _rician(clean: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    real = clean + sigma * rng.standard_normal(clean.shape)
    imag = sigma * rng.standard_normal(clean.shape)
    return np.hypot(real, imag).astype(np.float32)


def _brain(r: np.ndarray) -> np.ndarray:
    """Cortex 70, white matter 100, ventricles 30, background 0."""
    clean = np.where(r <= 1.0, 70.0, 0.0)
    clean[r < 0.75] = 100.0
    clean[r < 0.2] = 30.0
    return clean


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


# ---------------------------------------------------------------------------------------------
# intensity maps


def test_intensity_dict_round_trip():
    for method in NORMALIZATIONS:
        ints = Intensity(method=method, scale=0.37, offset=-12.5)
        data = json.loads(json.dumps(ints.to_dict()))
        assert Intensity.from_dict(data) == ints
    assert Intensity.from_dict({"method": "tissue", "scale": 2}) == Intensity("tissue", 2.0, 0.0)


@pytest.mark.parametrize(
    "data",
    [
        {"method": "zscore", "scale": 1.0},
        {"method": "ct"},
        {"method": "ct", "scale": -1.0},
        {"method": "ct", "scale": "big"},
        {"method": "ct", "scale": 1.0, "gain": 2.0},
        [1, 2],
    ],
)
def test_intensity_from_dict_rejects_bad_fields(data):
    with pytest.raises(ConfigError):
        Intensity.from_dict(data)


def test_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="zscore"):
        fit_intensity(np.ones((4, 4, 4)), method="zscore")


def test_percentile_maps_zero_and_percentile():
    rng = np.random.default_rng(0)
    vol = np.zeros((20, 20, 20), np.float32)
    vol[5:15, 5:15, 5:15] = rng.uniform(10.0, 500.0, size=(10, 10, 10))
    ints = fit_intensity(vol, method="percentile")
    p = np.percentile(vol[vol != 0], 99.9)
    assert ints.offset == 0.0 and ints.scale == pytest.approx(255.0 / p)
    out = apply_intensity(vol, ints)
    assert out.dtype == np.float32
    assert np.all(out[vol == 0] == 0.0)
    assert out.max() == 255.0
    assert np.count_nonzero(out == 255.0) == np.count_nonzero(vol >= p)
    # Zeros added outside do not move the scale (nonzero voxels only without a mask) ...
    padded = np.pad(vol, 10)
    assert fit_intensity(padded, method="percentile").scale == pytest.approx(ints.scale)
    # ... and a mask restricts the statistics.
    mask = np.zeros_like(vol, bool)
    mask[5:10] = True
    p_mask = np.percentile(vol[mask], 99.9)
    assert fit_intensity(vol, mask, method="percentile").scale == pytest.approx(255.0 / p_mask)
    p_50 = np.percentile(vol[vol != 0], 50.0)
    assert fit_intensity(vol, percentile=50.0).scale == pytest.approx(255.0 / p_50)


def test_tissue_maps_foreground_median_to_fixed_level():
    assert TISSUE_LEVEL == pytest.approx(102.0)
    rng = np.random.default_rng(1)
    r = _radius()
    mask = r <= 1.0
    vol = np.where(mask, rng.uniform(50.0, 150.0, SHAPE), 0.0).astype(np.float32)
    ints = fit_intensity(vol, mask, method="tissue")
    med = np.median(vol[mask])
    assert ints.scale == pytest.approx(TISSUE_LEVEL / med)
    out = apply_intensity(vol, ints)
    assert np.median(out[mask]) == pytest.approx(TISSUE_LEVEL, rel=1e-5)
    # Without a mask the automatic foreground is used: the ellipsoid, not the zeros.
    assert fit_intensity(vol, method="tissue").scale == pytest.approx(ints.scale, rel=0.01)


def test_ct_window_and_hu_round_trip():
    ints = fit_intensity(np.zeros((3, 3, 3)), method="ct")
    lo, hi = CT_WINDOW
    assert (lo, hi) == (-1000.0, 2000.0)
    hu = np.array([-1000.0, 500.0, 2000.0, -1500.0, 3000.0, 40.0], np.float32)
    x255 = apply_intensity(hu, ints)
    np.testing.assert_allclose(x255, [0.0, 127.5, 255.0, 0.0, 255.0, 88.4], atol=1e-4)
    back = invert_intensity(x255, ints)
    np.testing.assert_allclose(back, [-1000.0, 500.0, 2000.0, -1000.0, 2000.0, 40.0], atol=1e-3)
    rng = np.random.default_rng(2)
    inside = rng.uniform(lo, hi, 1000).astype(np.float32)
    np.testing.assert_allclose(
        invert_intensity(apply_intensity(inside, ints), ints), inside, atol=1e-3
    )


@pytest.mark.parametrize("method", ["percentile", "tissue"])
def test_apply_then_invert_recovers_unclipped_values(method):
    rng = np.random.default_rng(3)
    r = _radius()
    vol = _rician(_brain(r), 5.0, rng)
    ints = fit_intensity(vol, r <= 1.0, method=method)
    x255 = apply_intensity(vol, ints)
    back = invert_intensity(x255, ints)
    unclipped = (x255 > 0) & (x255 < 255)
    assert np.count_nonzero(unclipped) > 0.5 * vol.size
    np.testing.assert_allclose(back[unclipped], vol[unclipped], rtol=1e-5, atol=1e-4)
    assert np.all(back[x255 == 255] <= vol[x255 == 255] + 1e-3)


def test_network_scale():
    x255 = np.array([0.0, 127.5, 255.0])
    np.testing.assert_allclose(to_network(x255), [-1.0, 0.0, 1.0])
    np.testing.assert_allclose(from_network(to_network(x255)), x255)
    torch = pytest.importorskip("torch")
    t = torch.tensor([0.0, 51.0, 255.0])
    assert torch.allclose(from_network(to_network(t)), t)
    assert torch.allclose(to_network(t), torch.tensor([-1.0, -0.6, 1.0]))


def test_fit_errors_name_the_image():
    with pytest.raises(InputError, match="t2w.*empty"):
        fit_intensity(np.ones((5, 5, 5)), np.zeros((5, 5, 5), bool), name="t2w")
    with pytest.raises(InputError, match="t2w.*mask shape"):
        fit_intensity(np.ones((5, 5, 5)), np.ones((5, 5, 4), bool), name="t2w")
    with pytest.raises(InputError, match="t2w.*positive"):
        fit_intensity(-np.ones((5, 5, 5)), np.ones((5, 5, 5), bool), name="t2w")
    with pytest.raises(ConfigError):
        fit_intensity(np.ones((5, 5, 5)), percentile=0.0)


def test_tissue_is_more_stable_than_percentile():
    """Across noise levels and lesion loads the tissue scale varies far less."""
    rng = np.random.default_rng(4)
    r = _radius()
    brain = r <= 1.0
    clean = _brain(r)
    wm = np.flatnonzero((r > 0.3) & (r < 0.75))
    grid = np.indices(SHAPE).reshape(3, -1).T
    scales: dict[str, list[float]] = {"percentile": [], "tissue": []}
    for sigma in (3.0, 6.0, 9.0):
        for load in (0.0, 0.002, 0.005, 0.01):
            img = clean.copy()
            n_lesion = int(load * np.count_nonzero(brain))
            if n_lesion:
                centre = grid[rng.choice(wm)]
                dist = np.linalg.norm(grid - centre, axis=1)
                img.flat[np.argsort(dist)[:n_lesion]] = 180.0  # a compact bright lesion
            noisy = _rician(img, sigma, rng)
            for method in scales:
                scales[method].append(fit_intensity(noisy, brain, method=method).scale)
    cv = {m: np.std(v) / np.mean(v) for m, v in scales.items()}
    assert cv["tissue"] < 0.25 * cv["percentile"], cv
    assert cv["tissue"] < 0.06, cv


# ---------------------------------------------------------------------------------------------
# foreground mask


def _in_slice_structure(axis: int) -> np.ndarray:
    """The 4-neighbourhood within the slices along ``axis``, as a 3-D structuring element."""
    from scipy import ndimage

    plane = np.zeros((3, 3, 3), dtype=bool)
    index = [slice(None)] * 3
    index[axis] = 1
    plane[tuple(index)] = ndimage.generate_binary_structure(2, 1)
    return plane


@pytest.mark.parametrize("seed", range(6))
def test_fill_holes_equals_scipys_propagation(seed):
    """Oracle: scipy's binary_fill_holes, in 3-D and slice by slice along each axis."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(5, 19, size=3))
    # random blobs, dense enough to enclose holes and to touch the borders
    mask = ndimage.gaussian_filter(rng.standard_normal(shape), 1.0) > rng.uniform(-0.2, 0.2)
    ends = [max(4, n // 2 + 1) for n in shape]  # a box in one corner, random blobs elsewhere
    box = tuple(slice(1, e) for e in ends)
    inner = tuple(slice(2, e - 1) for e in ends)
    mask[box] = True
    mask[inner] = rng.random(mask[inner].shape) < 0.3  # a closed box with holes inside
    assert fill_holes(mask)[inner].all() and not mask[inner].all()
    np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
    for axis in range(3):
        expected = ndimage.binary_fill_holes(mask, structure=_in_slice_structure(axis))
        np.testing.assert_array_equal(fill_holes(mask, axis=axis), expected, err_msg=str(axis))
    assert not fill_holes(np.zeros(shape, bool)).any() and fill_holes(np.ones(shape, bool)).all()
    np.testing.assert_array_equal(fill_holes(mask, axis=-1), fill_holes(mask, axis=2))
    assert fill_holes(np.zeros((0, 3, 4), bool)).shape == (0, 3, 4)
    with pytest.raises(ConfigError, match="axis 3"):
        fill_holes(mask, axis=3)


@pytest.mark.parametrize("sigma", [4.0, 10.0, 25.0])
def test_foreground_mask_covers_noisy_ellipsoid(sigma):
    rng = np.random.default_rng(5)
    r = _radius((64, 72, 60), (26.0, 30.0, 24.0))
    truth = r <= 1.0
    vol = _rician(np.where(truth, np.where(r < 0.5, 60.0, 100.0), 0.0), sigma, rng)
    mask = foreground_mask(vol)
    assert mask.dtype == bool and mask.shape == vol.shape
    assert _dice(mask, truth) > 0.95


def test_foreground_mask_head_with_skull_and_bias():
    """Scalp, a dark skull, brain and dark ventricles under a bias field: the whole head."""
    rng = np.random.default_rng(6)
    shape = (64, 72, 60)
    r = _radius(shape, (26.0, 30.0, 24.0))
    head = np.where(r <= 1.0, 80.0, 0.0)
    head[r < 0.93] = 5.0
    head[r < 0.85] = 100.0
    head[r < 0.3] = 15.0
    bias = 1.0 + 0.4 * (np.arange(shape[2]) - shape[2] / 2) / 30.0
    mask = foreground_mask(_rician(head * bias, 8.0, rng))
    assert _dice(mask, r <= 1.0) > 0.95


def test_foreground_mask_skull_stripped_brain():
    """Exact-zero background and a dark CSF rim at the brain surface."""
    rng = np.random.default_rng(7)
    r = _radius()
    brain = np.where(r <= 1.0, 100.0, 0.0)
    brain[(r > 0.9) & (r <= 1.0)] = 30.0
    brain[r < 0.3] = 20.0
    vol = (brain * (1.0 + 0.05 * rng.standard_normal(SHAPE))).astype(np.float32)
    assert _dice(foreground_mask(vol), r <= 1.0) > 0.95


def test_foreground_mask_keeps_largest_component_and_fills_holes():
    vol = np.zeros((40, 40, 40), np.float32)
    vol[5:30, 5:30, 5:30] = 100.0
    vol[12:22, 12:22, 12:22] = 0.0  # an enclosed hole
    vol[34:37, 34:37, 34:37] = 100.0  # a small separate blob
    mask = foreground_mask(vol, sigma=0.0, closing=0)
    expected = np.zeros_like(mask)
    expected[5:30, 5:30, 5:30] = True
    assert np.array_equal(mask, expected)


@pytest.mark.parametrize("sigma", [0.6, 1.0, 2.5])
def test_gaussian_over_threads_is_scipys_filter_exactly(sigma):
    from scipy import ndimage

    vol = np.random.default_rng(3).standard_normal((23, 9, 11)).astype(np.float32)
    expected = ndimage.gaussian_filter(vol, sigma)
    for workers in (None, 1, 2, 5, 23, 40):
        np.testing.assert_array_equal(gaussian(vol, sigma, workers=workers), expected)


def test_in_parts_gives_each_part_its_neighbours():
    """A local function (a 3-wide moving sum along one axis) computed in parts: the same as
    on the whole array with enough neighbours, and visibly wrong without them."""
    arr = np.random.default_rng(4).standard_normal((5, 31, 6))

    def moving_sum(a):
        padded = np.pad(a, [(0, 0), (1, 1), (0, 0)])
        return padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]

    expected = moving_sum(arr)
    for workers in (2, 4, 31):
        parts = in_parts(moving_sum, arr, axis=1, halo=1, workers=workers)
        np.testing.assert_allclose(parts, expected, rtol=0, atol=1e-12)
    assert not np.allclose(in_parts(moving_sum, arr, axis=1, halo=0, workers=4), expected)
    assert in_parts(np.negative, arr, axis=2, workers=3).tolist() == (-arr).tolist()


def _whole_volume_mask(vol: np.ndarray, sigma: float, closing: int) -> np.ndarray:
    """The mask's steps applied to the whole volume, with scipy's own hole filling."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(vol, sigma) if sigma > 0 else vol
    root = np.sqrt(smooth - smooth.min())
    hist, edges = np.histogram(root, bins=256, range=(float(root.min()), float(root.max())))
    centers = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist.astype(np.float64))
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centers)
    between = w0 * w1 * (s0 / np.maximum(w0, 1) - (s0[-1] - s0) / np.maximum(w1, 1)) ** 2
    mask = root > edges[int(np.argmax(between[:-1])) + 1]
    ball = ndimage.generate_binary_structure(3, 1)
    if closing > 0:
        padded = ndimage.binary_closing(np.pad(mask, closing), ball, iterations=closing)
        mask = padded[closing:-closing, closing:-closing, closing:-closing]
    mask = ndimage.binary_fill_holes(mask)
    for axis in range(3):
        mask = ndimage.binary_fill_holes(mask, structure=_in_slice_structure(axis))
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    return mask


@pytest.mark.parametrize("seed", range(6))
def test_slice_filling_fills_every_3d_hole(seed):
    """What lets the mask skip the 3-D filling: filling holes slice by slice along any axis
    gives the same mask with or without filling the 3-D holes first."""
    from scipy import ndimage

    rng = np.random.default_rng(100 + seed)
    shape = tuple(rng.integers(5, 19, size=3))
    mask = ndimage.gaussian_filter(rng.standard_normal(shape), 1.0) > rng.uniform(-0.3, 0.3)
    ends = [max(5, n - 2) for n in shape]  # a closed box with holes inside, blobs around it
    mask[tuple(slice(1, e) for e in ends)] = True
    inner = tuple(slice(2, e - 1) for e in ends)
    mask[inner] = rng.random(mask[inner].shape) < 0.5
    assert not np.array_equal(fill_holes(mask), mask)  # there are 3-D holes to fill
    for axis in range(3):
        np.testing.assert_array_equal(
            fill_holes(mask, axis=axis), fill_holes(fill_holes(mask), axis=axis), str(axis)
        )


def test_otsu_counts_in_parts_exactly():
    """Values exactly on bin edges fall in the same bin whatever the parts."""
    from yoda.data.normalize import _otsu

    rng = np.random.default_rng(3)
    edges = np.linspace(0.0, 1.0, 257, dtype=np.float32)
    values = np.concatenate([rng.choice(edges, 5000), rng.beta(2, 5, 7001).astype(np.float32)])
    plain_edges = np.histogram_bin_edges(values, bins=256, range=(0.0, 1.0))
    one = _otsu(values, workers=1)
    assert one in plain_edges.tolist()
    for workers in (2, 3, 7):
        assert _otsu(values, workers=workers) == one


@pytest.mark.parametrize("seed", range(8))
def test_foreground_mask_equals_its_steps_on_the_whole_volume(seed):
    """Oracle: working inside the threshold's bounding box changes nothing, also for blobs
    touching the border, holes, several (equal) components and every closing."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(12, 30, size=3))
    vol = 100.0 * (ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) > 0.15)
    if seed % 2:  # two equal cubes far apart: the tie goes to the first in scan order
        vol = np.zeros(shape)
        vol[1:5, 1:5, 1:5] = vol[-5:-1, -5:-1, -5:-1] = 100.0
    vol = (vol + rng.uniform(0, 5, shape)).astype(np.float32)
    sigma, closing = [(0.0, 0), (1.0, 2), (0.7, 1), (0.0, 3)][seed % 4]
    expected = _whole_volume_mask(vol, sigma, closing)
    for workers in (None, 1, 3):  # parts over threads: the same mask
        mask = foreground_mask(vol, sigma=sigma, closing=closing, workers=workers)
        np.testing.assert_array_equal(mask, expected, err_msg=f"{workers} workers")
    assert expected.any()


def test_foreground_mask_closes_a_gap_that_a_cut_between_parts_runs_through():
    """Two slabs 4 voxels apart, the widest gap that the closing (2 iterations) joins; with a
    cut between parts at every slice, each part must see 4 slices on either side."""
    vol = np.random.default_rng(0).uniform(0, 1, (30, 12, 12)).astype(np.float32)
    vol[6:14] += 100.0
    vol[18:26] += 100.0
    expected = _whole_volume_mask(vol, 0.0, 2)
    assert expected[14:18, 2:-2, 2:-2].all() and not expected[:6].any()  # the gap closed
    for workers in (1, 2, 3, 30):
        mask = foreground_mask(vol, sigma=0.0, closing=2, workers=workers)
        np.testing.assert_array_equal(mask, expected, err_msg=f"{workers} workers")


def test_foreground_mask_errors():
    with pytest.raises(InputError, match="flair.*constant"):
        foreground_mask(np.full((8, 8, 8), 3.0), name="flair")
    with pytest.raises(InputError, match="3-D"):
        foreground_mask(np.ones((8, 8)))


# ---------------------------------------------------------------------------------------------
# ROI


def test_roi_bbox_margins():
    mask = np.zeros((100, 100, 100), bool)
    mask[50, 40, 30] = True
    mask[55, 42, 31] = True
    assert roi_bbox(mask) == (slice(30, 76), slice(30, 53), slice(25, 37))
    assert roi_bbox(mask, margins=(0, 0, 0)) == (slice(50, 56), slice(40, 43), slice(30, 32))


def test_roi_bbox_is_clipped_to_the_volume():
    mask = np.zeros((60, 50, 40), np.uint8)
    mask[3, 45, 2] = 1
    mask[10, 48, 38] = 1
    assert roi_bbox(mask) == (slice(0, 31), slice(35, 50), slice(0, 40))


def test_roi_bbox_errors():
    with pytest.raises(InputError, match="brain mask.*empty"):
        roi_bbox(np.zeros((5, 5, 5), bool), name="brain mask")
    with pytest.raises(InputError, match="3-D"):
        roi_bbox(np.ones((5, 5), bool))
    with pytest.raises(ConfigError):
        roi_bbox(np.ones((5, 5, 5), bool), margins=(1, -1, 1))


def test_crop_uncrop_round_trip():
    rng = np.random.default_rng(8)
    shape = (30, 25, 20)
    vol = rng.standard_normal((2, *shape)).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[10:14, 8:9, 12:15] = True
    bbox = roi_bbox(mask, margins=(3, 2, 10))
    cropped = crop(vol, bbox)
    assert cropped.shape == (2, 10, 5, 18)
    full = uncrop(cropped, bbox, shape, fill=-1.0)
    assert full.shape == vol.shape and full.dtype == vol.dtype
    inside = np.zeros(shape, bool)
    inside[bbox] = True
    assert np.array_equal(full[:, inside], vol[:, inside])
    assert np.all(full[:, ~inside] == -1.0)
    assert np.array_equal(crop(full, bbox), cropped)
    with pytest.raises(InputError):
        uncrop(cropped[..., :-1], bbox, shape)


def test_apply_intensity_saturates_huge_values_without_warnings():
    import warnings

    from yoda.data.normalize import Intensity, apply_intensity

    vol = np.array([0.0, 1.0, 3.0e38], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = apply_intensity(vol, Intensity(method="tissue", scale=10.0))
    assert out.tolist() == [0.0, 10.0, 255.0]
