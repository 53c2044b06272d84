"""prepare_subject: resampling onto the reference grid, and what a source does not image."""

from __future__ import annotations

import numpy as np
import pytest

from yoda.data.io import load_image, resample_like
from yoda.data.normalize import fit_intensity
from yoda.data.subject import prepare_subject
from yoda.errors import InputError

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _head(shape=(20, 20, 20)) -> tuple[np.ndarray, np.ndarray]:
    """A box of 'tissue' with a gradient along z, and its mask."""
    mask = np.zeros(shape, np.float32)
    mask[4:16, 4:16, 2:18] = 1
    z = np.arange(shape[2], dtype=np.float32)
    return mask * (100.0 + 5.0 * z), mask


def test_a_source_on_the_reference_grid_is_not_resampled():
    """With resample on (here for a mask on another grid), images on the reference grid keep
    every voxel, even where an oblique affine's round trip is not exact."""
    c, s = np.cos(0.05), np.sin(0.05)
    oblique = np.array([[2 * c, -2 * s, 0, 1], [2 * s, 2 * c, 0, 2], [0, 0, 2, 3], [0, 0, 0, 1]])
    t1, mask = _head()
    t2 = 2.0 * t1 + 10.0  # non-zero up to the volume's edges
    images = {"t1w": (t1, oblique), "t2w": (t2, oblique)}
    coarse = (mask[::2, ::2, ::2], oblique @ np.diag([2.0, 2.0, 2.0, 1.0]))
    resampled = prepare_subject(
        images, ["t1w", "t2w"], normalization="percentile", mask=coarse, resample=True
    )
    _, ref = load_image(images["t1w"])
    _, grid = load_image(coarse)
    on_ref = (resample_like(coarse[0], grid, ref, order=0), oblique)
    direct = prepare_subject(images, ["t1w", "t2w"], normalization="percentile", mask=on_ref)
    assert resampled.bbox == direct.bbox
    np.testing.assert_array_equal(resampled.data, direct.data)
    assert resampled.data[1].min() > -1.0  # the T2w has no background voxel


def test_what_a_resampled_source_does_not_image_is_background():
    t1, mask = _head()
    t2 = t1 * 3.0 + 7.0
    covered = 12  # the T2w images the slices z >= 8 only
    cut = AFFINE.copy()
    cut[2, 3] = 2.0 * (20 - covered)
    images = {"t1w": (t1, AFFINE), "t2w": (t2[:, :, 20 - covered :], cut)}
    prep = prepare_subject(
        images, ["t1w", "t2w"], normalization="tissue", mask=(mask, AFFINE), resample=True
    )
    z0 = prep.bbox[2].start
    zs = np.arange(prep.data.shape[3]) + z0
    t2_net = prep.data[1]
    assert np.all(t2_net[:, :, zs < 20 - covered] == -1.0)  # not water, not tissue: nothing
    assert np.all(t2_net[..., (zs >= 20 - covered) & (zs < 18)].max(axis=(0, 1)) > -0.5)
    # the fit sees only the tissue the T2w images, as if the cut-off part were not in the mask
    inside = mask > 0
    inside[:, :, : 20 - covered] = False
    assert prep.intensities["t2w"] == fit_intensity(t2, inside, method="tissue")
    # a source that images no voxel of the mask is refused
    far = AFFINE.copy()
    far[2, 3] = 2.0 * 18  # slices 18 and 19, beyond the mask
    images["t2w"] = (t2[:, :, 18:] + np.linspace(0, 1, 20)[:, None, None], far)
    with pytest.raises(InputError, match="does not image any voxel of the mask"):
        prepare_subject(
            images, ["t1w", "t2w"], normalization="tissue", mask=(mask, AFFINE), resample=True
        )


def test_a_source_constant_where_it_meets_the_reference_is_refused():
    t1, mask = _head()
    t2 = np.full((20, 20, 30), 50.0, np.float32)
    t2[:, :, :10] = np.linspace(0, 100, 10)  # varies only below the reference's volume
    below = AFFINE.copy()
    below[2, 3] = -20.0
    images = {"t1w": (t1, AFFINE), "t2w": (t2, below)}
    with pytest.raises(InputError, match="it is constant; do the images overlap"):
        prepare_subject(
            images, ["t1w", "t2w"], normalization="tissue", mask=(mask, AFFINE), resample=True
        )


def test_the_preparation_records_the_mask_file_and_what_it_resampled(tmp_path):
    from yoda.data.io import save_image

    t1, mask = _head()
    _, grid = load_image((mask, AFFINE))
    path = tmp_path / "mask.nii.gz"
    save_image(mask, grid, path)
    shifted = AFFINE.copy()
    shifted[0, 3] = 0.5
    images = {"t1w": (t1, AFFINE), "t2w": (t1 * 2 + 1, shifted)}
    prep = prepare_subject(images, ["t1w", "t2w"], normalization="tissue", mask=path, resample=True)
    assert prep.mask_file == str(path) and prep.resampled == ["t2w"]
    plain = prepare_subject({"t1w": (t1, AFFINE)}, ["t1w"], normalization="tissue")
    assert plain.mask_file is None and plain.resampled == []
    assert plain.mask_source == "foreground:t1w"
