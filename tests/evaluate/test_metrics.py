from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from yoda.errors import ConfigError, InputError
from yoda.evaluate.metrics import (
    MetricWarning,
    alvr,
    dice,
    hd95,
    lesion_cnr,
    lesion_cnr_details,
    noise_level,
    noise_level_correction,
    psnr,
    remove_small_components,
    rician_noise,
    segment_wmh,
    ssim3d,
    worst_fraction,
)

R = 255.0


def _smooth_volume(shape, seed, scale=300.0, offset=120.0):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(size=shape), 2.5) * scale + offset


def _ellipsoid(shape, center, radii):
    grid = np.indices(shape, dtype=np.float64)
    r = sum(((g - c) / a) ** 2 for g, c, a in zip(grid, center, radii, strict=True))
    return r <= 1.0


def _skimage_ssim(a, b):
    return structural_similarity(
        a, b, data_range=R, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )


# --------------------------------------------------------------------------- SSIM / PSNR


def test_identical_images_give_ssim_one_and_psnr_inf_without_warnings():
    ref = _smooth_volume((24, 26, 22), 0)
    mask = _ellipsoid(ref.shape, (12, 13, 11), (10, 11, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ssim3d(ref, ref.copy()) == pytest.approx(1.0, abs=1e-12)
        assert ssim3d(ref, ref.copy(), mask) == pytest.approx(1.0, abs=1e-12)
        assert psnr(ref, ref.copy()) == math.inf
        assert psnr(ref, ref.copy(), mask) == math.inf


def test_ssim_of_constant_volumes_matches_closed_form():
    a, b = 100.0, 130.0
    c1 = (0.01 * R) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)  # variances 0: contrast term is C2/C2
    got = ssim3d(np.full((15, 16, 17), a), np.full((15, 16, 17), b))
    assert got == pytest.approx(expected, abs=1e-12)


def test_ssim_matches_skimage_without_mask():
    ref = _smooth_volume((30, 28, 26), 1)
    pred = ref + np.random.default_rng(2).normal(0, 9, ref.shape) + 4.0
    assert ssim3d(pred, ref) == pytest.approx(_skimage_ssim(pred, ref), abs=1e-3)
    assert ssim3d(pred, ref) == pytest.approx(_skimage_ssim(pred, ref), abs=1e-9)


def test_masked_ssim_and_psnr_match_skimage_on_cropped_masked_volume():
    shape = (40, 44, 36)
    ref = _smooth_volume(shape, 3)
    pred = 0.9 * ref + np.random.default_rng(4).normal(0, 6, shape) + 10.0
    mask = _ellipsoid(shape, (20, 23, 17), (14, 15, 12))
    idx = np.nonzero(mask)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
    mb = mask[box]
    sk = _skimage_ssim(np.where(mb, pred[box], 0.0), np.where(mb, ref[box], 0.0))
    assert ssim3d(pred, ref, mask) == pytest.approx(sk, abs=1e-3)
    assert ssim3d(pred, ref, mask) == pytest.approx(sk, abs=1e-9)
    sk_psnr = peak_signal_noise_ratio(
        np.where(mb, ref[box], 0.0), np.where(mb, pred[box], 0.0), data_range=R
    )
    assert psnr(pred, ref, mask) == pytest.approx(sk_psnr, abs=1e-9)


def test_voxels_outside_the_mask_do_not_count():
    shape = (30, 30, 30)
    ref = _smooth_volume(shape, 5)
    pred = ref + np.random.default_rng(6).normal(0, 5, shape)
    mask = _ellipsoid(shape, (15, 15, 15), (11, 11, 11))
    spoiled = np.where(mask, pred, 999.0)
    assert ssim3d(spoiled, ref, mask) == ssim3d(pred, ref, mask)
    assert psnr(spoiled, ref, mask) == psnr(pred, ref, mask)
    assert ssim3d(spoiled, ref) < ssim3d(pred, ref)


def test_psnr_of_known_error():
    ref = _smooth_volume((10, 10, 10), 7)
    mask = np.zeros(ref.shape, bool)
    mask[2:8, 2:8, 2:8] = True
    pred = ref + 5.0
    pred[~mask] += 100.0  # errors outside the mask are ignored
    assert psnr(pred, ref, mask) == pytest.approx(10 * math.log10(R**2 / 25.0), abs=1e-12)
    assert psnr(pred, ref, mask, data_range=1.0) == pytest.approx(
        10 * math.log10(1.0 / 25.0), abs=1e-12
    )
    # the error is averaged over the mask's bounding box (the paper's masked, cropped images)
    corner = mask.copy()
    corner[2:5, 2:5, 2:5] = False
    inside = corner.sum() / mask.sum()
    assert psnr(pred, ref, corner) == pytest.approx(
        10 * math.log10(R**2 / (25.0 * inside)), abs=1e-12
    )


def test_ssim_and_psnr_validate_inputs():
    a = np.zeros((12, 12, 12))
    with pytest.raises(InputError, match="shape"):
        ssim3d(a, np.zeros((12, 12, 13)))
    with pytest.raises(InputError, match="mask"):
        ssim3d(a, a, np.zeros((12, 12, 11), bool))
    with pytest.raises(InputError, match="empty"):
        psnr(a, a, np.zeros_like(a, bool))
    with pytest.raises(InputError, match="11 voxels"):
        ssim3d(np.zeros((12, 12, 8)), np.zeros((12, 12, 8)))
    with pytest.raises(ConfigError, match="data_range"):
        psnr(a, a, data_range=0)
    with pytest.raises(InputError, match="NaN"):
        psnr(np.full((3, 3), np.nan), np.zeros((3, 3)))


# --------------------------------------------------------------------------- noise level


def _kernel_factor(sigma=1.1, radius=2):
    g = np.arange(-radius, radius + 1, dtype=np.float64)
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    w = np.exp(-(x**2 + y**2 + z**2) / (2 * sigma**2))
    w /= w.sum()
    return math.sqrt(1.0 - 2.0 * w[radius, radius, radius] + np.sum(w**2))


def test_noise_level_correction_matches_3d_kernel_closed_form():
    assert noise_level_correction() == pytest.approx(_kernel_factor(), abs=1e-12)


def test_noise_level_of_white_noise_matches_closed_form_next_to_other_tissue():
    s = 4.0
    shape = (48, 48, 48)
    wm = np.zeros(shape, bool)
    wm[6:42, 6:42, 6:42] = True
    img = np.full(shape, 30.0)  # darker tissue around the white matter
    img[:, :, 40:] = 250.0  # and a bright one
    ramp = 0.3 * np.indices(shape)[0]  # smooth WM intensity drift
    rng = np.random.default_rng(8)
    img[wm] = 110.0 + ramp[wm] + rng.normal(0, s, int(wm.sum()))
    raw = noise_level(img, wm)
    assert raw == pytest.approx(s * _kernel_factor(), rel=0.03)
    assert raw / noise_level_correction() == pytest.approx(s, rel=0.03)


def test_noise_level_scales_with_noise_and_is_zero_for_flat_white_matter():
    shape = (30, 30, 30)
    wm = np.zeros(shape, bool)
    wm[4:26, 4:26, 4:26] = True
    flat = np.where(wm, 120.0, 20.0)
    assert noise_level(flat, wm) == pytest.approx(0.0, abs=1e-10)
    noise = np.random.default_rng(9).normal(size=shape)
    assert noise_level(flat + 2 * noise, wm) == pytest.approx(
        2 * noise_level(flat + noise, wm), rel=1e-9
    )


def test_noise_level_without_eroded_white_matter_is_nan_with_warning():
    wm = np.zeros((10, 10, 10), bool)
    wm[5, :, :] = True  # a sheet: nothing survives one erosion
    with pytest.warns(MetricWarning, match="empty"):
        assert math.isnan(noise_level(np.ones((10, 10, 10)), wm))


# --------------------------------------------------------------------------- lesion CNR


def test_lesion_cnr_of_known_contrast_on_known_noise():
    s = 5.0
    shape = (44, 44, 44)
    rng = np.random.default_rng(10)
    img = 100.0 + rng.normal(0, s, shape)
    wm = np.zeros(shape, bool)
    wm[2:42, 2:42, 2:42] = True
    les = np.zeros(shape, bool)
    les[10:14, 10:14, 10:14] = True  # 64 voxels, contrast 20 -> CNR 4
    img[10:14, 10:14, 10:14] = 120.0
    les[28:31, 28:31, 28:31] = True  # 27 voxels, contrast 35 -> CNR 7
    img[28:31, 28:31, 28:31] = 135.0
    det = lesion_cnr_details(img, les, wm)
    assert sorted(det.sizes.tolist()) == [27, 64]
    by_size = dict(zip(det.sizes.tolist(), det.cnr.tolist(), strict=True))
    assert by_size[64] == pytest.approx(4.0, rel=0.1)
    assert by_size[27] == pytest.approx(7.0, rel=0.1)
    expected = (64 * 4.0 + 27 * 7.0) / 91
    assert lesion_cnr(img, les, wm) == pytest.approx(expected, rel=0.1)


def _brute_force_cnr(img, lesions, wm, vs, dist_mm=3.0):
    """Independent oracle: explicit coordinates, explicit distances, explicit weighting."""
    any_lesion = np.zeros(img.shape, bool)
    for m in lesions:
        any_lesion |= m
    cand = np.argwhere(wm & ~any_lesion) * np.asarray(vs)
    num, den = 0.0, 0
    for m in lesions:
        pts = np.argwhere(m) * np.asarray(vs)
        d = np.sqrt(((cand[:, None, :] - pts[None, :, :]) ** 2).sum(-1)).min(axis=1)
        ring_idx = np.argwhere(wm & ~any_lesion)[d <= dist_mm + 1e-9]
        vals = img[tuple(ring_idx.T)]
        cnr = (img[m].mean() - vals.mean()) / vals.std()
        num += cnr * m.sum()
        den += m.sum()
    return num / den


def test_lesion_cnr_matches_brute_force_with_anisotropic_voxels():
    shape = (20, 22, 14)
    rng = np.random.default_rng(11)
    img = rng.normal(100, 6, shape)
    img[:, :, 9:] += 200.0  # far white matter (> 3 mm away in z) would spoil the std if counted
    wm = np.ones(shape, bool)
    wm[:, :2, :] = False
    l1 = np.zeros(shape, bool)
    l1[4:7, 5:8, 5:7] = True
    l2 = np.zeros(shape, bool)
    l2[13:15, 14:16, 3:5] = True
    img[l1] += 25
    img[l2] += 40
    vs = (1.0, 0.8, 2.0)
    expected = _brute_force_cnr(img, [l1, l2], wm, vs)
    assert lesion_cnr(img, l1 | l2, wm, voxel_size=vs) == pytest.approx(expected, rel=1e-10)


def test_lesions_touching_at_a_corner_are_one_lesion():
    shape = (20, 20, 20)
    img = np.random.default_rng(12).normal(100, 5, shape)
    les = np.zeros(shape, bool)
    les[5:8, 5:8, 5:8] = True
    les[8:10, 8:10, 8:10] = True  # shares only a corner: 26-connected
    det = lesion_cnr_details(img, les, np.ones(shape, bool))
    assert det.sizes.tolist() == [27 + 8]


def test_lesion_cnr_nan_cases_give_a_reason():
    img = np.random.default_rng(13).normal(100, 5, (12, 12, 12))
    wm = np.ones(img.shape, bool)
    with pytest.warns(MetricWarning, match="no lesion"):
        assert math.isnan(lesion_cnr(img, np.zeros(img.shape, bool), wm))
    les = np.zeros(img.shape, bool)
    les[5:7, 5:7, 5:7] = True
    with pytest.warns(MetricWarning, match="white-matter"):
        assert math.isnan(lesion_cnr(img, les, np.zeros(img.shape, bool)))
    with pytest.raises(ConfigError, match="voxel_size"):
        lesion_cnr(img, les, wm, voxel_size=(1, 1))


# --------------------------------------------------------------------------- WMH segmentation


def test_segment_wmh_ratio_rule_region_and_min_size():
    shape = (30, 30, 30)
    rng = np.random.default_rng(14)
    wm = np.zeros(shape, bool)
    wm[5:25, 5:25, 5:25] = True
    img = np.full(shape, 60.0)
    img[wm] = rng.normal(100.0, 3.0, int(wm.sum()))
    thr = 1.4 * np.median(img[wm])
    lesion = np.zeros(shape, bool)
    lesion[10:13, 10:13, 10:13] = True  # 27 voxels above the threshold
    img[lesion] = thr + 2.0
    below = np.zeros(shape, bool)
    below[18:21, 18:21, 18:21] = True
    img[below] = thr - 2.0
    small = np.zeros(shape, bool)
    small[22, 15, 15] = True  # 1 voxel: removed by min_size=2
    img[small] = thr + 50
    outside = np.zeros(shape, bool)
    outside[2, 2:5, 2:5] = True  # bright, but outside the search region
    img[outside] = thr + 50
    # the lesion and "below" blocks hold 54 of 8000 WM voxels: the median barely moves
    thr = 1.4 * np.median(img[wm])
    assert img[lesion].min() > thr > img[below].max()
    seg = segment_wmh(img, wm)
    assert np.array_equal(seg, lesion)
    assert np.array_equal(segment_wmh(img, wm, min_size=1), lesion | small)
    region = wm | outside
    assert np.array_equal(segment_wmh(img, wm, region=region), lesion | outside)
    # the rule scales with the tissue level, not with the noise: a denoised copy agrees
    assert np.array_equal(segment_wmh(img * 2.0, wm), lesion)
    with pytest.raises(InputError):
        segment_wmh(img, np.zeros(shape, bool))


def test_remove_small_components_uses_26_connectivity():
    m = np.zeros((6, 6, 6), bool)
    m[1, 1, 1] = m[2, 2, 2] = m[3, 3, 3] = True  # a diagonal chain of 3
    m[5, 0, 5] = True
    out = remove_small_components(m, 3)
    assert out.sum() == 3 and not out[5, 0, 5]
    with pytest.raises(ConfigError):
        remove_small_components(m, 0)


def test_segment_wmh_rejects_empty_white_matter():
    with pytest.raises(InputError, match="wm_mask is empty"):
        segment_wmh(np.ones((5, 5, 5)), np.zeros((5, 5, 5), bool))


# --------------------------------------------------------------------------- Dice, HD95, ALVR


def _cube(shape, start, size):
    m = np.zeros(shape, bool)
    m[tuple(slice(s, s + size) for s in start)] = True
    return m


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shifted_cubes_have_known_dice_hd95_alvr(k):
    shape = (32, 32, 32)
    a = _cube(shape, (10, 10, 10), 10)
    b = _cube(shape, (10 + k, 10, 10), 10)
    assert dice(a, b) == pytest.approx(2 * (10 - k) * 100 / 2000)
    assert alvr(a, b) == 0.0
    # the face of A at x=10 (100 of 488 surface voxels) lies exactly k voxels from B's surface
    assert hd95(a, b) == pytest.approx(k)
    assert hd95(a, b, voxel_size=(2.0, 1.0, 1.0)) == pytest.approx(2.0 * k)
    assert hd95(a, b, voxel_size=(1.0, 3.0, 3.0)) == pytest.approx(k)


def test_alvr_of_half_volume_is_one():
    a = _cube((20, 20, 20), (2, 2, 2), 10)
    b = a.copy()
    b[2:7] = False
    assert alvr(a, b) == pytest.approx(1.0)
    assert alvr(b, a) == pytest.approx(1.0)


def test_empty_mask_conventions():
    z = np.zeros((8, 8, 8), bool)
    a = _cube(z.shape, (2, 2, 2), 3)
    assert dice(z, z) == 1.0 and hd95(z, z) == 0.0 and alvr(z, z) == 0.0
    assert dice(a, z) == 0.0 and hd95(a, z) == math.inf and alvr(z, a) == math.inf
    with pytest.raises(InputError, match="differ in shape"):
        dice(a, np.zeros((8, 8, 7), bool))


def _blob(shape, seed, level):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(size=shape), 2.0) > level


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")
def test_dice_and_hd95_agree_with_monai():
    from monai.metrics import compute_dice, compute_hausdorff_distance

    shape = (34, 30, 26)
    a = _blob(shape, 15, 0.05)
    b = _blob(shape, 16, 0.05) | a & _blob(shape, 17, -0.1)
    b[:, :, 0] |= a[:, :, 0]  # both touch the volume border
    assert a.any() and b.any() and a[:, :, 0].any()
    spacing = (1.0, 1.5, 2.0)
    ta = torch.from_numpy(a)[None, None].float()
    tb = torch.from_numpy(b)[None, None].float()
    m_dice = float(compute_dice(ta, tb, include_background=True)[0, 0])
    m_hd = float(
        compute_hausdorff_distance(ta, tb, include_background=True, percentile=95, spacing=spacing)[
            0, 0
        ]
    )
    assert dice(a, b) == pytest.approx(m_dice, abs=1e-6)
    assert hd95(a, b, spacing) == pytest.approx(m_hd, abs=1e-3)
    assert hd95(b, a, spacing) == pytest.approx(m_hd, abs=1e-3)  # symmetric


