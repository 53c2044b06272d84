from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from yoda.data.io import load_image, save_image
from yoda.data.manifest import Manifest, Subject, read_manifest
from yoda.data.normalize import apply_intensity, fit_intensity
from yoda.data.phantom import make_phantom
from yoda.errors import ConfigError, InputError
from yoda.evaluate.evaluation import METRIC_KEYS, evaluate, find_methods
from yoda.evaluate.metrics import (
    dice,
    noise_level,
    noise_level_correction,
    psnr,
    rician_noise,
    segment_wmh,
    ssim3d,
)

SIGMA = 6.0  # Rician noise (0-255 scale) of the "diffusion" stand-in


def _write_pred(folder: Path, sid: str, img, geom, sidecar: dict | None, target="flair") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_image(img, geom, folder / f"{sid}_{target}.nii.gz", overwrite=True)
    if sidecar is not None:
        (folder / f"{sid}_{target}.json").write_text(json.dumps(sidecar))


def _refs(subject: Subject, method: str = "tissue"):
    """Acquired and clean FLAIR on the 0-255 scale of the acquired fit, and the masks."""
    acq, geom = load_image(subject.images["flair"])
    mask = load_image(subject.mask)[0] > 0.5
    fit = fit_intensity(acq, mask, method=method)
    clean = apply_intensity(load_image(subject.clean["flair"])[0], fit)
    wm = (load_image(subject.labels["wm"])[0] > 0.5) & mask
    wmh = (load_image(subject.labels["wmh"])[0] > 0.5) & mask
    return apply_intensity(acq, fit), clean, mask, wm, wmh, geom


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two phantom test subjects and stand-in predictions with sidecars."""
    root = tmp_path_factory.mktemp("phantom")
    manifest_path = make_phantom(root, 2, voxel_size=4.0, seed=5, counts=(0, 0, 2))
    manifest = read_manifest(manifest_path)
    pred = root / "pred"
    for k, s in enumerate(manifest.subjects):
        _, clean, _, _, _, geom = _refs(s)
        side = {"seconds": 2.0 + k, "seed": 0, "target": "flair", "sources": ["t1w", "t2w"]}
        _write_pred(
            pred / "regression", s.id, clean, geom, {**side, "mode": "regression", "nfe": 3}
        )
        noisy = rician_noise(clean, SIGMA, 100 + k)
        _write_pred(
            pred / "diffusion",
            s.id,
            noisy,
            geom,
            {**side, "mode": "diffusion", "nfe": 26, "timesteps": 26},
        )
    return manifest_path, manifest, pred


@pytest.fixture(scope="module")
def ev(cohort):
    manifest_path, _, pred = cohort
    return evaluate(pred, manifest_path, progress=False)


def _row(ev, subject, method):
    rows = ev.reference_rows if method in ("acquired", "clean") else ev.rows
    (row,) = [r for r in rows if r["subject"] == subject and r["method"] == method]
    return row


def test_methods_found_in_subfolders_reference_first(ev):
    assert ev.target == "flair"
    assert ev.method_names == ["regression", "diffusion"]
    assert ev.reference == "regression"
    assert len(ev.rows) == 2 * 2
    assert all(set(METRIC_KEYS) <= set(r) for r in ev.rows)
    assert not ev.missing and not ev.failed


def test_clean_prediction_is_perfect_against_the_clean_target(ev, cohort):
    _, manifest, _ = cohort
    for s in manifest.subjects:
        acq, clean, mask, _, _, _ = _refs(s)
        row = _row(ev, s.id, "regression")
        assert row["ssim_clean"] == pytest.approx(1.0, abs=1e-12)
        assert row["psnr_clean"] == math.inf
        # against the acquired target: the independent oracle
        assert row["ssim_acq"] == pytest.approx(ssim3d(clean, acq, mask), rel=1e-9)
        assert row["psnr_acq"] == pytest.approx(psnr(clean, acq, mask), rel=1e-9)
        # the acquired target scored against the clean one gives the same numbers (symmetry)
        assert _row(ev, s.id, "acquired")["psnr_clean"] == pytest.approx(row["psnr_acq"])
        assert _row(ev, s.id, "clean")["ssim_acq"] == pytest.approx(row["ssim_acq"])


def test_noise_levels_match_the_added_noise_and_order(ev, cohort):
    _, manifest, _ = cohort
    corr = noise_level_correction()
    for s in manifest.subjects:
        acq, _, _, wm, _, _ = _refs(s)
        clean_nl = _row(ev, s.id, "regression")["sigma_wm"]
        noisy_nl = _row(ev, s.id, "diffusion")["sigma_wm"]
        assert noisy_nl > clean_nl
        # residuals of independent noise add in quadrature; the raw RMS is ~0.96 sigma
        estimate = math.sqrt(noisy_nl**2 - clean_nl**2) / corr
        assert estimate == pytest.approx(SIGMA, rel=0.1)
        assert _row(ev, s.id, "acquired")["sigma_wm"] == pytest.approx(noise_level(acq, wm))
        assert _row(ev, s.id, "clean")["sigma_wm"] == pytest.approx(clean_nl)


def test_downstream_segmentation_matches_the_rule_and_volumes(ev, cohort):
    _, manifest, _ = cohort
    for s in manifest.subjects:
        acq, clean, mask, wm, wmh, geom = _refs(s)
        voxel_ml = float(np.prod(geom.voxel_size)) / 1000.0
        seg = segment_wmh(clean, wm, region=wm | wmh)
        row = _row(ev, s.id, "regression")
        assert row["dice"] == pytest.approx(dice(seg, wmh))
        assert row["lesion_ml"] == pytest.approx(seg.sum() * voxel_ml)
        seg_acq = segment_wmh(acq, wm, region=wm | wmh)
        assert _row(ev, s.id, "acquired")["dice"] == pytest.approx(dice(seg_acq, wmh))
        assert ev.lesion_volumes["labels"][s.id] == pytest.approx(wmh.sum() * voxel_ml)
        assert ev.lesion_volumes["acquired"][s.id] == pytest.approx(seg_acq.sum() * voxel_ml)


def test_time_nfe_and_diffusion_preview_note_come_from_sidecars(ev):
    assert _row(ev, "sub-000", "regression")["nfe"] == 3
    assert _row(ev, "sub-001", "diffusion")["time_s"] == 3.0
    summary = {e["method"]: e for e in ev.summary}
    assert summary["diffusion"]["nfe"] == 26
    assert summary["regression"]["time_s_mean"] == pytest.approx(2.5)
    assert any("diffusion used 26 timesteps (short preview)" in n for n in ev.notes)
    assert any(n.startswith("FID skipped") for n in ev.notes)
    assert ev.fid == {}


def test_summary_stats_qc_and_noise_curve(ev):
    summary = {e["method"]: e for e in ev.summary}
    assert [e["method"] for e in ev.summary] == ["regression", "diffusion", "acquired", "clean"]
    vals = [_row(ev, s, "diffusion")["ssim_acq"] for s in ("sub-000", "sub-001")]
    assert summary["diffusion"]["ssim_acq_mean"] == pytest.approx(np.mean(vals))
    assert summary["diffusion"]["ssim_acq_std"] == pytest.approx(np.std(vals, ddof=1))
    # Wilcoxon with 2 pairs of one sign: the exact two-sided p is 0.5
    assert ev.stats["p_vs_reference"]["diffusion"]["ssim_acq"] == pytest.approx(0.5)
    assert ev.stats["n_vs_reference"]["diffusion"]["ssim_acq"] == 2
    assert set(ev.stats["icc"]) == {"regression", "diffusion"}
    # QC: ceil(10 % of 2) = 1 subject, the one with the lowest SSIM
    for name in ev.method_names:
        worst = ev.qc[name]["ssim"]
        scores = {s: _row(ev, s, name)["ssim_acq"] for s in ev.subjects}
        assert [w["subject"] for w in worst] == [min(scores, key=scores.get)]
        assert len(ev.qc[name]["dice"]) == 1
        assert worst[0]["subject"] in ev.thumbnails
    thumb = ev.thumbnails[ev.example_subject]
    assert set(thumb["sources"]) == {"t1w", "t2w"}
    assert set(thumb["methods"]) == {"regression", "diffusion"}
    # noise curve: sigma 0 is the regression output itself; more noise, higher sigma_WM
    for s in ev.subjects:
        curve = sorted((r for r in ev.noise_rows if r["subject"] == s), key=lambda r: r["sigma"])
        assert [r["sigma"] for r in curve] == [0.0, 2.0, 4.0, 6.0, 8.0]
        assert curve[0]["sigma_wm"] == _row(ev, s, "regression")["sigma_wm"]
        assert np.all(np.diff([r["sigma_wm"] for r in curve]) > 0)
        assert np.all(np.diff([r["ssim_clean"] for r in curve]) < 0)


def test_missing_predictions_are_reported_and_the_rest_evaluated(cohort, tmp_path):
    manifest_path, _, pred = cohort
    shutil.copytree(pred, tmp_path / "pred")
    (tmp_path / "pred" / "diffusion" / "sub-001_flair.nii.gz").unlink()
    ev = evaluate(tmp_path / "pred", manifest_path, progress=False)
    assert ev.missing == {"diffusion": ["sub-001"]}
    assert [r["subject"] for r in ev.rows if r["method"] == "diffusion"] == ["sub-000"]
    assert any("no prediction for 1 subject(s): sub-001" in n for n in ev.notes)


def test_no_predictions_raise_input_error(cohort, tmp_path):
    manifest_path, _, _ = cohort
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no files named"):
        evaluate(tmp_path / "empty", manifest_path, progress=False)
    with pytest.raises(InputError, match="does not exist"):
        evaluate(tmp_path / "nowhere", manifest_path, progress=False)
    with pytest.raises(InputError, match="no subjects in split"):
        evaluate(tmp_path / "empty", manifest_path, split="train", progress=False)


def test_naming_from_sidecars_folder_or_mapping(cohort, tmp_path):
    manifest_path, manifest, pred = cohort
    target, methods = find_methods(pred / "diffusion", manifest)
    assert target == "flair" and [m.name for m in methods] == ["diffusion"]
    bare = tmp_path / "my-run"
    bare.mkdir()
    for f in (pred / "regression").glob("*.nii.gz"):
        shutil.copy(f, bare / f.name)
    _, methods = find_methods(bare, manifest)
    assert [m.name for m in methods] == ["my-run"]
    assert methods[0].description.startswith("no sidecars")
    _, methods = find_methods({"b": pred / "diffusion", "a": bare}, manifest)
    assert [m.name for m in methods] == ["b", "a"]
    with pytest.raises(ConfigError, match="reserved"):
        find_methods({"clean": bare}, manifest)
    with pytest.raises(ConfigError, match="not a modality"):
        find_methods(pred, manifest, target="ct")


def test_sidecar_normalization_is_used_for_the_acquired_target(cohort, tmp_path):
    manifest_path, manifest, _ = cohort
    for s in manifest.subjects:
        _, clean, _, _, _, geom = _refs(s, method="percentile")
        side = {"mode": "regression", "nfe": 3, "normalization": {"method": "percentile"}}
        _write_pred(tmp_path / "pct", s.id, clean, geom, side)
    ev = evaluate(tmp_path / "pct", manifest_path, progress=False)
    assert ev.settings["normalization"] == {"regression": "percentile"}
    for s in manifest.subjects:
        assert _row(ev, s.id, "regression")["ssim_clean"] == pytest.approx(1.0, abs=1e-12)
    assert any("'percentile'" in n for n in ev.notes)


def test_a_ct_target_is_scored_on_the_ct_window(tmp_path):
    """A model trained to a target named ct (default tissue normalization) writes HU; the
    acquired CT goes on the same CT window, from the model card or by the target's name."""
    rng = np.random.default_rng(0)
    mask = np.zeros((24, 24, 24), np.float32)
    mask[4:20, 4:20, 4:20] = 1
    _, grid = load_image((mask, np.diag([2.0, 2.0, 2.0, 1.0])))
    subjects = []
    for k in range(2):
        hu = np.where(mask > 0, rng.normal(40, 30, mask.shape), -1000).astype(np.float32)
        hu[8:12, 8:12, 8:12] = 900  # bone
        folder = tmp_path / f"s{k}"
        folder.mkdir()
        for name, arr in (("t1w", mask * 100), ("ct", hu), ("mask", mask)):
            save_image(arr, grid, folder / f"{name}.nii.gz")
        images = {"t1w": folder / "t1w.nii.gz", "ct": folder / "ct.nii.gz"}
        subjects.append(Subject(f"s{k}", "test", images, mask=folder / "mask.nii.gz"))
    manifest = Manifest(subjects, tmp_path)
    model = tmp_path / "model"
    model.mkdir()
    card = {"target": "ct", "sources": ["t1w"], "normalization": {"method": "tissue"}}
    (model / "model.json").write_text(json.dumps(card))
    for s in subjects:
        hu, geom = load_image(s.images["ct"])
        side = {"mode": "regression", "model": str(model)}  # no normalization: from the card
        _write_pred(tmp_path / "card", s.id, hu, geom, side, target="ct")
        side = {"mode": "regression", "normalization": "ct"}  # as yoda translate records it
        _write_pred(tmp_path / "sidecar", s.id, hu, geom, side, target="ct")
        _write_pred(tmp_path / "bare", s.id, hu, geom, None, target="ct")
    for folder in ("card", "sidecar", "bare"):
        target, methods = find_methods(tmp_path / folder, manifest)
        assert target == "ct" and methods[0].normalization == "ct"
        ev = evaluate(tmp_path / folder, manifest, progress=False)
        for s in subjects:
            row = ev.rows[[r["subject"] for r in ev.rows].index(s.id)]
            assert row["ssim_acq"] == pytest.approx(1.0, abs=1e-12)
            assert row["psnr_acq"] == math.inf
    # what the sidecar records comes first: it says how the output was made
    for s in subjects:
        hu, geom = load_image(s.images["ct"])
        side = {"mode": "regression", "model": str(model), "normalization": "tissue"}
        _write_pred(tmp_path / "recorded", s.id, hu, geom, side, target="ct")
    _, methods = find_methods(tmp_path / "recorded", manifest)
    assert methods[0].normalization == "tissue"


