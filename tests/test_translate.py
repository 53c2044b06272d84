"""Translation of one subject with the tiny trained model: grids, modes, seeds, outputs, CLI."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
from scipy import ndimage

from yoda import __version__
from yoda.cli import main
from yoda.data import io
from yoda.diffusion import sampling
from yoda.errors import ConfigError, InputError, ModelError
from yoda.model.checkpoint import read_card
from yoda.translate import Translator, domain_warnings
from yoda.volume.views import VIEWS


@pytest.fixture(scope="module")
def sources(subject) -> dict[str, Path]:
    return {"t1w": subject["t1w"], "t2w": subject["t2w"]}


@pytest.fixture(scope="module")
def translator(tiny_model: Path) -> Translator:
    return Translator.load(tiny_model, device="cpu")


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Rodrigues rotation matrix about ``axis``."""
    k = axis / np.linalg.norm(axis)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    a = np.deg2rad(degrees)
    return np.eye(3) + np.sin(a) * cross + (1 - np.cos(a)) * cross @ cross


def write_grid(subject: dict[str, Path], folder: Path, kind: str) -> dict[str, Path]:
    """The subject's files stored in another voxel order and/or an oblique grid.

    "RAS": unchanged. "LIA": voxel axes flipped and permuted (the affine follows, so the
    anatomy in world space is the same). "oblique": PSR voxel order and the whole scene turned
    by 25 degrees about an oblique axis (every file identically, so they stay co-registered).
    """
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for role, path in subject.items():
        img = nib.load(path)
        if kind != "RAS":
            codes = "LIA" if kind == "LIA" else "PSR"
            img = img.as_reoriented(ornt_transform(io_orientation(img.affine), axcodes2ornt(codes)))
        affine = img.affine.copy()
        if kind == "oblique":
            turn = np.eye(4)
            turn[:3, :3] = _rotation(np.array([1.0, 2.0, 0.5]), 25.0)
            affine = turn @ affine
        data = np.asarray(img.dataobj, dtype=np.float32)
        out[role] = folder / f"{role}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), out[role])
    return out


