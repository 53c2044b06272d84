"""The demo pipeline with the bundled model reproduces the paper's qualitative findings."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from yoda.cli import main
from yoda.data.io import load_image
from yoda.data.manifest import read_manifest
from yoda.demo import (
    DEMO_SEED,
    PREVIEW_STEPS,
    bundled_model_dir,
    format_summary,
    methods_for,
    run_demo,
)
from yoda.errors import ConfigError
from yoda.evaluate.metrics import lesion_cnr
from yoda.model.checkpoint import load_model


def test_bundled_model_loads_and_documents_itself():
    model, card = load_model(bundled_model_dir())
    assert card.sources == ["t1w", "t2w"] and card.target == "flair"
    assert card.normalization["method"] == "tissue"
    assert card.steps > 0 and "yoda train" in card.training["command"]
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_demo_methods_are_the_papers_modes():
    quick = methods_for(full=False)
    assert list(quick) == ["regression", "diffusion", "expa-4", "expa-10"]
    assert quick["diffusion"]["steps"] == 5 and quick["expa-10"]["n_ex"] == 10
    assert methods_for(full=True)["diffusion"]["steps"] == "truncated"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo at reduced size: its first default subject (about 11 ml of lesions), its
    5-step diffusion preview, ExpA with 2 and 6 samples."""
    out = tmp_path_factory.mktemp("demo")
    res = run_demo(
        out,
        subjects=1,
        expa_sizes=(2, 6),
        progress=False,
        log=lambda _: None,
        seed=DEMO_SEED,
    )
    return res, {e["method"]: e for e in res.summary}


def test_demo_writes_a_report_with_every_method(demo):
    res, summary = demo
    html = res.report.read_text()
    for method in ("regression", "diffusion", "expa-2", "expa-6"):
        assert method in summary and method in html
    assert "(short preview)" in html
    sidecars = sorted((res.out_dir / "predictions" / "diffusion").glob("*.json"))
    assert [json.loads(p.read_text())["nfe"] for p in sidecars] == [PREVIEW_STEPS]
    table = format_summary(res.summary)
    assert table.splitlines()[0].split()[0] == "method" and "regression" in table
    row = next(r for r in map(str.split, table.splitlines()) if r[0] == "regression")
    assert row[2] == "3"  # NFE, a mean over subjects, printed as the whole number it is


@pytest.mark.parametrize("reference", ["acq", "clean"])
def test_regression_beats_diffusion_and_expa(demo, reference):
    """Against the acquired and the noise-free FLAIR alike."""
    _, s = demo
    for metric in (f"ssim_{reference}_mean", f"psnr_{reference}_mean"):
        assert s["regression"][metric] > max(
            s[k][metric] for k in ("diffusion", "expa-2", "expa-6")
        )


def test_expa_fidelity_lies_between_and_approaches_regression_as_n_ex_grows(demo):
    _, s = demo
    for metric in ("ssim_acq_mean", "psnr_acq_mean"):
        value = {k: s[k][metric] for k in ("regression", "diffusion", "expa-2", "expa-6")}
        assert value["diffusion"] < value["expa-2"] < value["expa-6"] < value["regression"]


def _sigma_wm(summary: dict) -> dict[str, float]:
    """White-matter noise level of each sampling mode of the reduced demo."""
    return {k: summary[k]["sigma_wm_mean"] for k in ("regression", "diffusion", "expa-2", "expa-6")}


def test_regression_is_smooth(demo):
    """Regression is far smoother than the acquired image and no noisier than the noise-free
    one."""
    _, s = demo
    sigma = _sigma_wm(s)
    assert all(math.isfinite(v) for v in sigma.values())
    assert sigma["regression"] < 0.5 * s["acquired"]["sigma_wm_mean"]
    assert sigma["regression"] <= s["clean"]["sigma_wm_mean"]


def test_diffusion_noise_is_well_above_regression_and_expa_approaches_it(demo):
    """Diffusion replicates the acquisition noise: its white-matter noise is well above
    regression's. ExpA-2 lies between the two; ExpA-6 comes within 10 % of regression's
    (the mean of many samples is the model's posterior mean, which regression estimates in
    one step, so ExpA may end a little above or below it)."""
    _, s = demo
    sigma = _sigma_wm(s)
    assert sigma["diffusion"] > 1.25 * sigma["regression"]
    assert sigma["regression"] < sigma["expa-2"] < sigma["diffusion"]
    assert abs(sigma["expa-6"] - sigma["regression"]) < 0.1 * sigma["regression"]
    assert abs(sigma["expa-6"] - sigma["regression"]) < sigma["expa-2"] - sigma["regression"]


