"""The demo pipeline with the bundled model reproduces the paper's qualitative findings."""

from __future__ import annotations

import json
import math

import pytest

from yoda.cli import main
from yoda.demo import bundled_model_dir, format_summary, methods_for, run_demo
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
    """The demo at reduced size: one fresh subject, a 4-step preview, ExpA with 2 and 6."""
    out = tmp_path_factory.mktemp("demo")
    res = run_demo(
        out,
        subjects=1,
        steps=4,
        expa_sizes=(2, 6),
        progress=False,
        log=lambda _: None,
        seed=99,
    )
    return res, {e["method"]: e for e in res.summary}


def test_demo_writes_a_report_with_every_method(demo):
    res, summary = demo
    html = res.report.read_text()
    for method in ("regression", "diffusion", "expa-2", "expa-6"):
        assert method in summary and method in html
    assert "strided preview" in html
    sidecars = sorted((res.out_dir / "predictions" / "diffusion").glob("*.json"))
    assert [json.loads(p.read_text())["nfe"] for p in sidecars] == [4]
    table = format_summary(res.summary)
    assert table.splitlines()[0].split()[0] == "method" and "regression" in table


#: The bundled model is a 0.64 M-parameter network trained for 2400 steps on a CPU; it is not
#: converged, and its one-step regression output still trails the diffusion preview in
#: fidelity. These paper findings are asserted, and expected to fail until a better-trained
#: model is bundled (strict: an unexpected pass is reported).
UNCONVERGED = pytest.mark.xfail(
    strict=True, reason="bundled tiny model not converged: regression trails diffusion"
)


@UNCONVERGED
def test_regression_beats_diffusion_against_the_acquired_target(demo):
    _, s = demo
    assert s["regression"]["ssim_acq_mean"] > s["diffusion"]["ssim_acq_mean"]
    assert s["regression"]["psnr_acq_mean"] > s["diffusion"]["psnr_acq_mean"]


def test_noise_levels_follow_the_paper(demo):
    """Diffusion is much noisier than regression; regression is smoother than the acquired
    image; ExpA's noise lies between and approaches regression's as N_Ex grows."""
    _, s = demo
    sigma = {k: s[k]["sigma_wm_mean"] for k in ("regression", "diffusion", "expa-2", "expa-6")}
    assert all(math.isfinite(v) for v in sigma.values())
    assert sigma["diffusion"] > 1.5 * sigma["regression"]
    assert sigma["regression"] < s["acquired"]["sigma_wm_mean"]
    assert sigma["regression"] < sigma["expa-6"] < sigma["expa-2"] < sigma["diffusion"]


@UNCONVERGED
def test_expa_fidelity_approaches_regression_as_n_ex_grows(demo):
    _, s = demo
    gap = {
        k: abs(s[k]["ssim_acq_mean"] - s["regression"]["ssim_acq_mean"])
        for k in ("diffusion", "expa-2", "expa-6")
    }
    assert gap["expa-6"] < gap["expa-2"] < gap["diffusion"]


def test_demo_cli_rejects_bad_options(capsys):
    assert main(["demo", "--subjects", "0", "--out", "unused"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--subjects" in err[0]