def _smooth_corr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Correlation inside ``mask`` after a 1-voxel Gaussian (the reference FLAIR is noisy)."""
    sa, sb = ndimage.gaussian_filter(a, 1.0), ndimage.gaussian_filter(b, 1.0)
    return float(np.corrcoef(sa[mask], sb[mask])[0, 1])


def _cli(model: Path, files: dict[str, Path], out: Path, *extra: str) -> int:
    args = ["translate", "--model", str(model), "--t1w", str(files["t1w"])]
    args += ["--t2w", str(files["t2w"]), "--out", str(out), "--no-progress", "--device", "cpu"]
    return main([*args, *extra])


# ------------------------------------------------------------------------------------------
# grids: the output has the first source's exact grid, and the content is in the right place


@pytest.fixture(scope="module")
def ras_result(translator, sources):
    return translator.translate(sources, seed=0)


@pytest.mark.parametrize("kind", ["RAS", "LIA", "oblique"])
def test_output_keeps_grid_and_places_content(
    kind, tiny_model, subject, ras_result, tmp_path, capsys
):
    files = write_grid(subject, tmp_path / "in", kind)
    src = nib.load(files["t1w"])
    expected_codes = {"RAS": ("R", "A", "S"), "LIA": ("L", "I", "A"), "oblique": ("P", "S", "R")}
    assert nib.aff2axcodes(src.affine) == expected_codes[kind]
    if kind == "oblique":
        assert np.count_nonzero(np.abs(src.affine[:3, :3]) > 1e-6) == 9  # truly oblique

    out = tmp_path / "flair.nii.gz"
    assert _cli(tiny_model, files, out) == 0, capsys.readouterr().err
    img = nib.load(out)
    assert img.shape == src.shape
    np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)

    # in canonical order the result is the RAS subject's (the same anatomy)
    canonical, _ = io.load_image(out)
    np.testing.assert_allclose(canonical, ras_result.image, atol=1e-4)

    # in the file's own voxel order the output lies on the reference FLAIR, not beside it
    pred = img.get_fdata()
    ref = nib.load(files["flair"]).get_fdata()
    brain = nib.load(files["mask"]).get_fdata() > 0
    right = _smooth_corr(pred, ref, brain)
    lr_axis = [c in "LR" for c in nib.aff2axcodes(src.affine)].index(True)
    wrong = {"flipped left-right": _smooth_corr(pred, np.flip(ref, lr_axis), brain)}
    for axis in range(3):
        for shift in (-4, 4):
            wrong[f"shifted {shift} along {axis}"] = _smooth_corr(
                pred, np.roll(ref, shift, axis), brain
            )
    assert right > 0.75, right
    for what, corr in wrong.items():
        assert right > corr + 0.08, (what, right, corr)


# ------------------------------------------------------------------------------------------
# modes and NFE


@pytest.mark.parametrize(
    ("mode", "options", "nfe"),
    [
        ("regression", {"views": "all"}, 3),
        ("regression", {"views": "axial"}, 1),
        ("diffusion", {"steps": 3}, 3),
        ("expa", {"n_ex": 2, "steps": 3}, 6),
    ],
    ids=["regression-all", "regression-axial", "diffusion-3", "expa-2x3"],
)
def test_every_mode_runs_and_counts_nfe(translator, sources, mode, options, nfe):
    calls = []
    res = translator.translate(
        sources, mode=mode, seed=1, progress=lambda k, n: calls.append((k, n)), **options
    )
    assert res.info["nfe"] == nfe and res.info["mode"] == mode
    shape = nib.load(sources["t1w"]).shape
    assert res.image.shape == shape and np.isfinite(res.image).all()
    assert res.image.min() >= 0 and res.image.max() <= 255 and res.image.max() > 50
    steps = nfe if mode != "expa" else nfe // options["n_ex"]
    assert calls == [(k, steps) for k in range(1, steps + 1)]


class _Stop(Exception):
    pass


def test_truncated_diffusion_plans_251_steps_at_T1000(translator, sources):
    assert translator.card.T == 1000
    assert len(sampling.timesteps_for(translator.schedule)) == 251
    seen = []

    def progress(k, n):
        seen.append((k, n))
        raise _Stop  # stop after the first network evaluation

    with pytest.raises(_Stop):
        translator.translate(sources, mode="diffusion", progress=progress)
    assert seen == [(1, 251)]


def test_regression_of_all_views_is_the_mean_of_single_views(translator, sources):
    both = translator.translate(sources, views="all", seed=3).image
    singles = [translator.translate(sources, views=v, seed=3).image for v in VIEWS]
    np.testing.assert_allclose(both, np.mean(singles, axis=0), atol=2e-3)
    assert np.abs(singles[0] - singles[1]).max() > 1.0  # the views do differ


def test_expa_with_one_sample_is_diffusion(translator, sources):
    one = translator.translate(sources, mode="expa", n_ex=1, steps=3, seed=11)
    ref = translator.translate(sources, mode="diffusion", steps=3, seed=11)
    np.testing.assert_array_equal(one.image, ref.image)
    assert one.info["nfe"] == ref.info["nfe"] == 3


def test_seed_reproduces_and_another_seed_changes_diffusion(translator, sources):
    a = translator.translate(sources, mode="diffusion", steps=2, seed=5).image
    b = translator.translate(sources, mode="diffusion", steps=2, seed=5).image
    c = translator.translate(sources, mode="diffusion", steps=2, seed=6).image
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1.0


def test_a_prepared_subject_translates_as_its_sources(translator, sources, subject):
    mask = subject["mask"]
    prepared = translator.prepare(sources, mask=mask)
    a = translator.translate(prepared, mode="diffusion", steps=2, seed=5)
    b = translator.translate(sources, mode="diffusion", steps=2, seed=5, mask=mask)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.info["prepare_seconds"] == round(prepared.seconds, 3) > 0
    parts = a.info["prepare_seconds"] + a.info["sampling_seconds"]
    assert a.info["seconds"] >= parts - 0.002  # each rounded to 1 ms
    with pytest.raises(ConfigError, match="took its mask and resample options already"):
        translator.translate(prepared, mask=mask)


def test_sampling_options_are_checked_before_the_sources_are_read(translator, tmp_path):
    missing = {"t1w": tmp_path / "none.nii.gz", "t2w": tmp_path / "none.nii.gz"}
    with pytest.raises(ConfigError, match="1001 sampling steps exceed"):
        translator.translate(missing, mode="diffusion", steps=1001)
    with pytest.raises(ConfigError, match="1001 sampling steps exceed"):
        translator.check_options(mode="diffusion", steps=1001, seed=3)  # others not checked
    translator.check_options(mode="regression", steps=1001)  # regression takes no steps


# ------------------------------------------------------------------------------------------
# output files


def test_sidecar_samples_and_std(tiny_model, sources, tmp_path, capsys):
    out = tmp_path / "flair.nii.gz"
    code = _cli(
        tiny_model, sources, out, "--mode", "expa", "--n-ex", "2", "--steps", "2",
        "--seed", "7", "--save-samples",
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    info = json.loads((tmp_path / "flair.json").read_text())
    assert info["model"] == str(Path(tiny_model).resolve()) and info["mode"] == "expa"
    assert info["nfe"] == 4 and info["seed"] == 7 and info["n_ex"] == 2
    assert info["dtype"] == "float32" and info["saved_samples"] == 2 and info["weights"] == "ema"
    assert info["yoda_version"] == __version__
    assert 0 < info["sampling_seconds"] <= info["seconds"]
    assert 0 < info["prepare_seconds"] <= info["seconds"] - info["sampling_seconds"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "flair.json",
        "flair.nii.gz",
        "flair_sample-1.nii.gz",
        "flair_sample-2.nii.gz",
        "flair_std.nii.gz",
    ]
    samples = np.stack(
        [nib.load(tmp_path / f"flair_sample-{k}.nii.gz").get_fdata() for k in (1, 2)]
    )
    image = nib.load(out).get_fdata()
    std = nib.load(tmp_path / "flair_std.nii.gz").get_fdata()
    assert np.abs(samples[0] - samples[1]).max() > 1.0  # two different trajectories
    # Eq. 9 on the 0-255 scale: the image is the RMS of the samples
    np.testing.assert_allclose(image, np.sqrt((samples**2).mean(axis=0)), atol=2e-3)
    np.testing.assert_allclose(std, samples.std(axis=0), atol=1e-3)
    assert "NFE 4" in capsys.readouterr().out


def test_uint8_output(tiny_model, sources, translator, tmp_path, capsys):
    out = tmp_path / "flair.nii.gz"
    assert _cli(tiny_model, sources, out, "--dtype", "uint8", "--views", "axial") == 0
    img = nib.load(out)
    assert img.get_data_dtype() == np.uint8
    ref = translator.translate(sources, views="axial", seed=0).image
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.clip(np.rint(ref), 0, 255))
    assert not (tmp_path / "flair_std.nii.gz").exists()


def test_cli_speed_options_keep_the_translation(
    tiny_model, sources, translator, tmp_path, capsys, monkeypatch
):
    """--channels-last and --compile reach the Translator and change the output by rounding."""
    seen = {}
    load = Translator.load.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(Translator, "load", classmethod(spy))
    ref = translator.translate(sources, views="axial", seed=0).image
    out = tmp_path / "flair.nii.gz"
    flags = ("--views", "axial", "--channels-last", "--compile", "eager")
    assert _cli(tiny_model, sources, out, *flags) == 0
    assert seen["channels_last"] is True and seen["compile"] == "eager"
    np.testing.assert_allclose(nib.load(out).get_fdata(), ref, rtol=0, atol=5e-3)
    assert _cli(tiny_model, sources, tmp_path / "b.nii.gz", "--compile", "fastest") == 1
    assert "unknown compile option 'fastest'" in _one_line_error(capsys)
    assert not (tmp_path / "b.nii.gz").exists()


def test_auto_precision_is_fp16_on_cuda_and_fp32_on_the_cpu(tiny_model):
    from yoda.device import inference_precision

    assert inference_precision("auto", torch.device("cuda")) == "fp16"
    assert inference_precision("auto", torch.device("cpu")) == "fp32"
    assert inference_precision("bf16", torch.device("cuda")) == "bf16"
    with pytest.raises(ConfigError, match="precision must be one of"):
        inference_precision("fp64", torch.device("cpu"))
    tr = Translator.load(tiny_model, device="cpu")
    assert tr.precision == "fp32" and tr.amp_dtype is None


def test_batch_size_is_automatic_by_default_and_checked(tiny_model):
    assert Translator.load(tiny_model, device="cpu").batch_size is None
    assert Translator.load(tiny_model, device="cpu", batch_size=5).batch_size == 5
    for bad in (0, 2.5, True, "8"):
        with pytest.raises(ConfigError, match="batch size must be a positive integer"):
            Translator.load(tiny_model, device="cpu", batch_size=bad)


@pytest.mark.parametrize(
    ("precision", "value", "hint"),
    [
        ("bf16", "nan", " in bf16; use precision fp32 (--precision fp32)"),
        ("fp32", "inf", ""),
    ],
)
def test_a_network_that_overflows_is_refused_with_a_hint(
    tiny_model, sources, precision, value, hint
):
    """Non-finite network outputs (an fp16 overflow: inf, or inf - inf) stop the translation
    with the way out, although the samplers clamp every x0_hat to [-1, 1]."""
    tr = Translator.load(tiny_model, device="cpu", precision=precision)

    def overflow(_module, _args, out):
        return torch.full_like(out, float(value))

    hook = tr.model.register_forward_hook(overflow)
    try:
        with pytest.raises(ModelError, match=re.escape(f"non-finite values{hint}") + "$"):
            tr.translate(sources, views="axial")
    finally:
        hook.remove()


# ------------------------------------------------------------------------------------------
# command-line errors: one line, non-zero exit, no output


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("yoda translate: error: ") and "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--t1w", "{t1w}", "--pd", "{t2w}"], "missing --t2w; unexpected --pd"),
        (["--t1w", "{t1w}"], "missing --t2w"),
        (["--t1w", "{t1w}", "--t2w"], "--t2w needs a file path"),
        (["--t1w", "{t1w}", "--t2w="], "--t2w needs a file path"),
        (["--t1w", "{t1w}", "--t2w", "{t2w}", "stray"], "unexpected argument 'stray'"),
        (["--t1w", "{t1w}", "--t2w", "{shifted}"], "not on the same voxel grid"),
    ],
    ids=[
        "wrong-flag",
        "missing-flag",
        "flag-without-path",
        "empty-path",
        "stray-token",
        "other-grid",
    ],
)
def test_cli_source_errors(tiny_model, sources, tmp_path, capsys, flags, message):
    img = nib.load(sources["t2w"])
    shifted_affine = img.affine.copy()
    shifted_affine[0, 3] += 2.0  # half a voxel: same shape, another grid
    shifted = tmp_path / "t2w_shifted.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), shifted_affine), shifted)
    names = {"t1w": sources["t1w"], "t2w": sources["t2w"], "shifted": shifted}
    out = tmp_path / "out" / "flair.nii.gz"
    out.parent.mkdir()
    args = ["translate", "--model", str(tiny_model), "--out", str(out), "--no-progress"]
    code = main(args + [f.format(**names) for f in flags])
    assert code == 1
    assert message in _one_line_error(capsys)
    assert list(out.parent.iterdir()) == []


def test_cli_existing_output_needs_force(tiny_model, sources, tmp_path, capsys):
    out = tmp_path / "flair.nii.gz"
    out.write_bytes(b"previous result")
    assert _cli(tiny_model, sources, out, "--views", "axial") == 1
    assert "pass --force" in _one_line_error(capsys)
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flair.nii.gz"]
    assert _cli(tiny_model, sources, out, "--views", "axial", "--force") == 0
    assert nib.load(out).shape == nib.load(sources["t1w"]).shape

    # a sidecar of that name is an output too
    lone = tmp_path / "lone.nii.gz"
    (tmp_path / "lone.json").write_text("{}")
    assert _cli(tiny_model, sources, lone, "--views", "axial") == 1
    assert "lone.json exists; pass --force" in _one_line_error(capsys)
    assert not lone.exists()


@pytest.mark.parametrize(
    ("flags", "words"),
    [(["--steps", "5"], "--steps sets the diffusion timesteps"),
     (["--save-samples", "--mode", "diffusion"], "--save-samples writes the ExpA samples"),
     (["--out-dir", "elsewhere"], "--out-dir and --split are for batch mode"),
     (["--split", "val"], "--out-dir and --split are for batch mode")],
)  # fmt: skip
def test_cli_refuses_options_that_would_be_ignored(
    flags, words, tiny_model, sources, tmp_path, capsys
):
    assert _cli(tiny_model, sources, tmp_path / "flair.nii.gz", *flags) == 1
    assert words in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_a_repeated_source_and_a_seed_out_of_range(
    tiny_model, sources, tmp_path, capsys
):
    out = tmp_path / "flair.nii.gz"
    assert _cli(tiny_model, sources, out, "--t1w", str(sources["t2w"])) == 1
    assert "--t1w is given twice" in _one_line_error(capsys)
    for seed in (-1, 2**64):
        assert _cli(tiny_model, sources, out, "--seed", str(seed)) == 1
        assert "seed must be an integer from 0 to 2**64 - 1" in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []
    assert _cli(tiny_model, sources, out, "--seed", str(2**64 - 1), "--views", "axial") == 0


def test_running_out_of_memory_while_sampling_is_one_line(translator, sources, monkeypatch):
    message = (
        "DefaultCPUAllocator: can't allocate memory: you tried to allocate 3200000000000 bytes"
    )

    def fails(*_args, **_kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(sampling, "expa", fails)
    with pytest.raises(InputError, match=r"not enough memory to sample 9 ExpA trajectories of "):
        translator.translate(sources, mode="expa", n_ex=9, steps=2)
    monkeypatch.setattr(sampling, "regression", fails)
    with pytest.raises(InputError, match="sample the volume of .* voxels; lower --batch-size"):
        translator.translate(sources)
    message = "an unrelated failure"
    with pytest.raises(RuntimeError, match="an unrelated failure"):  # other errors stay
        translator.translate(sources)


def test_saved_samples_need_force_and_stale_ones_go(tiny_model, sources, tmp_path, capsys):
    out = tmp_path / "e.nii.gz"
    expa = ("--mode", "expa", "--steps", "2", "--views", "axial", "--save-samples")
    (tmp_path / "e_sample-2.nii.gz").write_bytes(b"precious")
    assert _cli(tiny_model, sources, out, *expa, "--n-ex", "2") == 1
    assert "e_sample-2.nii.gz exists; pass --force" in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e_sample-2.nii.gz"]
    (tmp_path / "e_sample-2.nii.gz").unlink()
    assert _cli(tiny_model, sources, out, *expa, "--n-ex", "3") == 0
    names = ["e.json", "e.nii.gz", "e_sample-1.nii.gz", "e_sample-2.nii.gz", "e_sample-3.nii.gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [*names, "e_std.nii.gz"]
    (tmp_path / "e_sample-1.txt").write_text("not ours")
    # replaced by a run of 2 samples: the third sample of the earlier run goes
    assert _cli(tiny_model, sources, out, *expa, "--n-ex", "2", "--force") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*names[:4], "e_sample-1.txt", "e_std.nii.gz"]
    )
    assert _cli(tiny_model, sources, out, "--views", "axial", "--force") == 0  # no samples now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json", "e.nii.gz", "e_sample-1.txt"]


def test_saving_over_an_output_needs_overwrite(translator, sources, tmp_path):
    res = translator.translate(sources, views="axial")
    (tmp_path / "flair.json").write_text("{}")
    with pytest.raises(InputError, match=r"flair.json exists \(overwrite=True replaces it\)"):
        res.save(tmp_path / "flair.nii.gz")
    assert res.save(tmp_path / "flair.nii.gz", overwrite=True).exists()
    assert json.loads((tmp_path / "flair.json").read_text())["mode"] == "regression"
    for name in ("flair.png", "flair.NII.GZ", ".nii"):
        with pytest.raises(InputError, match="must end in .nii.gz, .nii, .mgz, .mgh"):
            res.save(tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flair.json", "flair.nii.gz"]


@pytest.mark.parametrize(
    ("target", "normalization"),
    [("flair", {"method": "ct"}), ("ct", {"method": "tissue", "modalities": {"ct": "ct"}})],
)
def test_ct_models_write_hounsfield_units_and_refuse_uint8(
    tiny_model, sources, tmp_path, capsys, target, normalization
):
    """A target on the CT window (the normalization, or a target named ct under the default
    tissue normalization) comes out in HU. 0..255 cannot hold them: uint8 is refused before
    any work, and by ``save``."""
    ct = tmp_path / "ct-model"
    shutil.copytree(tiny_model, ct)
    card = json.loads((ct / "model.json").read_text())
    card["normalization"] = normalization
    card["target"] = target
    (ct / "model.json").write_text(json.dumps(card))
    out = tmp_path / "out" / "ct.nii.gz"
    out.parent.mkdir()
    assert _cli(ct, sources, out, "--views", "axial", "--dtype", "uint8") == 1
    assert "not the Hounsfield units of a CT model" in _one_line_error(capsys)
    assert list(out.parent.iterdir()) == []
    res = Translator.load(ct, device="cpu").translate(sources, views="axial")
    assert res.image.min() < -900  # air in HU
    with pytest.raises(ConfigError, match="Hounsfield"):
        res.save(out, dtype="uint8")
    assert list(out.parent.iterdir()) == []
    res.save(out)
    assert nib.load(out).get_data_dtype() == np.float32
    assert json.loads(out.with_name("ct.json").read_text())["normalization"] == "ct"


def test_the_network_sees_the_training_canvas(tiny_model, sources, tmp_path):
    """Slices are centred on the training slabs' in-plane size, as in training."""
    tr = Translator.load(tiny_model, device="cpu")
    canvas = tuple(read_card(tiny_model).training["slab_size"])
    assert tr.canvas == canvas
    shapes = []
    hook = tr.model.register_forward_pre_hook(lambda _m, args: shapes.append(args[0].shape[-2:]))
    try:
        tr.translate(sources, views="all")
    finally:
        hook.remove()
    assert len(shapes) > 0 and all(h >= canvas[0] and w >= canvas[1] for h, w in shapes)

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    card = json.loads((bad / "model.json").read_text())
    card["training"]["slab_size"] = "80x80"
    (bad / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="slab_size"):
        Translator.load(bad, device="cpu")
    card["training"]["slab_size"] = [80, 80]
    card["training"]["voxel_sizes"] = [3.0, 3.0, 3.0]
    (bad / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="voxel_sizes"):
        Translator.load(bad, device="cpu")
    card["training"]["voxel_sizes"] = [[3.0, 3.0, 3.0]]
    card["training"]["views"] = ["axial", "oblique"]
    (bad / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="training.views"):
        Translator.load(bad, device="cpu")


