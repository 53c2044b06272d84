"""Tests of the generalized gamma slice homogenization (Eq. 12-13)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from yoda.errors import ConfigError, InputError
from yoda.volume.gamma import apply_slice_correction, fit_slice_correction, slice_correction


def smooth_volume(shape=(40, 36, 48), trend=0.0) -> np.ndarray:
    """An ellipsoid with smooth interior intensities (0-255 scale), zero outside.

    ``trend`` adds a slow intensity ramp along z (fraction of the range).
    """
    x, y, z = (np.linspace(-1, 1, s) for s in shape)
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij")
    inside = (X / 0.95) ** 2 + (Y / 0.9) ** 2 + (Z / 1.05) ** 2 < 1
    v = 0.55 + 0.25 * np.cos(2.5 * X) * np.cos(2.0 * Y + 0.4) + 0.1 * np.sin(1.5 * X + 2 * Y)
    v = v + 0.05 * np.cos(1.2 * Z + 0.3 * X) + trend * Z
    return np.where(inside, v * 255, 0).astype(np.float32)


def distort(vol: np.ndarray, a, g, c, axis: int = 2) -> np.ndarray:
    """Apply per-slice ``(1 + a) x ** (1 + g) + c`` on the [0, 1] scale to the foreground."""
    shape = [1, 1, 1]
    shape[axis] = -1
    a, g, c = (np.reshape(np.asarray(p, dtype=np.float64), shape) for p in (a, g, c))
    x = vol.astype(np.float64) / 255
    d = np.clip((1 + a) * x ** (1 + g) + c, 0, None)
    return np.where(vol > 0, d * 255, 0).astype(np.float32)


def rmse(a: np.ndarray, b: np.ndarray, fg: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b)[fg] ** 2)))


def step_rms(v: np.ndarray) -> float:
    """RMS difference of adjacent z slices over their common foreground."""
    both = (v[..., 1:] > 0) & (v[..., :-1] > 0)
    return float(np.sqrt(np.mean((v[..., 1:] - v[..., :-1])[both] ** 2)))


def random_params(n: int, seed: int, scale: float = 0.06):
    rng = np.random.default_rng(seed)
    a, g, c = rng.normal(0, scale, n), rng.normal(0, 2 * scale, n), rng.normal(0, scale / 3, n)
    # zero mean, as the correction anchors the mean of each parameter
    return a - a.mean(), g - g.mean(), c - c.mean()


@pytest.mark.parametrize(
    ("method", "kind"),
    [("gamma", "gamma"), ("linear", "linear"), ("simple", "simple")],
)
def test_undoes_its_own_kind_of_distortion(method, kind):
    vol = smooth_volume()
    fg = vol > 0
    a, g, c = random_params(vol.shape[2], seed=1)
    if kind == "linear":
        g = 0 * g
    if kind == "simple":
        a, c = 0 * a, 0 * c
    bad = distort(vol, a, g, c)
    before = rmse(bad, vol, fg)
    fixed = slice_correction(bad, method)
    after = rmse(fixed, vol, fg)
    assert before > 5.0
    assert after < 0.45 * before, (before, after)
    # the jumps between adjacent slices are gone
    assert step_rms(fixed) < 0.1 * step_rms(bad)


def test_plain_objective_removes_distortions_almost_completely_without_trends():
    vol = smooth_volume()
    fg = vol > 0
    a, g, c = random_params(vol.shape[2], seed=2)
    bad = distort(vol, a, g, c)
    fixed = slice_correction(bad, "gamma", max_period=None)
    assert rmse(fixed, vol, fg) < 0.2 * rmse(bad, vol, fg)


def test_generalized_gamma_beats_restricted_variants_on_general_distortions():
    vol = smooth_volume()
    fg = vol > 0
    bad = distort(vol, *random_params(vol.shape[2], seed=3))
    err = {m: rmse(slice_correction(bad, m, max_period=None), vol, fg) for m in ("gamma", "linear")}
    err["none"] = rmse(bad, vol, fg)
    assert err["gamma"] < err["linear"] < err["none"]


def test_slow_trend_is_kept_by_default_and_flattened_by_plain_objective():
    vol = smooth_volume(trend=0.15)
    fg = vol > 0
    kept = slice_correction(vol, "linear")
    flat = slice_correction(vol, "linear", max_period=None)
    assert rmse(kept, vol, fg) < 1.0
    assert rmse(flat, vol, fg) > 3 * rmse(kept, vol, fg)


def test_undistorted_volume_is_nearly_unchanged():
    vol = smooth_volume()
    fg = vol > 0
    for method in ("gamma", "linear", "simple"):
        assert rmse(slice_correction(vol, method), vol, fg) < 1.0


def test_none_is_identity_and_background_stays_zero():
    vol = smooth_volume()
    out = slice_correction(vol, "none")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, vol)
    bad = distort(vol, *random_params(vol.shape[2], seed=4))
    fixed = slice_correction(bad, "gamma")
    assert np.all(fixed[vol == 0] == 0)
    assert np.all(fixed[vol > 0] >= 0)


def test_mask_excludes_and_preserves_voxels_outside():
    vol = smooth_volume()
    bad = distort(vol, *random_params(vol.shape[2], seed=5))
    mask = np.zeros(vol.shape, dtype=bool)
    mask[:, :20] = True
    fixed = slice_correction(bad, "gamma", mask=mask)
    np.testing.assert_array_equal(fixed[~mask], bad[~mask])
    inside = mask & (vol > 0)
    assert rmse(fixed, vol, inside) < 0.5 * rmse(bad, vol, inside)


def test_axis_argument_matches_transposed_volume():
    vol = smooth_volume(shape=(30, 24, 28))
    a, g, c = random_params(vol.shape[0], seed=6)
    bad = distort(vol, a, g, c, axis=0)
    along_x = slice_correction(bad, "gamma", axis=0)
    moved = slice_correction(np.ascontiguousarray(bad.transpose(1, 2, 0)), "gamma", axis=2)
    np.testing.assert_allclose(along_x, moved.transpose(2, 0, 1), atol=0.05)
    fg = vol > 0
    assert rmse(along_x, vol, fg) < 0.5 * rmse(bad, vol, fg)


def test_torch_input_gives_torch_output_and_params_shape():
    vol = smooth_volume(shape=(20, 18, 16))
    bad = distort(vol, *random_params(16, seed=7))
    params = fit_slice_correction(bad, "linear")
    assert params.shape == (16, 3)
    assert torch.all(params[:, 1] == 0)  # linear keeps g = 0
    assert abs(float(params[:, 0].mean())) < 1e-5  # anchored mean
    out_t = slice_correction(torch.from_numpy(bad), "linear")
    assert torch.is_tensor(out_t) and out_t.dtype == torch.float32
    np.testing.assert_allclose(out_t.numpy(), apply_slice_correction(bad, params), atol=1e-4)
    simple = fit_slice_correction(bad, "simple")
    assert torch.all(simple[:, [0, 2]] == 0)


def test_invalid_input_raises():
    vol = smooth_volume(shape=(10, 10, 10))
    with pytest.raises(ConfigError):
        slice_correction(vol, "cubic")
    with pytest.raises(ConfigError):
        slice_correction(vol, axis=3)
    with pytest.raises(InputError):
        slice_correction(vol[0])
    with pytest.raises(InputError):
        slice_correction(vol, mask=np.ones((10, 10, 9), dtype=bool))
    bad = vol.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError):
        slice_correction(bad)


@pytest.mark.slow
def test_benchmark_256_cubed():
    vol = smooth_volume(shape=(256, 256, 256))
    bad = distort(vol, *random_params(256, seed=8))
    start = time.perf_counter()
    fixed = slice_correction(bad, "gamma")
    elapsed = time.perf_counter() - start
    fg = vol > 0
    print(f"gamma slice correction of 256^3 on CPU: {elapsed:.2f} s")
    assert rmse(fixed, vol, fg) < 0.5 * rmse(bad, vol, fg)