# --------------------------------------------------------------------------- QC and noise


def test_worst_fraction():
    scores = {f"s{i:02d}": float(i) for i in range(10)}
    assert worst_fraction(scores) == ["s00"]
    assert worst_fraction(scores, 0.25) == ["s00", "s01", "s02"]  # ceil(2.5)
    assert worst_fraction(scores, 0.2, higher_is_better=False) == ["s09", "s08"]
    assert worst_fraction({"a": 1.0, "b": math.nan, "c": 0.0}, 0.01) == ["b"]
    assert worst_fraction({"only": 3.0}, 0.1) == ["only"]
    assert worst_fraction({}) == []
    with pytest.raises(ConfigError):
        worst_fraction(scores, 0.0)


def test_rician_noise_moments_and_determinism():
    sigma = 8.0
    img = np.full((200_000,), 50.0)
    x = rician_noise(img, sigma, np.random.default_rng(0))
    assert np.mean(x**2) == pytest.approx(50.0**2 + 2 * sigma**2, rel=0.01)  # Eq. 2
    bg = rician_noise(np.zeros(200_000), sigma, 1)
    assert np.mean(bg) == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.01)  # Rayleigh
    assert np.all(bg >= 0)
    vol = _smooth_volume((6, 6, 6), 3)
    assert np.array_equal(rician_noise(vol, 3.0, 5), rician_noise(vol, 3.0, 5))
    assert not np.array_equal(rician_noise(vol, 3.0, 5), rician_noise(vol, 3.0, 6))
    assert np.array_equal(rician_noise(np.abs(vol), 0.0, 5), np.abs(vol))
    with pytest.raises(ConfigError):
        rician_noise(vol, -1.0)