def test_domain_warnings_name_voxel_sizes_and_slices_unlike_training():
    trained = {"trained_voxel_sizes": [(1.0, 1.0, 1.0), (3.0, 3.0, 3.0)], "canvas": (80, 80)}
    assert domain_warnings((3.6, 2.4, 3.0), (60, 70, 50), **trained) == []
    (voxel,) = domain_warnings((3.0, 3.0, 4.0), (60, 70, 50), **trained)
    assert voxel.startswith("voxel size 3 x 3 x 4 mm") and "1 x 1 x 1, 3 x 3 x 3 mm" in voxel
    # slices in canonical axes: axial (x, y), coronal (x, z), sagittal (y, z); the canvas is
    # (H, W) of those, so on a 96 x 64 canvas only the axial 90 x 70 slices are too large
    (axial,) = domain_warnings((1.0, 1.0, 1.0), (90, 70, 50), **{**trained, "canvas": (96, 64)})
    assert axial.startswith("axial slices") and "(90 x 70 voxels)" in axial and "96 x 64" in axial
    axial, coronal = domain_warnings((1.0, 1.0, 1.0), (90, 70, 50), **trained)
    assert coronal.startswith("coronal slices") and "(90 x 50 voxels)" in coronal
    assert domain_warnings((1.0, 1.0, 1.0), (90, 70, 50), ["sagittal"], **trained) == []
    assert domain_warnings((0.5, 0.5, 9.0), (300, 300, 300)) == []  # the card says nothing
    # views the model was not trained on
    (views,) = domain_warnings((1.0, 1.0, 1.0), (9, 9, 9), trained_views=("axial",))
    assert views == (
        "the model was trained on axial slices only, not on coronal, sagittal slices; the "
        "output may be unreliable (choose --views axial)"
    )
    assert domain_warnings((1.0, 1.0, 1.0), (9, 9, 9), ["axial"], trained_views=("axial",)) == []