def test_grid_mismatch_is_reported_not_fatal(cohort, tmp_path):
    manifest_path, manifest, pred = cohort
    shutil.copytree(pred / "regression", tmp_path / "regression")
    s = manifest.subjects[1]
    _, geom = load_image(s.images["flair"])
    wrong = np.zeros((12, 13, 14), np.float32)
    save_image(
        wrong,
        _shrunk(geom, wrong.shape),
        tmp_path / "regression" / f"{s.id}_flair.nii.gz",
        overwrite=True,
    )
    ev = evaluate(tmp_path / "regression", manifest_path, progress=False)
    assert [r["subject"] for r in ev.rows] == ["sub-000"]
    assert list(ev.failed) == [f"{s.id} regression"]
    assert "not on the same voxel grid" in ev.failed[f"{s.id} regression"]


def _put_nan(path: Path) -> None:
    """Rewrite a prediction with a few NaN voxels (save_image refuses to write them)."""
    import nibabel as nib

    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[3:5, 3:5, 3:5] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), path)


def test_scored_and_left_out_subjects_name_each_gap_and_its_reason(cohort, tmp_path):
    manifest_path, _, pred = cohort
    shutil.copytree(pred, tmp_path / "pred")
    _put_nan(tmp_path / "pred" / "regression" / "sub-001_flair.nii.gz")
    ev = evaluate(tmp_path / "pred" / "regression", manifest_path, progress=False)
    # the subject's target was loaded, but its only prediction could not be scored
    assert ev.subjects == ["sub-000", "sub-001"]
    assert ev.split_subjects == ["sub-000", "sub-001"]
    assert ev.scored_subjects() == ["sub-000"]
    left = ev.left_out()
    assert list(left) == ["sub-001"] and "NaN or Inf" in left["sub-001"]
    # with a second method the gap is one prediction, not the subject
    (tmp_path / "pred" / "diffusion" / "sub-000_flair.nii.gz").unlink()
    ev = evaluate(tmp_path / "pred", manifest_path, progress=False)
    assert ev.scored_subjects() == ["sub-000", "sub-001"]
    left = ev.left_out()
    assert list(left) == ["sub-000 diffusion", "sub-001 regression"]
    assert left["sub-000 diffusion"] == "no prediction"
    assert "NaN or Inf" in left["sub-001 regression"]


