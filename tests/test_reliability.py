"""Reliability: bad inputs, damaged or hostile files, unwritable outputs, crashes, concurrency.

Every user mistake must end in one clear stderr line and a non-zero exit code (a traceback only
with --debug), and leave nothing behind in the output folder (no output, no temporary file).
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import yoda.data.io as io_module
import yoda.translate as translate_module
from yoda.cli import main
from yoda.data.io import load_image
from yoda.errors import InputError, ModelError
from yoda.translate import Translator, subject_seed

#: Environment of the subprocesses: one thread each (the tests share two cores).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def bad(subject, tmp_path_factory) -> dict[str, Path]:
    """Damaged and unsuitable inputs, made from the test subject's T1w."""
    folder = tmp_path_factory.mktemp("bad-inputs")
    t1w = nib.load(subject["t1w"])
    data = np.asarray(t1w.dataobj, dtype=np.float32)
    files: dict[str, Path] = {"folder": folder}

    def save(name: str, array: np.ndarray, affine: np.ndarray = t1w.affine) -> None:
        files[name] = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(array, affine), files[name])

    files["text"] = folder / "notes.nii.gz"
    files["text"].write_text("this is not an image\n")
    raw = subject["t1w"].read_bytes()
    files["truncated"] = folder / "truncated.nii.gz"
    files["truncated"].write_bytes(raw[: len(raw) // 2])
    save("2d", data[:, :, 20])
    save("4d", np.stack([data, data], axis=-1))
    save("4d_one_volume", data[..., None])
    nan = data.copy()
    nan[10, 20, 30] = np.nan
    save("nan", nan)
    inf = data.copy()
    inf[5, 5, 5] = -np.inf
    save("inf", inf)
    save("constant", np.full_like(data, 37.0))
    save("negative", -1.0 - data)
    far = t1w.affine.copy()
    far[:3, 3] += 1000.0  # the same image a metre away: no overlap with the subject's grid
    save("far", data, far)
    save("empty_mask", np.zeros_like(data))
    save("small_mask", np.ones((20, 20, 20), np.float32))
    save("cropped", data[2:])
    return files


def one_error_line(capsys, command: str = "translate") -> str:
    """The single stderr line of a failed command (and nothing else on stderr)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"yoda {command}: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def translate_args(model: Path, out: Path, **sources: Path | str) -> list[str]:
    args = ["translate", "--model", str(model), "--out", str(out), "--no-progress"]
    for name, path in sources.items():
        args += [f"--{name}", str(path)]
    return args + ["--device", "cpu", "--views", "axial"]


# ------------------------------------------------------------------------------------------
# 1. bad input matrix

BAD_INPUTS = {
    # case: (sources and mask by role, words the message must contain)
    "missing-file": ({"t1w": "@nothing.nii.gz"}, "file not found"),
    "directory": ({"t1w": "folder"}, "is a directory"),
    "not-an-image": ({"t1w": "text"}, "not a readable NIfTI/MGZ image"),
    "truncated": ({"t1w": "truncated"}, "damaged or truncated"),
    "2d": ({"t1w": "2d"}, "is 2-D"),
    "4d": ({"t1w": "4d"}, "2 volumes"),
    "nan": ({"t1w": "nan"}, "1 voxel(s) are NaN or Inf"),
    "inf": ({"t1w": "inf"}, "1 voxel(s) are NaN or Inf"),
    "constant": ({"t1w": "constant"}, "the image is constant"),
    "constant-with-mask": ({"t1w": "constant", "mask": "=mask"}, "the image is constant"),
    "negative": ({"t1w": "negative"}, "the median of the foreground is -"),
    "empty-mask": ({"mask": "empty_mask"}, "the mask is empty"),
    "mask-other-grid": ({"mask": "small_mask"}, "not on the same voxel grid"),
    "sources-other-grids": ({"t2w": "cropped"}, "not on the same voxel grid"),
    "source-names": ({"t2w": None, "pd": "=t2w"}, "missing --t2w; unexpected --pd"),
    "too-few-sources": ({"t2w": None}, "missing --t2w"),
    "too-many-sources": ({"flair": "=flair"}, "unexpected --flair"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_clear_line(case, tiny_model, subject, bad, tmp_path, capsys):
    changes, words = BAD_INPUTS[case]
    roles: dict[str, Path | str] = {"t1w": subject["t1w"], "t2w": subject["t2w"]}
    for role, name in changes.items():
        if name is None:
            roles.pop(role)
        elif name.startswith("="):
            roles[role] = subject[name[1:]]
        elif name.startswith("@"):
            roles[role] = bad["folder"] / name[1:]
        else:
            roles[role] = bad[name]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert main(translate_args(tiny_model, out_dir / "flair.nii.gz", **roles)) == 1
    line = one_error_line(capsys)
    assert words in line, line
    for role, name in changes.items():
        if name is not None and not name.startswith("="):
            assert Path(roles[role]).name in line  # the message names the file
    assert list(out_dir.iterdir()) == []


def test_bad_input_is_one_line_with_the_progress_bar_on(tiny_model, subject, bad, tmp_path, capsys):
    """The inputs are read and checked before the progress bar shows."""
    args = translate_args(tiny_model, tmp_path / "flair.nii.gz", t1w=bad["nan"], t2w=subject["t2w"])
    args.remove("--no-progress")
    assert main(args) == 1
    assert "NaN or Inf" in one_error_line(capsys)


def test_resampling_an_image_that_does_not_overlap(tiny_model, subject, bad, tmp_path, capsys):
    args = translate_args(tiny_model, tmp_path / "flair.nii.gz", t1w=subject["t1w"], t2w=bad["far"])
    assert main([*args, "--resample"]) == 1
    line = one_error_line(capsys)
    assert "t2w (" in line and "far.nii.gz" in line and "do the images overlap?" in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("t1w", "t2w", "words"),
    [("nan", "truncated", "NaN or Inf"), ("truncated", "constant", "damaged or truncated"),
     ("constant", "nan", "the image is constant")],
)  # fmt: skip
def test_of_several_bad_inputs_the_first_is_reported(
    t1w, t2w, words, tiny_model, bad, tmp_path, capsys
):
    """The sources load side by side; the error is the first source's, as when read in turn."""
    out = tmp_path / "flair.nii.gz"
    assert main(translate_args(tiny_model, out, t1w=bad[t1w], t2w=bad[t2w])) == 1
    line = one_error_line(capsys)
    assert words in line and bad[t1w].name in line and bad[t2w].name not in line, line
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_header_declaring_more_data_than_the_file_holds(suffix, tmp_path):
    """Refused before nibabel allocates the declared (here 140 TB) array."""
    raw = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)).to_bytes()
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    hdr["dim"] = [3, 32767, 32767, 32767, 1, 1, 1, 1]  # the data stay 8^3
    blob = hdr.binaryblock + raw[len(hdr.binaryblock) :]
    path = tmp_path / f"huge{suffix}"
    path.write_bytes(gzip.compress(blob) if suffix == ".nii.gz" else blob)
    with pytest.raises(InputError, match=r"declares shape \(32767, 32767, 32767\)"):
        load_image(path)
    # a two-file pair keeps its data in the .img file: still read
    pair = tmp_path / "pair.hdr"
    nib.save(nib.Nifti1Pair(np.arange(60, dtype=np.float32).reshape(3, 4, 5), np.eye(4)), pair)
    assert load_image(pair)[0].sum() == sum(range(60))