def test_translation_unlike_the_training_data_is_flagged(tiny_model, sources, tmp_path, capsys):
    """The tiny model was trained at 4 mm: the same images labelled 2 mm get a warning on
    stderr and in the sidecar, and the translation still succeeds."""
    assert read_card(tiny_model).training["voxel_sizes"] == [[4.0, 4.0, 4.0]]
    out = tmp_path / "flair.nii.gz"
    assert _cli(tiny_model, sources, out, "--views", "axial") == 0
    assert capsys.readouterr().err == ""
    assert json.loads(out.with_suffix("").with_suffix(".json").read_text())["warnings"] == []

    relabelled = {}
    for name, path in sources.items():
        img = nib.load(path)
        affine = img.affine.copy()
        affine[:3, :3] /= 2
        relabelled[name] = tmp_path / f"{name}_2mm.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), relabelled[name])
    out2 = tmp_path / "flair_2mm.nii.gz"
    assert _cli(tiny_model, relabelled, out2, "--views", "axial") == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "yoda translate: warning: voxel size 2 x 2 x 2 mm is unlike the model's training data "
        "(4 x 4 x 4 mm); the output may be unreliable"
    ]
    sidecar = json.loads(out2.with_suffix("").with_suffix(".json").read_text())
    assert sidecar["warnings"] == [err[0].removeprefix("yoda translate: warning: ")]

    # batch mode lists them per subject
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"id,split,t1w,t2w\ns2mm,test,{relabelled['t1w']},{relabelled['t2w']}\n")
    args = ["translate", "--model", str(tiny_model), "--data", str(manifest), "--split", "test"]
    args += ["--out-dir", str(tmp_path / "batch"), "--views", "axial", "--no-progress"]
    assert main(args) == 0
    assert capsys.readouterr().err.splitlines() == ["  warning s2mm: " + sidecar["warnings"][0]]


@pytest.mark.parametrize(("views", "axis"), [("coronal", 1), ("sagittal", 0), ("all", 2)])
def test_slice_correction_runs_along_the_slices_translated(
    translator, sources, monkeypatch, views, axis
):
    """A single view is corrected across its own slices; several views across axial ones."""
    import yoda.translate as tr_module

    seen = []

    def record(vol, method, axis, mask):
        seen.append((method, axis, vol.shape == mask.shape))
        return vol

    monkeypatch.setattr(tr_module, "slice_correction", record)
    translator.translate(sources, views=views, slice_correction="linear")
    assert seen == [("linear", axis, True)]
