from __future__ import annotations

import base64
import csv
import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage

from yoda.cli import main
from yoda.data.io import load_image, save_image
from yoda.data.manifest import Manifest, Subject, read_manifest, write_manifest
from yoda.data.normalize import apply_intensity, fit_intensity
from yoda.data.phantom import make_phantom
from yoda.errors import ConfigError, InputError
from yoda.evaluate.evaluation import evaluate
from yoda.evaluate.metrics import rician_noise
from yoda.evaluate.report import REPORT_INDEX, SECTIONS, highlights, report_files, write_report
from yoda.evaluate.robustness import parse_levels, robustness

FIGURE_SECTIONS = ("examples", "perception-distortion", "lesion-volumes", "quality-control")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three phantom test subjects; regression (clean), diffusion (noisy) and ExpA stand-ins."""
    root = tmp_path_factory.mktemp("phantom")
    manifest_path = make_phantom(root, 3, voxel_size=4.0, seed=11, counts=(0, 0, 3))
    manifest = read_manifest(manifest_path)
    pred = root / "pred"
    for k, s in enumerate(manifest.subjects):
        acq, geom = load_image(s.images["flair"])
        mask = load_image(s.mask)[0] > 0.5
        fit = fit_intensity(acq, mask, method="tissue")
        clean = apply_intensity(load_image(s.clean["flair"])[0], fit)
        stand_ins = {
            "regression": (clean, {"mode": "regression", "nfe": 3}),
            "diffusion": (
                rician_noise(clean, 6.0, k),
                {"mode": "diffusion", "nfe": 11, "timesteps": 11},
            ),
            "expa-4": (
                rician_noise(clean, 3.0, 50 + k),
                {"mode": "expa", "n_ex": 4, "nfe": 44, "timesteps": 11},
            ),
        }
        for name, (img, side) in stand_ins.items():
            if name == "expa-4" and k == 2:
                continue  # a missing prediction
            folder = pred / name
            folder.mkdir(parents=True, exist_ok=True)
            save_image(img, geom, folder / f"{s.id}_flair.nii.gz", overwrite=True)
            side = {**side, "seconds": 1.0 + k, "target": "flair", "sources": ["t1w", "t2w"]}
            (folder / f"{s.id}_flair.json").write_text(json.dumps(side))
    return manifest_path, manifest, pred


class SmoothingTranslator:
    """Stand-in for a Translator: the output is a smoothed copy of the first source (0-255)."""

    sources = ["t1w", "t2w"]
    card = SimpleNamespace(target="flair", normalization={"method": "tissue"})

    def __init__(self):
        self.calls = []

    def translate(self, sources, *, mode, mask, seed, **options):
        arr, _ = sources["t1w"]
        m = mask[0] > 0
        self.calls.append({"t1w": arr.copy(), "mode": mode, "seed": seed, "mask": m})
        out = apply_intensity(ndimage.gaussian_filter(arr, 0.5), fit_intensity(arr, m, "tissue"))
        return SimpleNamespace(image=out, info={"seconds": 0.01})


@pytest.fixture(scope="module")
def rob(cohort):
    manifest_path, _, _ = cohort
    translator = SmoothingTranslator()
    result = robustness(translator, manifest_path, "test", "0,2,4", max_subjects=2, progress=False)
    return result, translator


@pytest.fixture(scope="module")
def report(cohort, rob, tmp_path_factory):
    manifest_path, _, pred = cohort
    ev = evaluate(pred, manifest_path, progress=False)
    out = tmp_path_factory.mktemp("report")
    path = write_report(ev, out, robustness=rob[0])
    return ev, out, path, path.read_text(encoding="utf-8")


def _sections(page: str) -> dict[str, str]:
    parts = re.split(r'<section id="([a-z-]+)">', page)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_has_every_section_and_embedded_figures(report):
    _, _, path, page = report
    assert path.name == "report.html"
    sections = _sections(page)
    assert list(sections) == [sid for sid, _ in SECTIONS]
    for sid in (*FIGURE_SECTIONS, "robustness"):
        images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', sections[sid])
        assert images, sid
        assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    # self-contained: no external resources
    assert not re.search(r'(src|href)="(https?:|//|file:)', page)
    assert "<link" not in page and "<script" not in page


def test_tables_have_one_row_per_subject_and_method(report):
    ev, out, _, _ = report
    metrics = _read_csv(out / "metrics.csv")
    assert len(metrics) == 3 + 3 + 2  # expa-4 misses one subject
    assert {(r["subject"], r["method"]) for r in metrics} == {
        (r["subject"], r["method"]) for r in ev.rows
    }
    summary = _read_csv(out / "summary.csv")
    methods = [r["method"] for r in summary if r["kind"] == "method"]
    assert methods == ["regression", "expa-4", "diffusion"]
    assert [r["method"] for r in summary if r["kind"] == "reference"] == ["acquired", "clean"]
    ssim = {r["method"]: float(r["ssim_acq_mean"]) for r in summary if r["kind"] == "method"}
    for name, value in ssim.items():
        vals = [float(r["ssim_acq"]) for r in metrics if r["method"] == name]
        assert value == pytest.approx(np.mean(vals))
    reference = _read_csv(out / "reference.csv")
    assert len(reference) == 3 * 2
    md = (out / "summary.md").read_text()
    for name in methods:
        assert re.search(rf"^\| {re.escape(name)} \|", md, re.M)
    robust = md[md.index("## Robustness to input noise (regression sampling)") :]
    assert [line.split(" | ")[0] for line in robust.splitlines()[4:]] == ["| 0.0", "| 2.0", "| 4.0"]
    for name in ("noise_curve.csv", "stats.csv", "lesion_volumes.csv", "robustness.csv"):
        assert (out / name).is_file()
    assert (out / "figures" / "perception_distortion.png").is_file()


def test_page_text_comes_from_the_data(report):
    ev, out, _, page = report
    metrics = _read_csv(out / "metrics.csv")
    means = {
        name: np.mean([float(r["ssim_acq"]) for r in metrics if r["method"] == name])
        for name in ev.method_names
    }
    best = max(means, key=means.get)
    assert f"Highest mean SSIM vs acquired: {best} ({means[best] * 100:.2f} %)" in page
    sig = {e["method"]: e["sigma_wm_mean"] for e in ev.summary if e["kind"] == "method"}
    lowest = min(sig, key=sig.get)
    assert any(
        h.startswith(f"Lowest mean noise level σ_WM among the methods: {lowest}")
        for h in highlights(ev)
    )
    # the diffusion previews are stated plainly
    assert (
        "diffusion: diffusion used 11 timesteps (short preview), not the paper&#x27;s 251" in page
    )
    assert "expa-4: diffusion used 11 timesteps (short preview)" in page
    # missing predictions and the skipped FID are reported
    overview = _sections(page)["overview"]
    assert "sub-002" in overview and "Missing predictions" in overview
    assert "FID skipped" in page
    assert "regression is best" not in page.lower()
    # a mean over fewer subjects (expa-4 misses one) is flagged where it wins
    for line in highlights(ev):
        if line.startswith("Highest mean") and ": expa-4" in line:
            assert "expa-4: 2 of 3" in line


def _bare(manifest: Manifest) -> Manifest:
    """The manifest without labels and clean targets (no WMH volumes, no scores vs clean)."""
    return Manifest(
        [Subject(s.id, s.split, dict(s.images), mask=s.mask) for s in manifest.subjects],
        manifest.root,
    )


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_report_without_labels_or_robustness_says_so(cohort, tmp_path):
    _, manifest, pred = cohort
    bare = _bare(manifest)
    ev = evaluate(pred / "regression", bare, progress=False)
    page = write_report(ev, tmp_path / "rep").read_text()
    sections = _sections(page)
    assert list(sections) == [sid for sid, _ in SECTIONS]
    assert "Not available" in sections["perception-distortion"]
    assert "Not evaluated" in sections["robustness"]
    assert "data:image/png" in sections["examples"]


def test_one_method_is_not_called_the_best(cohort):
    manifest_path, _, pred = cohort
    ev = evaluate(pred / "regression", manifest_path, progress=False)
    assert [e["method"] for e in ev.summary if e["kind"] == "method"] == ["regression"]
    assert not [h for h in highlights(ev) if h.startswith(("Highest", "Lowest", "Fastest"))]


def test_robustness_reports_every_level(rob):
    result, translator = rob
    assert result.levels == [0.0, 2.0, 4.0]
    assert [e["sigma_in"] for e in result.summary] == [0.0, 2.0, 4.0]
    assert all(e["n"] == 2 for e in result.summary)
    assert len(result.rows) == 2 * 3
    noise = [e["sigma_wm_mean"] for e in result.summary]
    assert noise[0] < noise[1] < noise[2]  # the stand-in passes input noise through
    ssim = [e["ssim_acq_mean"] for e in result.summary]
    assert ssim[0] > ssim[2]
    assert math.isfinite(result.acquired_sigma_wm) and math.isfinite(result.clean_sigma_wm)
    assert {c["mode"] for c in translator.calls} == {"regression"}


def test_robustness_noise_is_on_each_source_scale(rob, cohort):
    _, manifest, _ = cohort
    _, translator = rob
    s = manifest.subjects[0]
    raw, _ = load_image(s.images["t1w"])
    mask = load_image(s.mask)[0] > 0.5
    scale = fit_intensity(raw, mask, method="tissue").scale
    calls = translator.calls[:3]  # subject 0: levels 0, 2, 4 (% of the 0-255 range)
    np.testing.assert_array_equal(calls[0]["t1w"], raw)  # level 0: the source as it is
    bright = mask & (raw * scale > 60)  # Rician ~ Gaussian at high SNR
    for call, sigma in zip(calls[1:], (5.1, 10.2), strict=True):
        added = (call["t1w"] - raw)[bright] * scale
        assert added.std() == pytest.approx(sigma, rel=0.08)
        assert abs(added.mean()) < 0.1 * sigma + 0.2
        np.testing.assert_array_equal(call["mask"], mask)
    assert len({c["seed"] for c in calls}) == 1  # one sampling seed per subject


def test_robustness_fits_each_source_with_its_own_normalization(cohort):
    _, manifest, _ = cohort
    manifest_path = cohort[0]
    translator = SmoothingTranslator()
    translator.card = SimpleNamespace(
        target="flair",
        normalization={"method": "tissue", "percentile": 98.0, "modalities": {"t1w": "percentile"}},
    )
    robustness(translator, manifest_path, "test", "4", max_subjects=1, progress=False)
    s = manifest.subjects[0]
    raw, _ = load_image(s.images["t1w"])
    mask = load_image(s.mask)[0] > 0.5
    scale = fit_intensity(raw, mask, method="percentile", percentile=98.0).scale
    assert scale != pytest.approx(fit_intensity(raw, mask, method="percentile").scale, rel=0.01)
    assert scale != pytest.approx(fit_intensity(raw, mask, method="tissue").scale, rel=0.05)
    bright = mask & (raw * scale > 60)
    added = (translator.calls[0]["t1w"] - raw)[bright] * scale
    assert added.std() == pytest.approx(10.2, rel=0.04)  # 4 % of 255 on the percentile scale


def test_robustness_options_are_checked(cohort):
    manifest_path, _, _ = cohort
    assert parse_levels("6, 0,2,2") == [0.0, 2.0, 6.0]
    for bad in ("", "a,b", "-1,2"):
        with pytest.raises(ConfigError):
            parse_levels(bad)
    with pytest.raises(InputError):
        robustness(SmoothingTranslator(), manifest_path, "train", [0.0], progress=False)


def test_cli_writes_the_report(cohort, tmp_path, capsys):
    manifest_path, _, pred = cohort
    out = tmp_path / "cli-report"
    code = main(
        [
            "evaluate",
            "--pred",
            f"reg={pred / 'regression'}",
            "--pred",
            str(pred / "diffusion"),
            "--data",
            str(manifest_path),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    assert (out / "report.html").is_file()
    summary = _read_csv(out / "summary.csv")
    assert [r["method"] for r in summary if r["kind"] == "method"] == ["reg", "diffusion"]
    assert "-> " in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pred", "/nonexistent/folder"], "does not exist"),
        (["--pred", "bad name!=x"], "NAME=DIR"),
        (["--input-noise", "0,2"], "--input-noise and --model"),
    ],
)
def test_cli_bad_arguments_fail_with_one_line(cohort, tmp_path, capsys, extra, message):
    manifest_path, _, pred = cohort
    args = ["evaluate", "--data", str(manifest_path), "--out", str(tmp_path / "o")]
    if "--pred" not in extra:
        args += ["--pred", str(pred)]
    code = main(args + extra + ["--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and message in err and err.startswith("yoda evaluate:")


def test_a_report_replaces_the_earlier_one_and_keeps_other_files(report, cohort, tmp_path):
    _, full, _, _ = report
    _, manifest, pred = cohort
    out = tmp_path / "rep"
    shutil.copytree(full, out)
    earlier = set(report_files(out))
    assert earlier == _files(out) - {REPORT_INDEX}
    assert {"lesion_volumes.csv", "robustness.csv", "figures/bland_altman.png"} <= earlier
    assert "figures/qc_expa-4_ssim.png" in earlier
    (out / "notes.txt").write_text("mine\n")
    (out / "figures" / "mine.png").write_bytes(b"not a report figure")
    ev = evaluate(pred / "regression", _bare(manifest), progress=False)
    write_report(ev, out)
    now = set(report_files(out))
    assert _files(out) == now | {REPORT_INDEX, "notes.txt", "figures/mine.png"}
    for stale in ("lesion_volumes.csv", "robustness.csv", "figures/bland_altman.png"):
        assert stale not in now and not (out / stale).exists()
    assert not list(out.glob("figures/qc_expa-4_*.png"))
    assert (out / "notes.txt").read_text() == "mine\n"
    # the same report again (as a rerun of the demo does): the same files
    write_report(ev, out)
    assert set(report_files(out)) == now


def test_report_index_never_names_files_outside_the_folder(tmp_path):
    out = tmp_path / "rep"
    out.mkdir()
    (tmp_path / "victim.txt").write_text("keep\n")
    names = ["../victim.txt", str(tmp_path / "victim.txt"), REPORT_INDEX, "a\\b", "summary.csv"]
    (out / REPORT_INDEX).write_text(json.dumps({"format": "yoda-report", "files": names}))
    assert report_files(out) == ["summary.csv"]
    (out / REPORT_INDEX).write_text(json.dumps({"files": ["summary.csv"]}))
    assert report_files(out) is None


def _cli(args: list[str]) -> int:
    return main(["evaluate", *args, "--no-progress"])


def test_cli_refuses_a_negative_seed_before_any_work(cohort, tmp_path, capsys):
    manifest_path, _, pred = cohort
    args = ["--pred", str(pred / "regression"), "--data", str(manifest_path), "--seed", "-1"]
    assert _cli([*args, "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seed must be an integer from 0 to 2**64 - 1" in err[0]
    assert not (tmp_path / "o").exists()


def test_cli_refuses_a_folder_with_other_files_or_a_report_without_force(
    report, cohort, tmp_path, capsys
):
    _, full, _, _ = report
    manifest_path, manifest, pred = cohort
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    args = ["--pred", str(pred / "regression"), "--data", str(manifest_path)]
    assert _cli([*args, "--out", str(foreign)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not empty and holds no report" in err
    assert _files(foreign) == {"notes.txt"}
    out = tmp_path / "rep"
    shutil.copytree(full, out)
    before = {p: (out / p).read_bytes() for p in _files(out)}
    assert _cli([*args, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds an earlier report; pass --force" in err
    assert {p: (out / p).read_bytes() for p in _files(out)} == before
    # --force replaces the earlier report: nothing of it is left beside the new one
    bare = write_manifest(_bare(manifest), tmp_path / "bare.csv")
    args = ["--pred", str(pred / "regression"), "--data", str(bare)]
    assert _cli([*args, "--out", str(out), "--force"]) == 0
    assert _files(out) == set(report_files(out)) | {REPORT_INDEX}
    assert not (out / "lesion_volumes.csv").exists() and not (out / "robustness.csv").exists()
    assert not list(out.glob("figures/qc_*_dice.png"))
    assert _cli([*args, "--out", str(foreign), "--force"]) == 0
    assert (foreign / "notes.txt").read_text() == "mine\n"
    assert (foreign / "report.html").is_file()


def test_cli_summary_counts_the_subjects_left_out(cohort, tmp_path, capsys):
    import nibabel as nib

    manifest_path, _, pred = cohort
    folder = tmp_path / "regression"
    shutil.copytree(pred / "regression", folder)
    bad = folder / "sub-001_flair.nii.gz"
    img = nib.load(bad)
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[4, 4, 4] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), bad)
    code = _cli(["--pred", str(folder), "--data", str(manifest_path), "--out", str(tmp_path / "o")])
    assert code == 0
    printed = capsys.readouterr()
    out = printed.out.splitlines()
    assert out[0].startswith("scored 2 of 3 subject(s) of split test (1 left out) x 1 method(s)")
    assert len(out) == 2 and out[1].startswith("left out sub-001: ") and "NaN or Inf" in out[1]
    assert "sub-001" not in printed.err  # said once
