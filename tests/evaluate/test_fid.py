from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import save_file

from yoda.errors import ConfigError, InputError, ModelError
from yoda.evaluate.fid import (
    FEATURE_DIM,
    ResNet50Features,
    axial_slices,
    fid_available,
    fid_axial,
    fid_from_features,
    frechet_distance,
)

SIZE = 32  # small network input keeps the ResNet-50 tests fast


def _random_cov(d, seed):
    a = np.random.default_rng(seed).normal(size=(d, 2 * d))
    return a @ a.T / (2 * d)


# --------------------------------------------------------------------------- Frechet distance


def test_identical_gaussians_have_zero_distance():
    mu = np.random.default_rng(0).normal(size=16)
    cov = _random_cov(16, 1)
    assert frechet_distance(mu, cov, mu, cov) <= 1e-6 * np.trace(cov)


def test_diagonal_gaussians_match_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3.0, 8), rng.uniform(0.1, 3.0, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_general_covariances_match_scipy_sqrtm_formula():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    c1, c2 = _random_cov(12, 4), _random_cov(12, 5)
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-8)


def test_fid_from_features_closed_forms():
    rng = np.random.default_rng(6)
    f = rng.normal(size=(300, 10)) @ rng.normal(size=(10, 10)) + 2.0
    assert fid_from_features(f, f.copy()) <= 1e-6 * np.trace(np.cov(f, rowvar=False))
    shift = rng.normal(size=10)
    # a shift moves the mean only: FID = |shift|^2
    assert fid_from_features(f, f + shift) == pytest.approx(shift @ shift, rel=1e-8)
    # doubling: mu2 = 2 mu, cov2 = 4 cov -> |mu|^2 + tr(cov) + 4 tr(cov) - 4 tr(cov)
    mu, cov = f.mean(0), np.cov(f, rowvar=False)
    assert fid_from_features(f, 2 * f) == pytest.approx(mu @ mu + np.trace(cov), rel=1e-8)


def test_fid_with_fewer_samples_than_dimensions_is_finite_and_zero_for_identical_sets():
    f = np.random.default_rng(7).normal(size=(20, 256))  # singular covariances
    g = np.random.default_rng(8).normal(size=(20, 256)) + 0.5
    assert fid_from_features(f, f.copy()) <= 1e-6 * np.trace(np.cov(f, rowvar=False))
    value = fid_from_features(f, g)
    assert np.isfinite(value) and value > 0


def test_sample_space_path_matches_covariance_formula():
    rng = np.random.default_rng(11)
    f = rng.normal(size=(20, 64)) * rng.uniform(0.5, 2.0, 64)
    g = rng.normal(size=(30, 64)) + 0.2
    expected = frechet_distance(
        f.mean(0), np.cov(f, rowvar=False), g.mean(0), np.cov(g, rowvar=False)
    )
    assert fid_from_features(f, g) == pytest.approx(expected, rel=1e-6)