def test_single_volume_4d_is_accepted(tiny_model, subject, bad, tmp_path):
    out = tmp_path / "flair.nii.gz"
    args = translate_args(tiny_model, out, t1w=bad["4d_one_volume"], t2w=subject["t2w"])
    assert main(args) == 0
    assert nib.load(out).shape == nib.load(subject["t1w"]).shape


@pytest.mark.parametrize("where", ["front", "end"])
def test_debug_shows_the_traceback(where, tiny_model, subject, tmp_path, capsys):
    args = translate_args(
        tiny_model, tmp_path / "f.nii.gz", t1w=tmp_path / "x.nii.gz", t2w=subject["t2w"]
    )
    args = ["--debug", *args] if where == "front" else [*args, "--debug"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):"
    assert "InputError" in err[-2] and err[-1].endswith("file not found")


def test_internal_error_is_one_line_with_exit_3(tiny_model, subject, tmp_path, capsys, monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(Translator, "translate", broken)
    args = translate_args(tiny_model, tmp_path / "f.nii.gz", t1w=subject["t1w"], t2w=subject["t2w"])
    assert main(args) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "yoda translate: internal error: RuntimeError: boom second line "
        "(run with --debug for the traceback)"
    ]
    with pytest.raises(RuntimeError, match="boom"):
        main([*args, "--debug"])