def test_lesions_stand_out_in_the_regression_output(demo):
    """Lesions are hyperintense in the regression output: more than 10 % above the white-matter
    median, and apart from the white matter around them by more than its spread (lesion CNR,
    Eq. 15). The noise-free FLAIR has them at about 2.0 x white matter with a CNR of 4."""
    res, _ = demo
    subject = read_manifest(res.out_dir / "phantom" / "manifest.csv").subjects[0]
    image = load_image(res.out_dir / "predictions" / "regression" / f"{subject.id}_flair.nii.gz")[0]
    lesions, wm = (load_image(subject.labels[k])[0] > 0 for k in ("wmh", "wm"))
    assert lesions.sum() > 100
    assert image[lesions].mean() > 1.1 * np.median(image[wm])
    assert lesion_cnr(image, lesions, wm, voxel_size=3.0) > 1.0


@pytest.mark.parametrize(
    ("flags", "words"),
    [(["--subjects", "0"], "--subjects must be >= 1"), (["--steps", "1"], "--steps must be >= 2"),
     (["--steps", "3", "--full"], "give --full or --steps"),
     (["--train", "--train-steps", "0"], "--train-steps must be >= 1"),
     (["--seed", "-1"], "--seed must be an integer from 0 to 2**64 - 1"),
     (["--steps", "300"], "300 sampling steps exceed the 251 available"),
     (["--steps", "300", "--train"], "300 sampling steps exceed the 251 available"),
     (["--model", "{tmp}"], "model.json"), (["--out", "{tmp}/file"], "cannot create the demo")],
)  # fmt: skip
def test_demo_cli_rejects_bad_options(flags, words, tmp_path, capsys):
    """Every option, the model included, is checked before anything is written."""
    (tmp_path / "file").write_text("a file")
    flags = [f.format(tmp=tmp_path) for f in flags]
    assert main(["demo", "--out", str(tmp_path / "unused"), *flags, "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_demo_rerun_replaces_its_outputs_and_refuses_another_phantom(tmp_path):
    """A rerun with other sampling options translates again; one that asks for other
    subjects than its folder's phantom is refused."""
    kw = dict(subjects=1, voxel_size=8.0, expa_sizes=(), progress=False)
    run_demo(tmp_path, steps=2, log=lambda _: None, **kw)
    logged: list[str] = []
    again = run_demo(tmp_path, steps=3, log=logged.append, **kw)
    sidecars = sorted((again.out_dir / "predictions" / "diffusion").glob("*.json"))
    assert [json.loads(p.read_text())["nfe"] for p in sidecars] == [3]
    timed = {line.split()[0]: line.split()[1] for line in logged if line.startswith("      ")}
    assert timed["regression"] == "reused" and timed["diffusion"] != "reused"
    kw["log"] = lambda _: None
    with pytest.raises(ConfigError, match="holds 1 test subject.*asks for 2"):
        run_demo(tmp_path, **{**kw, "subjects": 2})
    with pytest.raises(ConfigError, match=r"at 8 mm \(seed 2024.*\(seed 5"):
        run_demo(tmp_path, **{**kw, "seed": 5})


def test_demo_trains_from_scratch_and_runs_the_full_sampler(tmp_path):
    """``--train`` replaces the bundled model by one trained on the demo's own training
    subjects; ``--full`` runs the paper's 251-step truncated sampler."""
    res = run_demo(
        tmp_path,
        subjects=1,
        voxel_size=8.0,
        train=True,
        train_steps=3,
        full=True,
        expa_sizes=(),
        progress=False,
        log=lambda _: None,
    )
    assert res.model_dir.is_relative_to(tmp_path / "train")
    _, card = load_model(res.model_dir)
    assert card.steps == 3 and card.training["subjects"] == 4
    sidecars = sorted((res.out_dir / "predictions" / "diffusion").glob("*.json"))
    assert [json.loads(p.read_text())["nfe"] for p in sidecars] == [251]
    assert "(short preview)" not in res.report.read_text()
    assert {e["method"] for e in res.summary} >= {"regression", "diffusion"}

    # run again: the trained model and its translations are reused; other steps are refused
    kw = dict(subjects=1, voxel_size=8.0, train=True, full=True, expa_sizes=(), progress=False)
    stamp = (res.model_dir / "model.safetensors").stat().st_mtime_ns
    logged: list[str] = []
    again = run_demo(tmp_path, train_steps=3, log=logged.append, **kw)
    assert again.model_dir == res.model_dir and any("reusing the model" in m for m in logged)
    assert (res.model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads(sidecars[0].read_text())["nfe"] == 251
    with pytest.raises(ConfigError, match="holds no model trained by --train for 4 steps"):
        run_demo(tmp_path, train_steps=4, log=lambda _: None, **kw)