def test_fid_input_checks():
    with pytest.raises(InputError):
        fid_from_features(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(InputError, match="at least 2"):
        fid_from_features(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(InputError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# --------------------------------------------------------------------------- feature extractor


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    # small CPU convolutions: one thread avoids thread-synchronisation stalls on busy machines
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    return ResNet50Features(size=SIZE)


@pytest.fixture(scope="module")
def slices():
    rng = np.random.default_rng(9)
    s = rng.uniform(0, 255, size=(3, 40, 48)).astype(np.float32)
    s[2] = s[0]
    return s


def _same_state(m1, m2):
    s1, s2 = m1.net.state_dict(), m2.net.state_dict()
    return s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_saved_random_weights_load_back_to_the_same_features(tmp_path, random_model, slices):
    ref = random_model.slice_features(slices, batch_size=3)
    assert ref.shape == (3, FEATURE_DIM)
    assert not np.allclose(ref[0], ref[1])  # features depend on the image
    np.testing.assert_allclose(ref[2], ref[0], rtol=1e-6, atol=1e-6)  # and only on the image
    loaded = ResNet50Features(random_model.save_weights(tmp_path / "w.pt"), size=SIZE)
    assert loaded.load_report["unexpected"] == []
    got = loaded.slice_features(slices, batch_size=3)
    assert got.shape == (3, FEATURE_DIM)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    other = ResNet50Features(random_model.save_weights(tmp_path / "w.safetensors"))
    assert _same_state(other, random_model)
    assert not _same_state(ResNet50Features(), random_model)


def test_inputs_are_scaled_and_centred_as_for_radimagenet(random_model, slices):
    """0-255 -> [0, 1], grey replicated to 3 channels, minus ImageNet's BGR channel means."""
    with torch.inference_mode():
        got = random_model.slice_features(slices[:1, :SIZE, :SIZE], batch_size=1)
        x = torch.as_tensor(slices[:1, :SIZE, :SIZE] / 255.0, dtype=torch.float32)
        x = torch.stack([x[0] - m for m in (0.406, 0.456, 0.485)])[None]
        want = random_model.net(x).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_radimagenet_style_keys_and_wrappers_are_mapped(tmp_path, random_model):
    seq = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    state = {}
    for key, value in random_model.net.state_dict().items():
        head, rest = key.split(".", 1)
        state[f"module.backbone.{seq[head]}.{rest}"] = value.clone()
    state["module.fc.weight"] = torch.zeros(3, 2048)
    path = tmp_path / "radimagenet.pt"
    torch.save({"state_dict": state}, path)
    loaded = ResNet50Features(path, size=SIZE)
    assert loaded.load_report["unexpected"] == ["module.fc.weight"]
    assert _same_state(loaded, random_model)


class _NotAStateDict:
    pass


def test_files_that_do_not_fit_are_refused(tmp_path, random_model):
    sd = {k: v.clone() for k, v in random_model.net.state_dict().items()}
    sd["conv1.weight"] = torch.zeros(64, 1, 7, 7)  # single-channel stem
    save_file(sd, str(tmp_path / "gray.safetensors"))
    with pytest.raises(ModelError, match="other shapes"):
        ResNet50Features(tmp_path / "gray.safetensors")
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ModelError, match="not a ResNet-50"):
        ResNet50Features(tmp_path / "foreign.safetensors")
    torch.save(_NotAStateDict(), tmp_path / "pickle.pt")
    with pytest.raises(ModelError, match="weights-only"):
        ResNet50Features(tmp_path / "pickle.pt")
    (tmp_path / "w.h5").write_bytes(b"\x89HDF")
    with pytest.raises(ModelError, match="unsupported"):
        ResNet50Features(tmp_path / "w.h5")
    with pytest.raises(ModelError, match="does not exist"):
        ResNet50Features(tmp_path / "missing.pt")


def test_fid_available_reports_why(tmp_path, random_model):
    ok, msg = fid_available(None)
    assert not ok and "no ResNet-50 weights" in msg
    ok, msg = fid_available(tmp_path / "missing.pt")
    assert not ok and "does not exist" in msg
    path = random_model.save_weights(tmp_path / "w.safetensors")
    ok, msg = fid_available(path)
    assert ok and str(path) in msg


# --------------------------------------------------------------------------- FID on volumes


def test_axial_slices_display_orientation_and_empty_slices():
    vol = np.zeros((5, 4, 3), np.float32)
    vol[4, 3, 1] = 7.0  # right-most, most anterior voxel of axial slice z=1
    vol[0, 0, 2] = 5.0  # left-most, most posterior voxel of slice z=2
    s = axial_slices(vol)
    assert s.shape == (2, 4, 5)  # slice z=0 is empty, rows = y, columns = x
    assert s[0, 0, 0] == 7.0  # anterior up, patient's right on the image left
    assert s[1, -1, -1] == 5.0
    assert axial_slices(vol, skip_empty=False).shape == (3, 4, 5)


def test_fid_axial_zero_for_identical_volumes_and_positive_otherwise(tmp_path, random_model):
    rng = np.random.default_rng(10)
    vols = [rng.uniform(0, 255, size=(40, 36, 3)) for _ in range(2)]
    noisy = [np.clip(v + rng.normal(0, 60, v.shape), 0, 255) for v in vols]
    same = fid_axial(vols, [v.copy() for v in vols], model=random_model, batch_size=3)
    differ = fid_axial(vols, noisy, model=random_model, batch_size=3)
    assert differ > 0 and same <= 1e-6 * differ
    path = random_model.save_weights(tmp_path / "w.pt")
    by_path = fid_axial(vols, noisy, path, device="cpu", batch_size=3, size=SIZE)
    assert by_path == pytest.approx(differ, rel=1e-4)
    with pytest.raises(ConfigError):
        fid_axial(vols, noisy)
    with pytest.raises(InputError, match="non-empty axial slices"):
        fid_axial([np.zeros((8, 8, 3))], vols, model=random_model)
