"""Tests of the physics-based phantom (yoda.data.phantom) and the `yoda phantom` command."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import stats

from yoda.cli import main
from yoda.data import phantom as P
from yoda.data.manifest import read_manifest
from yoda.errors import ConfigError

FAST = 4.0  # mm: a subject in ~0.1 s


@pytest.fixture(scope="module")
def subject4():
    return P.simulate_subject(P.subject_seed(0, 0), FAST)


@pytest.fixture(scope="module")
def nominal3():
    """A 3 mm subject with the nominal tissue parameters (no per-subject jitter)."""
    return P.simulate_subject(P.subject_seed(0, 0), 3.0, jitter=0.0)


def _pure_means(s: P.PhantomSubject, contrast: str, unbias: bool = False) -> dict[str, float]:
    """Mean of the clean image over pure voxels of each label (fraction > 0.9; WMH: label 4)."""
    x = s.clean[contrast] / s.bias[contrast] if unbias else s.clean[contrast]
    out = {}
    for t, label in P.LABELS.items():
        sel = s.tissue == label
        if t != "wmh":
            sel &= s.fractions[t] > 0.9
        assert sel.sum() >= 3, f"too few pure {t} voxels"
        out[t] = float(x[sel].mean())
    return out


# ------------------------------------------------------------------ signal equations


def _mprage_bloch(t1, t2, pd, cycles=30):
    """Step-by-step Bloch recursion over many MPRAGE cycles (oracle for the closed form)."""
    seq = P.SEQUENCES["t1w"]
    n, esp, tr, ti = int(seq["readouts"]), seq["esp"], seq["tr"], seq["ti"]
    alpha = np.deg2rad(seq["flip"])
    t1, pd = np.asarray(t1, float), np.asarray(pd, float)
    mz = pd.copy()
    t_first = ti - (n // 2) * esp

    def relax(m, t):
        return pd + (m - pd) * np.exp(-t / t1)

    for _ in range(cycles):
        mz = relax(-mz, t_first)
        for k in range(n):
            if k == n // 2:
                centre = mz * np.sin(alpha)
            mz = mz * np.cos(alpha)
            if k < n - 1:
                mz = relax(mz, esp)
        mz = relax(mz, tr - (t_first + (n - 1) * esp))
    return np.abs(centre) * np.exp(-seq["te"] / np.asarray(t2, float))


def test_mprage_closed_form_matches_bloch_recursion():
    t1, t2, pd = (np.array([P.TISSUE_PARAMS[t][i] for t in P.TISSUES]) for i in range(3))
    closed = P.contrast_signal("t1w", t1, t2, pd)
    np.testing.assert_allclose(closed, _mprage_bloch(t1, t2, pd), rtol=1e-6)


@pytest.mark.parametrize(
    ("contrast", "expected"),
    [  # signal relative to WM: CSF, GM, lesion (PHANTOM.md)
        ("t1w", (0.22, 0.75, 0.83)),
        ("t2w", (3.83, 1.42, 2.13)),
        ("pd", (1.21, 1.17, 1.22)),
        ("flair", (0.00, 1.18, 2.02)),
    ],
)
def test_signal_equations_give_reference_contrast(contrast, expected):
    s = {t: float(P.contrast_signal(contrast, *P.TISSUE_PARAMS[t])) for t in P.TISSUES}
    got = np.array([s["csf"], s["gm"], s["wmh"]]) / s["wm"]
    np.testing.assert_allclose(got, expected, atol=0.011)
    # nominal WM maps to the documented reference intensity
    assert P._intensity_scale(contrast) * s["wm"] == pytest.approx(P.WM_REFERENCE)


def test_spin_echo_closed_form():
    # S = PD (1 - exp(-TR/T1)) exp(-TE/T2) at TR 5700, TE 100
    got = P.contrast_signal("t2w", 1000.0, 75.0, 0.69)
    assert got == pytest.approx(0.69 * (1 - np.exp(-5.7)) * np.exp(-100 / 75))


# ------------------------------------------------------------------ tissue contrast


def test_tissue_ordering_nominal(nominal3):
    s = nominal3
    m = {c: _pure_means(s, c) for c in P.CONTRASTS}
    assert m["flair"]["wmh"] > m["flair"]["gm"] > m["flair"]["wm"] > m["flair"]["csf"]
    assert m["t2w"]["csf"] > m["t2w"]["gm"] > m["t2w"]["wm"]
    assert m["t1w"]["wm"] > m["t1w"]["gm"] > m["t1w"]["csf"]
    assert m["pd"]["csf"] > m["pd"]["gm"] > m["pd"]["wm"]
    # clean WM is around the documented reference
    for c in P.CONTRASTS:
        assert 85 < m[c]["wm"] < 115


def test_clean_signal_is_partial_volume_of_tissue_signals(nominal3):
    """Clean / bias = sum over tissues of fraction x scaled tissue signal, voxel by voxel."""
    s = nominal3
    for c in P.CONTRASTS:
        scale = P._intensity_scale(c)
        expected = sum(
            s.fractions[t] * scale * float(P.contrast_signal(c, *P.TISSUE_PARAMS[t]))
            for t in P.TISSUES
        )
        np.testing.assert_allclose(s.clean[c] / s.bias[c], expected, rtol=1e-4, atol=1e-3)


def test_tissue_contrast_matches_signal_equations(nominal3):
    """Without the bias field, pure-tissue means reproduce the closed-form tissue ratios."""
    for c in P.CONTRASTS:
        m = _pure_means(nominal3, c, unbias=True)
        ref = {t: float(P.contrast_signal(c, *P.TISSUE_PARAMS[t])) for t in ("csf", "gm", "wm")}
        assert m["wm"] == pytest.approx(P.WM_REFERENCE, rel=0.03)
        # "pure" (> 0.9) voxels of a 3 mm grid still hold some of the neighbouring tissues
        assert m["gm"] / m["wm"] == pytest.approx(ref["gm"] / ref["wm"], rel=0.06)
        assert m["csf"] / m["wm"] == pytest.approx(ref["csf"] / ref["wm"], rel=0.1, abs=0.1)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_tissue_ordering_jittered_subjects(index):
    s = P.simulate_subject(P.subject_seed(0, index), 3.0)
    m = {c: _pure_means(s, c) for c in P.CONTRASTS}
    assert m["t1w"]["wm"] > m["t1w"]["gm"] > m["t1w"]["csf"]
    assert m["t2w"]["csf"] > m["t2w"]["gm"] > m["t2w"]["wm"]
    assert m["flair"]["wmh"] > max(m["flair"]["gm"], m["flair"]["wm"]) > m["flair"]["csf"]
    assert m["pd"]["csf"] > m["pd"]["wm"] and m["pd"]["gm"] > m["pd"]["wm"]


# ------------------------------------------------------------------ noise


def test_background_is_rayleigh_with_requested_sigma(subject4):
    s = subject4
    for c in P.CONTRASTS:
        sigma = s.sigma[c]
        r = (s.images[c] - s.clean[c])[s.clean[c] == 0].astype(np.float64)
        assert r.size > 50_000
        assert r.mean() == pytest.approx(np.sqrt(np.pi / 2) * sigma, rel=0.01)
        ks = stats.kstest(r, stats.rayleigh(scale=sigma).cdf).statistic
        assert ks < 0.008
        # the test has power: a 5 % wrong sigma is rejected
        assert stats.kstest(r, stats.rayleigh(scale=1.05 * sigma).cdf).statistic > 3 * ks


def test_brain_noise_is_rician_around_the_clean_image(subject4):
    """Probability integral transform: F_Rice(X; X'/sigma) is uniform over the brain (Eq. 1)."""
    s = subject4
    for c in P.CONTRASTS:
        sigma = s.sigma[c]
        x, x0 = s.images[c][s.mask].astype(np.float64), s.clean[c][s.mask].astype(np.float64)
        u = stats.rice.cdf(x, x0 / sigma, scale=sigma)
        ks = stats.kstest(u, "uniform").statistic
        assert ks < 0.015
        # the same with Gaussian noise of the wrong size is rejected
        wrong = stats.rice.cdf(x, x0 / sigma, scale=1.1 * sigma)
        assert stats.kstest(wrong, "uniform").statistic > 2 * ks


def test_noise_level_is_relative_to_white_matter_and_correlated():
    subjects = [P.simulate_subject(P.subject_seed(7, k), 8.0) for k in range(20)]
    frac = np.array([[s.params["noise_fraction"][c] for c in P.CONTRASTS] for s in subjects])
    for j, c in enumerate(P.CONTRASTS):
        lo, hi = P.NOISE_RANGE[c]
        assert np.all((frac[:, j] >= lo) & (frac[:, j] <= hi))
    for s in subjects:
        for c in P.CONTRASTS:
            wm = float(np.median(s.clean[c][s.wm]))
            assert s.sigma[c] == pytest.approx(s.params["noise_fraction"][c] * wm, rel=1e-5)
    # a per-subject quality factor: the contrasts' noise levels go together
    rho = stats.spearmanr(frac).statistic
    assert rho[np.triu_indices(4, 1)].min() > 0.6


# ------------------------------------------------------------------ anatomy


def test_masks_and_labels_are_consistent(subject4):
    s = subject4
    shape = s.mask.shape
    for arr in (*s.images.values(), *s.clean.values()):
        assert arr.shape == shape and arr.dtype == np.float32
    assert s.mask.dtype == bool and s.wm.dtype == bool
    assert s.tissue.dtype == np.uint8 and s.wmh.dtype == np.uint8
    assert set(np.unique(s.tissue)) <= {0, 1, 2, 3, 4}
    assert set(np.unique(s.wmh)) <= {0, 1}
    np.testing.assert_array_equal(s.tissue > 0, s.mask)
    np.testing.assert_array_equal(s.tissue == 4, s.wmh == 1)
    assert np.all(s.tissue[s.wm] == 3)
    assert not np.any(s.wm & (s.wmh == 1))
    np.testing.assert_array_equal(s.wm, (s.fractions["wm"] > 0.5) & (s.wmh == 0) & s.mask)
    total = sum(s.fractions.values())
    assert total.max() <= 1.0 + 1e-5
    np.testing.assert_array_equal(s.mask, total > 0.5)
    # nothing outside the head: the clean signal lives where tissue is
    for c in P.CONTRASTS:
        assert np.all(s.clean[c][total == 0] == 0)
    # brain volume close to the template's (1.9 l) after a 3 % scaling
    volume = total.sum() * FAST**3 / 1e6
    assert 1.6 < volume < 2.2


def test_lesions_exist_inside_white_matter(subject4):
    s = subject4
    wmh = s.wmh == 1
    assert wmh.sum() > 0
    assert P._LESION_COUNT[0] <= s.params["n_lesions"] <= P._LESION_COUNT[1]
    assert np.all(s.mask[wmh])
    # lesions replace white matter only: where labelled, the pre-lesion WM fraction is > 0.5
    assert np.all(s.fractions["wm"][wmh] + s.fractions["wmh"][wmh] > 0.5)
    lesion_anywhere = s.fractions["wmh"] > 0.05
    wm_before = s.fractions["wm"] + s.fractions["wmh"]
    assert np.median(wm_before[lesion_anywhere]) > 0.8
    assert s.params["lesion_volume_ml"] == pytest.approx(s.fractions["wmh"].sum() * 0.064)


def test_lesion_volumes_are_plausible():
    volumes = [
        P.simulate_subject(P.subject_seed(3, k), 8.0).params["lesion_volume_ml"] for k in range(6)
    ]
    assert 0.5 < np.median(volumes) < 30


def test_deformation_is_smooth_and_does_not_fold():
    basis = P.load_basis(FAST)
    brain = basis.fractions.sum(axis=0) > 0.5
    for seed in range(3):
        coords, _ = P._sampling_coordinates(np.random.default_rng(seed), basis)
        grads = [np.gradient(coords[i], FAST) for i in range(3)]
        jac = np.moveaxis(np.array(grads), (0, 1), (-2, -1))
        det = np.linalg.det(jac)[brain]
        assert det.min() > 0.2
        assert 0.8 < np.median(det) < 1.2
        identity = np.stack(
            np.meshgrid(
                *[
                    basis.affine[k, k] * np.arange(n) + basis.affine[k, 3]
                    for k, n in enumerate(basis.shape)
                ],
                indexing="ij",
            )
        )
        shift = np.sqrt(((coords - identity) ** 2).sum(axis=0))[brain]
        assert 0.5 < np.sqrt((shift**2).mean()) < 15.0


def test_bias_field_is_smooth_shared_and_bounded(subject4):
    s = subject4
    logs = {c: np.log(s.bias[c][s.mask]) for c in P.CONTRASTS}
    for c in P.CONTRASTS:
        assert abs(logs[c].mean()) < 0.01  # centred on the brain
        assert 0.6 < np.exp(logs[c]).min() and np.exp(logs[c]).max() < 1.7
    assert np.corrcoef(logs["t1w"], logs["flair"])[0, 1] > 0.7
    assert not np.allclose(logs["t1w"], logs["flair"])


@pytest.mark.parametrize("voxel", [FAST, 2.5])
def test_basis_keeps_volumes_and_mni_coordinates(voxel):
    stack, aff1 = P._template_1mm()
    basis = P.load_basis(voxel)
    # box averaging keeps tissue volumes (ml)
    np.testing.assert_allclose(
        basis.fractions.sum(axis=(1, 2, 3)) * voxel**3, stack[:3].sum(axis=(1, 2, 3)), rtol=1e-4
    )

    # and the brain's centroid in world (MNI) coordinates
    def centroid(vol, affine):
        total = vol.sum(dtype=np.float64)
        c = [
            np.arange(n) @ vol.sum(axis=tuple({0, 1, 2} - {k}), dtype=np.float64) / total
            for k, n in enumerate(vol.shape)
        ]
        return affine[:3, :3] @ c + affine[:3, 3]

    brain1 = stack[:3].sum(axis=0)
    np.testing.assert_allclose(basis.centre, centroid(brain1, aff1), atol=0.5)
    assert np.allclose(np.diag(basis.affine)[:3], voxel)


# ------------------------------------------------------------------ determinism and errors


def test_same_seed_same_subject_different_seed_differs(subject4):
    again = P.simulate_subject(P.subject_seed(0, 0), FAST)
    for c in P.CONTRASTS:
        np.testing.assert_array_equal(again.images[c], subject4.images[c])
        np.testing.assert_array_equal(again.clean[c], subject4.clean[c])
    np.testing.assert_array_equal(again.tissue, subject4.tissue)
    assert again.sigma == subject4.sigma
    other = P.simulate_subject(P.subject_seed(0, 1), FAST)
    assert not np.array_equal(other.tissue, subject4.tissue)
    assert not np.allclose(other.images["t1w"], subject4.images["t1w"])
    assert P.subject_seed(0, 1) != P.subject_seed(1, 0)


@pytest.mark.parametrize("voxel", [0, -1, 8.5, float("nan")])
def test_bad_voxel_size_rejected(voxel):
    with pytest.raises(ConfigError, match="voxel size"):
        P.simulate_subject(0, voxel)


def test_bad_arguments_rejected(tmp_path):
    with pytest.raises(ConfigError, match="seed"):
        P.simulate_subject(-1, FAST)
    with pytest.raises(ConfigError, match="subjects"):
        P.make_phantom(tmp_path / "a", 0, FAST)
    with pytest.raises(ConfigError, match="splits"):
        P.make_phantom(tmp_path / "b", 2, FAST, splits=(0.5, -0.5, 1.0))
    with pytest.raises(ConfigError, match="counts"):
        P.make_phantom(tmp_path / "c", 2, FAST, counts=(1, 0, 0))


@pytest.mark.parametrize(
    ("n", "splits", "expected"),
    [
        (10, (0.6, 0.2, 0.2), (6, 2, 2)),
        (3, (0.6, 0.2, 0.2), (1, 1, 1)),
        (1, (0.6, 0.2, 0.2), (1, 0, 0)),
        (2, (0.6, 0.2, 0.2), (1, 1, 0)),
        (7, (1, 0, 0), (7, 0, 0)),
        (5, (3, 1, 1), (3, 1, 1)),
    ],
)
def test_split_counts(n, splits, expected):
    assert P.split_counts(n, splits) == expected


def test_split_counts_always_sum_to_n():
    for n in range(1, 60):
        assert sum(P.split_counts(n, (0.7, 0.15, 0.15))) == n


# ------------------------------------------------------------------ cohorts on disk


def _arrays(folder, sid):
    return {
        f.name: np.asarray(nib.load(f).dataobj) for f in sorted((folder / sid).glob("*.nii.gz"))
    }


def test_make_phantom_writes_files_and_manifest(tmp_path):
    out = tmp_path / "ph"
    path = P.make_phantom(out, 2, FAST, seed=4, splits=(0.5, 0.5, 0.0))
    assert path == out / "manifest.csv" and path.is_file()
    header = path.read_text().splitlines()[0].split(",")
    assert header == [
        "id", "split", "t1w", "t2w", "pd", "flair", "mask", "label_tissue", "label_wmh",
        "label_wm", "clean_t1w", "clean_t2w", "clean_pd", "clean_flair",
    ]  # fmt: skip
    assert "/tmp" not in path.read_text()  # relative paths
    manifest = read_manifest(path)
    assert manifest.ids == ["sub-000", "sub-001"]
    assert [s.split for s in manifest.subjects] == ["train", "val"]
    sim = P.simulate_subject(P.subject_seed(4, 1), FAST)
    subject = manifest.subject("sub-001")
    files = subject.files()
    assert len(files) == 12
    for role, f in files.items():
        img = nib.load(f)
        assert img.shape == sim.mask.shape, role
        np.testing.assert_allclose(img.affine, sim.affine, atol=1e-5)
        dtype = np.float32 if role in P.CONTRASTS or role.startswith("clean_") else np.uint8
        assert img.get_data_dtype() == dtype, role
    np.testing.assert_array_equal(np.asarray(nib.load(files["flair"]).dataobj), sim.images["flair"])
    np.testing.assert_array_equal(
        np.asarray(nib.load(files["clean_t2w"]).dataobj), sim.clean["t2w"]
    )
    np.testing.assert_array_equal(np.asarray(nib.load(files["label_tissue"]).dataobj), sim.tissue)
    np.testing.assert_array_equal(np.asarray(nib.load(files["mask"]).dataobj) == 1, sim.mask)
    np.testing.assert_array_equal(np.asarray(nib.load(files["label_wm"]).dataobj) == 1, sim.wm)
    # world coordinates are MNI: voxel (0, 0, 0) of a 4 mm grid is the centre of the 1 mm block
    np.testing.assert_allclose(sim.affine[:3, 3], [-98 + 1.5, -134 + 1.5, -72 + 1.5])
    info = json.loads((out / "phantom.json").read_text())
    assert info["subjects"][1]["sigma"] == pytest.approx(sim.sigma)


def test_cohort_is_reproducible_and_subject_independent_of_n(tmp_path):
    a = P.make_phantom(tmp_path / "a", 2, 8.0, seed=5).parent
    b = P.make_phantom(tmp_path / "b", 2, 8.0, seed=5).parent
    one = P.make_phantom(tmp_path / "one", 1, 8.0, seed=5).parent
    other = P.make_phantom(tmp_path / "other", 1, 8.0, seed=6).parent
    assert (a / "manifest.csv").read_text() == (b / "manifest.csv").read_text()
    for sid in ("sub-000", "sub-001"):
        xa, xb = _arrays(a, sid), _arrays(b, sid)
        assert sorted(xa) == sorted(xb) and len(xa) == 12
        for name in xa:
            np.testing.assert_array_equal(xa[name], xb[name])
    x1 = _arrays(one, "sub-000")
    for name, arr in _arrays(a, "sub-000").items():
        np.testing.assert_array_equal(arr, x1[name])
    assert not np.array_equal(_arrays(other, "sub-000")["t1w.nii.gz"], x1["t1w.nii.gz"])


def test_cli_phantom(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["phantom", str(out), "--subjects", "2", "--voxel-size", "8", "--seed", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert str(out / "manifest.csv") in printed
    m = read_manifest(out / "manifest.csv")
    assert len(m) == 2
    assert nib.load(m.subjects[0].images["t1w"]).shape == P.load_basis(8.0).shape
    # an existing phantom is kept unless --overwrite
    assert main(["phantom", str(out), "--subjects", "1", "--voxel-size", "8"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    rc = main(
        ["phantom", str(out), "--voxel-size", "8", "--train", "1", "--test", "2", "--overwrite"]
    )
    assert rc == 0
    assert [s.split for s in read_manifest(out / "manifest.csv")] == ["train", "test", "test"]
    assert sorted(p.name for p in (out / "sub-000").iterdir()) == sorted(
        f"{name}.nii.gz" for name in P.SUBJECT_FILES
    )
    # a smaller phantom in its place leaves none of the earlier subjects' images
    (out / "sub-002" / "notes.txt").write_text("the user's own")
    assert main(["phantom", str(out), "--subjects", "1", "--voxel-size", "8", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.csv", "phantom.json", "sub-000", "sub-002"
    ]  # fmt: skip
    assert [p.name for p in (out / "sub-002").iterdir()] == ["notes.txt"]


def test_existing_subject_files_are_not_overwritten(tmp_path):
    out = tmp_path / "again"
    P.make_phantom(out, 1, 8.0)
    (out / "manifest.csv").unlink()
    (out / "phantom.json").unlink()
    with pytest.raises(ConfigError, match="sub-000"):
        P.make_phantom(out, 1, 8.0)
    assert P.make_phantom(out, 1, 8.0, overwrite=True).is_file()


@pytest.mark.parametrize(
    ("options", "word"),
    [
        (["--subjects", "0"], "--subjects"),
        (["--voxel-size", "0"], "--voxel-size"),
        (["--voxel-size", "9"], "--voxel-size"),
        (["--seed", "-2"], "--seed"),
        (["--splits", "0.5,x,0.5"], "--splits"),
        (["--splits", "0.5,0.5"], "--splits"),
        (["--splits", "0.6,0.2,0.2", "--train", "2"], "--splits"),
        (["--subjects", "3", "--train", "1", "--val", "1"], "--subjects"),
    ],
)
def test_cli_rejects_bad_options(tmp_path, capsys, options, word):
    out = tmp_path / "bad"
    rc = main(["phantom", str(out), *options])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert len(err.splitlines()) == 1 and word in err
    assert not (out / "manifest.csv").exists()