def test_nothing_left_out_when_every_prediction_is_scored(ev):
    assert ev.scored_subjects() == ev.split_subjects == ["sub-000", "sub-001"]
    assert ev.left_out() == {}


def _shrunk(geom, shape):
    from dataclasses import replace

    return replace(geom, shape=tuple(shape), header=None)


def test_manifest_without_labels_or_clean_still_evaluates(cohort):
    _, manifest, pred = cohort
    bare = Manifest(
        [Subject(s.id, s.split, dict(s.images), mask=None) for s in manifest.subjects],
        manifest.root,
    )
    ev = evaluate(pred, bare, progress=False)
    assert not ev.has("ssim_clean") and not ev.has("sigma_wm") and not ev.has("dice")
    assert ev.has("ssim_acq")
    assert ev.lesion_volumes == {} and ev.stats["icc"] == {}
    assert all(set(q) == {"ssim"} for q in ev.qc.values())
    assert any("no white-matter mask" in n for n in ev.notes)


class _MeanPoolFeatures:
    """A cheap deterministic feature extractor: 4 x 4 mean-pooled slices (D = 16)."""

    def slice_features(self, slices):
        s = np.asarray(slices, dtype=np.float64)
        h, w = s.shape[1] // 4 * 4, s.shape[2] // 4 * 4
        pooled = s[:, :h, :w].reshape(s.shape[0], 4, h // 4, 4, w // 4).mean(axis=(2, 4))
        return pooled.reshape(s.shape[0], 16)


def test_fid_sets_and_oracle(cohort):
    from yoda.evaluate.fid import axial_slices, fid_from_features

    manifest_path, manifest, pred = cohort
    model = _MeanPoolFeatures()
    ev = evaluate(pred, manifest_path, progress=False, fid_model=model, noise_sigmas=(4.0,))
    assert set(ev.fid) == {"regression", "diffusion", "clean", "regression+noise 4"}
    # the regression stand-in is the clean target itself: identical features, identical FID
    assert ev.fid["regression"] == ev.fid["clean"]
    feats = {"acq": [], "diff": []}
    for s in manifest.subjects:
        acq, _, mask, *_ = _refs(s)
        noisy = load_image(pred / "diffusion" / f"{s.id}_flair.nii.gz")[0]
        feats["acq"].append(model.slice_features(axial_slices(np.where(mask, acq, 0.0))))
        feats["diff"].append(model.slice_features(axial_slices(np.where(mask, noisy, 0.0))))
    oracle = fid_from_features(np.concatenate(feats["diff"]), np.concatenate(feats["acq"]))
    assert ev.fid["diffusion"] == pytest.approx(oracle, rel=1e-9)
    assert {e["method"]: e["fid"] for e in ev.summary}["diffusion"] == ev.fid["diffusion"]


def test_feature_stats_fold_to_the_same_fid():
    from yoda.evaluate.evaluation import FeatureStats

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 6)), rng.normal(0.5, 2.0, size=(30, 6))
    kept, folded = (FeatureStats(), FeatureStats()), (FeatureStats(8), FeatureStats(8))
    for st, x in zip(kept, (a, b), strict=True):
        st.add(x[:25])
        st.add(x[25:])
    for st, x in zip(folded, (a, b), strict=True):
        st.add(x[:5])
        st.add(x[5:])
    assert folded[0].features() is None and kept[0].features() is not None
    assert folded[0].fid(folded[1]) == pytest.approx(kept[0].fid(kept[1]), rel=1e-8)