# ------------------------------------------------------------------------------------------
# 1. model directories


def _edit_card(**changes):
    def edit(model: Path) -> None:
        card = json.loads((model / "model.json").read_text())
        card.update(changes)
        (model / "model.json").write_text(json.dumps(card))

    return edit


def _truncate(name: str):
    def edit(model: Path) -> None:
        data = (model / name).read_bytes()
        (model / name).write_bytes(data[: len(data) // 3])

    return edit


BAD_MODELS = {
    "no-card": (lambda m: (m / "model.json").unlink(), "model.json is missing"),
    "no-weights": (lambda m: (m / "model.safetensors").unlink(), "model.safetensors is missing"),
    "truncated-weights": (_truncate("model.safetensors"), "corrupted or not a safetensors file"),
    "card-not-json": (lambda m: (m / "model.json").write_text("{oops"), "is not valid JSON"),
    "card-T-string": (_edit_card(T="1000"), "'T' has the wrong type or value"),
    "card-sources-string": (_edit_card(sources="t1w"), "'sources' has the wrong type"),
    "card-unknown-version": (_edit_card(format_version=7), "unknown format_version 7"),
    "card-unknown-key": (_edit_card(colour="blue"), "unknown keys ['colour']"),
    "not-a-folder": (lambda m: shutil.rmtree(m), "does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_damaged_model_directory(case, tiny_model, subject, tmp_path, capsys):
    edit, words = BAD_MODELS[case]
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    edit(model)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = translate_args(model, out_dir / "f.nii.gz", t1w=subject["t1w"], t2w=subject["t2w"])
    assert main(args) == 1
    assert words in one_error_line(capsys)
    assert list(out_dir.iterdir()) == []
    with pytest.raises(ModelError, match=re.escape(words)):
        Translator.load(model, device="cpu")


def test_eps_model_refuses_regression_but_samples(tiny_model, subject, tmp_path, capsys):
    model = tmp_path / "eps-model"
    shutil.copytree(tiny_model, model)
    _edit_card(prediction="eps")(model)
    out = tmp_path / "f.nii.gz"
    args = translate_args(model, out, t1w=subject["t1w"], t2w=subject["t2w"])
    assert main(args) == 1
    assert "predicts eps" in one_error_line(capsys) and not out.exists()
    assert main([*args, "--mode", "diffusion", "--steps", "2"]) == 0  # the weights are fine
    assert json.loads((tmp_path / "f.json").read_text())["nfe"] == 2


# ------------------------------------------------------------------------------------------
# 1. outputs that cannot be written


def test_output_folder_missing_or_a_file(tiny_model, subject, tmp_path, capsys):
    sources = {"t1w": subject["t1w"], "t2w": subject["t2w"]}
    assert main(translate_args(tiny_model, tmp_path / "no" / "f.nii.gz", **sources)) == 1
    assert "output folder" in one_error_line(capsys) and not (tmp_path / "no").exists()
    (tmp_path / "file").write_text("x")
    assert main(translate_args(tiny_model, tmp_path / "file" / "f.nii.gz", **sources)) == 1
    assert "is not a folder" in one_error_line(capsys)
    assert main(translate_args(tiny_model, tmp_path / "f.txt", **sources)) == 1
    assert "must end in .nii.gz" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_read_only_output_folder(tiny_model, subject, tmp_path, capsys, monkeypatch):
    """We run as root, which writes anywhere: a read-only folder is simulated by os.access."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: Path(p) != locked and real_access(p, mode, **kw)
    )
    args = translate_args(tiny_model, locked / "f.nii.gz", t1w=subject["t1w"], t2w=subject["t2w"])
    assert main(args) == 1
    assert "not writable" in one_error_line(capsys)
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("fails", ["image", "sidecar"])
def test_failed_write_leaves_nothing(fails, tiny_model, subject, tmp_path, capsys, monkeypatch):
    """The disk fills up while the image (or its sidecar) is written."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if fails == "image":
        real_write = io_module._write

        def full_disk(img, path, suffix):
            real_write(img, path, suffix)  # a partial temporary file exists ...
            raise OSError(errno.ENOSPC, "No space left on device")  # ... when the disk is full

        monkeypatch.setattr(io_module, "_write", full_disk)
    else:

        def full_disk(path, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(translate_module, "write_text_atomic", full_disk)
    args = translate_args(tiny_model, out_dir / "f.nii.gz", t1w=subject["t1w"], t2w=subject["t2w"])
    assert main(args) == 1
    assert "No space left on device" in one_error_line(capsys)
    assert list(out_dir.iterdir()) == []


def test_batch_output_folder_under_a_file(tiny_model, phantom_cohort, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    args = ["translate", "--model", str(tiny_model), "--data", str(phantom_cohort)]
    assert main([*args, "--out-dir", str(tmp_path / "file" / "out"), "--no-progress"]) == 1
    assert "cannot create the output folder" in one_error_line(capsys)


# ------------------------------------------------------------------------------------------
# 1. invalid option values


@pytest.mark.parametrize(
    ("extra", "code", "words"),
    [
        (["--n-ex", "-1", "--mode", "expa"], 1, "--n-ex must be >= 1; got -1"),
        (["--n-ex", "3"], 1, "--n-ex sets the number of ExpA samples: give --mode expa"),
        (["--n-ex", "0", "--mode", "expa"], 1, "--n-ex must be >= 1; got 0"),
        (["--batch-size", "0"], 1, "--batch-size must be >= 1"),
        (["--mode", "magic"], 2, "argument --mode: invalid choice: 'magic'"),
        (["--views", "oblique"], 2, "argument --views: invalid choice"),
        (["--steps", "0"], 2, "--steps must be >= 1"),
        (["--steps", "many"], 2, "--steps must be 'truncated', 'full' or a number"),
        (
            ["--steps", "300", "--mode", "diffusion"],
            1,
            "300 sampling steps exceed the 251 available",
        ),
    ],
)
def test_invalid_translate_options(extra, code, words, tiny_model, subject, tmp_path, capsys):
    out = tmp_path / "f.nii.gz"
    args = translate_args(tiny_model, out, t1w=subject["t1w"], t2w=subject["t2w"]) + extra
    if code == 2:  # argparse: usage errors exit through SystemExit(2), still one line
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("yoda translate: error: ")
        assert words in err[0] and err[0].endswith("(see yoda translate --help)")
    else:
        assert main(args) == 1
        assert words in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_even_slab_size_for_training(phantom_cohort, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(phantom_cohort), "--sources", "t1w", "t2w", "--target"]
    args += ["flair", "--out", str(out), "--n-slices", "4", "--steps", "1", "--no-progress"]
    assert main(args) == 1
    assert "n_slices must be odd" in one_error_line(capsys, "train")
    assert not out.exists()


# ------------------------------------------------------------------------------------------
# 4. hostile files


class Payload:
    """Unpickling this object creates ``marker``: stands for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_payload_is_live(tmp_path):
    """The payload of the next tests does run when unpickled carelessly."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickled_weights_are_refused_without_running(writer, tiny_model, subject, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    marker = tmp_path / "code-ran"
    weights = model / "model.safetensors"
    state = {"conv_in.conv.weight": torch.zeros(1), "evil": Payload(marker)}
    if writer == "pickle":
        weights.write_bytes(pickle.dumps(state))
    else:
        torch.save(state, weights)
    args = translate_args(model, tmp_path / "f.nii.gz", t1w=subject["t1w"], t2w=subject["t2w"])
    assert main(args) == 1
    assert "not a safetensors file" in one_error_line(capsys)
    with pytest.raises(ModelError, match="not a safetensors file"):
        Translator.load(model, device="cpu")
    assert not marker.exists() and not (tmp_path / "f.nii.gz").exists()


def _train_config(manifest: Path, out: Path, cache: Path, **overrides):
    from yoda.config import TrainConfig, apply_overrides

    values = {
        "data.manifest": str(manifest),
        "data.sources": ["t1w", "t2w"],
        "data.target": "flair",
        "data.cache_dir": str(cache),
        "run.out": str(out),
        "model.preset": "tiny",
        "optim.batch_size": 4,
        "run.steps": 20,
        "run.threads": 1,
        "run.log_every": 1,
        "run.val_every": 0,
        "run.checkpoint_every": 2,
    }
    values.update(overrides)
    return apply_overrides(TrainConfig(), values)


@pytest.fixture(scope="module")
def train_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train-cache")


def test_pickled_training_checkpoint_is_refused_without_running(
    phantom_cohort, train_cache, tmp_path, capsys
):
    from yoda.config import save_config

    out = tmp_path / "run"
    folder = out / "checkpoint" / "step-00000002"
    folder.mkdir(parents=True)
    save_config(_train_config(phantom_cohort, out, train_cache), out / "config.yaml")
    marker = tmp_path / "code-ran"
    for name in ("state.pt", "rank-0.pt"):
        torch.save({"format": "yoda-checkpoint", "model": Payload(marker)}, folder / name)
    (folder / "COMPLETE").write_text("")
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 1
    line = one_error_line(capsys, "train")
    assert "state.pt" in line and "cannot be read" in line
    assert not marker.exists()
    assert not (out / "model").exists()


@pytest.mark.parametrize("suffix", ["csv", "json"])
def test_manifest_ids_cannot_leave_the_output_folder(suffix, tiny_model, subject, tmp_path, capsys):
    rows = [("ok", subject["t1w"]), ("../escape", subject["t1w"])]
    manifest = tmp_path / "data" / f"cohort.{suffix}"
    manifest.parent.mkdir()
    if suffix == "csv":
        lines = ["id,split,t1w,t2w"] + [f"{i},test,{p},{subject['t2w']}" for i, p in rows]
        manifest.write_text("\n".join(lines) + "\n")
    else:
        items = [
            {"id": i, "split": "test", "images": {"t1w": str(p), "t2w": str(subject["t2w"])}}
            for i, p in rows
        ]
        manifest.write_text(json.dumps({"subjects": items}))
    out = tmp_path / "data" / "out"
    args = ["translate", "--model", str(tiny_model), "--data", str(manifest)]
    assert main([*args, "--out-dir", str(out), "--no-progress"]) == 1
    line = one_error_line(capsys)
    assert "'../escape' is not a safe name" in line
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["data", f"cohort.{suffix}"])


# ------------------------------------------------------------------------------------------
# 3. crashes: SIGKILL during batch translation, then resume


def cohort_manifest(subject: dict[str, Path], path: Path, n: int) -> tuple[Path, list[str]]:
    """A manifest of ``n`` test subjects, all using the test subject's files."""
    ids = [f"s{i:02d}" for i in range(n)]
    lines = ["id,split,t1w,t2w,mask"]
    lines += [f"{i},test,{subject['t1w']},{subject['t2w']},{subject['mask']}" for i in ids]
    path.write_text("\n".join(lines) + "\n")
    return path, ids


def batch_command(model: Path, manifest: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "yoda", "translate", "--model", str(model), "--data", str(manifest),
        "--out-dir", str(out), "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip


def check_outputs(out: Path, shape: tuple[int, ...]) -> set[str]:
    """Every visible output is a complete image; every sidecar parses; return finished ids."""
    finished = set()
    for image in out.glob("*_flair.nii.gz"):
        assert nib.load(image).get_fdata().shape == shape  # reads to the end
    for sidecar in out.glob("*_flair.json"):
        info = json.loads(sidecar.read_text())
        assert sidecar.name == f"{info['subject']}_flair.json"
        if (out / f"{info['subject']}_flair.nii.gz").exists():
            finished.add(info["subject"])
    return finished


@pytest.mark.slow
def test_killed_batch_leaves_no_partial_output_and_resumes(tiny_model, subject, tmp_path, capsys):
    manifest, ids = cohort_manifest(subject, tmp_path / "cohort.csv", 6)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        batch_command(tiny_model, manifest, out),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if list(out.glob("*_flair.json")):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)  # reaped: its pid no longer runs
    assert proc.returncode == -signal.SIGKILL, err[-2000:]

    shape = nib.load(subject["t1w"]).shape
    before = check_outputs(out, shape)
    assert 1 <= len(before) < len(ids)
    stamps = {s: (out / f"{s}_flair.nii.gz").stat().st_mtime_ns for s in before}

    args = ["translate", "--model", str(tiny_model), "--data", str(manifest)]
    assert main([*args, "--out-dir", str(out), "--device", "cpu", "--no-progress"]) == 0
    summary = capsys.readouterr().out
    assert f"translated {len(ids) - len(before)}, skipped {len(before)} already done, " in summary
    assert "0 busy in another run, 0 failed" in summary  # a stale lock does not block
    assert check_outputs(out, shape) == set(ids)
    assert {s: (out / f"{s}_flair.nii.gz").stat().st_mtime_ns for s in before} == stamps
    expected = sorted([f"{s}_flair.nii.gz" for s in ids] + [f"{s}_flair.json" for s in ids])
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == expected
    assert not list(out.glob("*.lock"))


# ------------------------------------------------------------------------------------------
# 5. concurrency: two batch runs share one output folder


@pytest.mark.slow
def test_two_batch_runs_share_the_work(tiny_model, subject, tmp_path):
    manifest, ids = cohort_manifest(subject, tmp_path / "cohort.csv", 5)
    out = tmp_path / "out"
    cmd = batch_command(tiny_model, manifest, out, "--seed", "3", "--views", "axial")
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=400) for p in procs]
    for proc, (_, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == 0, stderr[-2000:]
    translated = [int(re.search(r"translated (\d+),", s).group(1)) for s, _ in results]
    assert sum(translated) == len(ids)  # every subject done exactly once

    shape = nib.load(subject["t1w"]).shape
    assert check_outputs(out, shape) == set(ids)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{s}_flair.nii.gz" for s in ids] + [f"{s}_flair.json" for s in ids]
    )  # no locks, no temporary files
    translator = Translator.load(tiny_model, device="cpu")
    sources = {"t1w": subject["t1w"], "t2w": subject["t2w"]}
    for sid in ids:
        ref = translator.translate(
            sources, mask=subject["mask"], seed=subject_seed(3, sid), views="axial"
        )
        got = nib.load(out / f"{sid}_flair.nii.gz").get_fdata()
        np.testing.assert_allclose(got, ref.image, atol=1e-4)


# ------------------------------------------------------------------------------------------
# 3. crashes: several SIGKILLs during training, then an exact resume


def _losses(run: Path) -> list[tuple]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(e["step"], e["loss"], e["lr"]) for e in map(json.loads, lines) if "loss" in e]


def _end(run: Path) -> dict:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("event") == "end"][-1]


@pytest.mark.slow
def test_training_killed_several_times_resumes_exactly(
    phantom_cohort, train_cache, tmp_path, capsys
):
    from yoda.config import save_config
    from yoda.train import latest_checkpoint, train

    reference = tmp_path / "reference"
    train(_train_config(phantom_cohort, reference, train_cache), progress=False)

    out = tmp_path / "run"
    cfg_path = save_config(_train_config(phantom_cohort, out, train_cache), tmp_path / "cfg.yaml")
    rng = random.Random(2024)
    kills, last = 0, 0
    for attempt in range(3):
        args = ["--config", str(cfg_path)] if attempt == 0 else ["--out", str(out), "--resume"]
        cmd = [sys.executable, "-m", "yoda", "train", *args, "--no-progress"]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
        )
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            done = latest_checkpoint(out)
            if done is not None and int(done.name[5:]) > last:
                break  # progress since the last kill: now kill at a random moment
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        if proc.returncode == 0:
            break  # finished before the kill
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
        kills += 1
        last = int(latest_checkpoint(out).name[5:])
    assert kills >= 2 and last < 20

    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert f"resuming {out} from step " in capsys.readouterr().err  # also without a bar
    assert _losses(out) == _losses(reference)
    assert _end(out)["rank_weights_sha256"] == _end(reference)["rank_weights_sha256"]
    assert _end(out)["rank_ema_sha256"] == _end(reference)["rank_ema_sha256"]