def test_fid_from_a_weights_file_is_loaded(cohort, tmp_path, monkeypatch):
    import yoda.evaluate.fid as fid_module

    manifest_path, _, pred = cohort
    weights = fid_module.ResNet50Features(size=32).save_weights(tmp_path / "resnet.safetensors")
    seen = {}

    def features(self, slices, batch_size=32):
        seen["path"] = self.weights_path
        return _MeanPoolFeatures().slice_features(slices)

    monkeypatch.setattr(fid_module.ResNet50Features, "slice_features", features)
    ev = evaluate(
        pred / "regression",
        manifest_path,
        progress=False,
        fid_weights=weights,
        fid_size=32,
        noise_sigmas=(4.0,),
    )
    assert seen["path"] == weights
    assert set(ev.fid) == {"regression", "clean", "regression+noise 4"}
    assert any(str(weights) in n for n in ev.notes)


def test_summary_nfe_is_the_mean_over_subjects():
    from yoda.evaluate.evaluation import MethodPredictions, _summary

    rows = [
        {
            "subject": f"s{i}",
            "method": "m",
            "time_s": 1.0,
            "nfe": n,
            **dict.fromkeys(METRIC_KEYS, 0.5),
        }
        for i, n in enumerate([3, 3, 3, 753])
    ]
    methods = [MethodPredictions(name="m", folder=Path("."), files={})]
    stats = {"p_vs_reference": {}, "p_vs_acquired": {}}
    (entry,) = _summary(rows, [], methods, stats, {})
    assert entry["nfe"] == pytest.approx(190.5)  # not the mean of the distinct values (378)


def test_paired_tests_keep_a_failed_subject():
    from yoda.evaluate.evaluation import _paired_p

    method = {"a": math.inf, "b": 1.0, "c": 2.0, "d": math.nan}
    reference = {"a": 3.0, "b": 1.5, "c": 2.5, "d": 1.0, "e": 0.0}
    p, n = _paired_p(method, reference)
    assert n == 3  # the infinite distance counts, the NaN does not
    assert 0.0 < p <= 1.0
