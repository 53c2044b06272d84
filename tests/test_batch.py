"""Batch translation of a manifest: failures, skipping finished subjects, locks, shards, paths."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from yoda.batch import output_path, subject_lock, translate_cohort
from yoda.cli import main
from yoda.data import io
from yoda.data.manifest import Manifest, Subject
from yoda.errors import InputError
from yoda.translate import Translation, Translator, subject_seed


def write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    """A CSV manifest (id, split, t1w, t2w, mask) with absolute paths."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "split", "t1w", "t2w", "mask"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def subject_row(sid: str, folder: Path, **files: Path) -> dict[str, str]:
    row = {"id": sid, "split": "test"}
    for role in ("t1w", "t2w", "mask"):
        row[role] = str(files.get(role, folder / f"{role}.nii.gz"))
    return row


class StubTranslator:
    """Stands for a Translator: records calls and returns a small constant image."""

    def __init__(self) -> None:
        self.card = SimpleNamespace(target="flair")
        self.sources = ["t1w", "t2w"]
        self.calls: list[dict] = []
        _, self.geometry = io.load_image((np.zeros((4, 4, 4), np.float32), np.eye(4)))

    def translate(self, sources, **options):
        self.calls.append(dict(sources=sources, **options))
        image = np.full((4, 4, 4), float(options["seed"] % 200), np.float32)
        return Translation(image=image, geometry=self.geometry, info={"seed": options["seed"]})


def stub_manifest(root: Path, ids: list[str]) -> Manifest:
    subjects = [
        Subject(id=s, split="test", images={"t1w": root / "a.nii", "t2w": root / "b.nii"})
        for s in ids
    ]
    return Manifest(subjects, root)


# ------------------------------------------------------------------------------------------
# a real cohort through the command line


def test_broken_subject_is_reported_the_rest_translated_and_reruns_skip(
    tiny_model, phantom_cohort, tmp_path, capsys
):
    folder = phantom_cohort.parent / "sub-004"
    broken = tmp_path / "t1w_truncated.nii.gz"
    good = (folder / "t1w.nii.gz").read_bytes()
    broken.write_bytes(good[: len(good) // 2])
    manifest = write_manifest(
        tmp_path / "cohort.csv",
        [
            subject_row("alpha", folder),
            subject_row("broken", folder, t1w=broken),
            subject_row("gamma", folder),
        ],
    )
    out = tmp_path / "out"
    args = ["translate", "--model", str(tiny_model), "--data", str(manifest), "--split", "test"]
    args += ["--out-dir", str(out), "--views", "axial", "--seed", "4", "--no-progress"]

    assert main(args) == 1
    printed = capsys.readouterr()
    assert "translated 2, skipped 0 already done, 0 busy in another run, 1 failed" in printed.out
    errors = printed.err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("failed broken: t1w (")
    assert str(broken) in errors[0]
    expected = ["alpha_flair.json", "alpha_flair.nii.gz", "gamma_flair.json", "gamma_flair.nii.gz"]
    assert sorted(p.name for p in out.iterdir()) == expected

    # the outputs are what a single-subject translation with the subject's seed gives
    translator = Translator.load(tiny_model, device="cpu")
    sources = {"t1w": folder / "t1w.nii.gz", "t2w": folder / "t2w.nii.gz"}
    for sid in ("alpha", "gamma"):
        info = json.loads((out / f"{sid}_flair.json").read_text())
        assert info["subject"] == sid and info["seed"] == subject_seed(4, sid)
        ref = translator.translate(
            sources, views="axial", seed=info["seed"], mask=folder / "mask.nii.gz"
        )
        np.testing.assert_allclose(
            nib.load(out / f"{sid}_flair.nii.gz").get_fdata(), ref.image, atol=1e-4
        )

    # a second run skips the finished subjects without touching them
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(args) == 1
    printed = capsys.readouterr()
    assert "translated 0, skipped 2 already done, 0 busy in another run, 1 failed" in printed.out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    # once repaired, only the broken subject is translated
    broken.write_bytes(good)
    assert main(args) == 0
    assert "translated 1, skipped 2 already done, 0 busy in another run, 0 failed" in (
        capsys.readouterr().out
    )
    assert nib.load(out / "broken_flair.nii.gz").shape == nib.load(folder / "t1w.nii.gz").shape
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in stamps} == stamps


def test_batch_needs_out_dir_and_no_source_flags(tiny_model, phantom_cohort, tmp_path, capsys):
    base = ["translate", "--model", str(tiny_model), "--data", str(phantom_cohort)]
    for extra in ([], ["--out-dir", str(tmp_path / "o"), "--t1w", "x.nii.gz"]):
        assert main(base + extra) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "batch mode takes --data and --out-dir" in err[0]
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------
# output paths, locks, shards (stub translator: no network)


@pytest.mark.parametrize("sid", ["../escape", "a/../../b", "..", ".", "", "sub/../../x"])
def test_output_path_refuses_ids_leaving_the_folder(tmp_path, sid):
    with pytest.raises(InputError, match="would write outside"):
        output_path(tmp_path / "out", sid, "flair")


def test_output_path_of_a_plain_id(tmp_path):
    assert output_path(tmp_path, "sub-01", "flair") == tmp_path.resolve() / "sub-01_flair.nii.gz"


def test_escaping_id_is_reported_and_nothing_is_written_outside(tmp_path):
    manifest = stub_manifest(tmp_path, ["ok", "evil"])
    manifest.subjects[1].id = "../evil"  # as if a reader had let it through
    out = tmp_path / "deep" / "out"
    stub = StubTranslator()
    result = translate_cohort(stub, manifest, split="test", out_dir=out, options={}, progress=False)
    assert result.done == ["ok"] and list(result.failed) == ["../evil"]
    assert "would write outside" in result.failed["../evil"]
    assert len(stub.calls) == 1
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["ok_flair.json", "ok_flair.nii.gz"]


def test_ranks_share_the_subjects(tmp_path, monkeypatch):
    ids = [f"s{i}" for i in range(5)]
    manifest = stub_manifest(tmp_path, ids)
    done = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        result = translate_cohort(
            StubTranslator(), manifest, split="test", out_dir=tmp_path / "o", options={},
            seed=9, progress=False,
        )  # fmt: skip
        done.append(result.done)
    assert done == [["s0", "s2", "s4"], ["s1", "s3"]]
    for sid in ids:  # each subject's own seed, whatever rank translated it
        info = json.loads((tmp_path / "o" / f"{sid}_flair.json").read_text())
        assert info["seed"] == subject_seed(9, sid)


def test_force_translates_finished_subjects_again(tmp_path):
    manifest = stub_manifest(tmp_path, ["a", "b"])
    first = translate_cohort(StubTranslator(), manifest, split="test", out_dir=tmp_path / "o",
                             options={}, progress=False)  # fmt: skip
    again = translate_cohort(StubTranslator(), manifest, split="test", out_dir=tmp_path / "o",
                             options={}, progress=False)  # fmt: skip
    forced = translate_cohort(StubTranslator(), manifest, split="test", out_dir=tmp_path / "o",
                              options={}, force=True, progress=False)  # fmt: skip
    assert first.done == ["a", "b"] and again.skipped == ["a", "b"] and forced.done == ["a", "b"]


def test_warnings_of_finished_subjects_are_collected(tmp_path):
    class Warns(StubTranslator):
        def translate(self, sources, **options):
            res = super().translate(sources, **options)
            if len(self.calls) == 2:
                res.info["warnings"] = ["voxel size 1 x 1 x 1 mm is unlike the model's"]
            return res

    result = translate_cohort(Warns(), stub_manifest(tmp_path, ["a", "b", "c"]), split="test",
                              out_dir=tmp_path / "o", options={}, progress=False)  # fmt: skip
    assert result.done == ["a", "b", "c"]
    assert result.warnings == {"b": ["voxel size 1 x 1 x 1 mm is unlike the model's"]}


def test_empty_split_is_an_error(tmp_path):
    with pytest.raises(InputError, match="no subjects in split 'val'"):
        translate_cohort(StubTranslator(), stub_manifest(tmp_path, ["a"]), split="val",
                         out_dir=tmp_path / "o", options={}, progress=False)  # fmt: skip


def test_lock_is_exclusive_and_released(tmp_path):
    target = tmp_path / "s_flair.nii.gz"
    lock = tmp_path / "s_flair.nii.gz.lock"
    with subject_lock(target) as first:
        assert first and lock.exists()
        assert lock.read_text().endswith(f":{os.getpid()}")
        with subject_lock(target) as second:
            assert not second  # held by a live process (this one)
        assert lock.exists()
    assert not lock.exists()


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    target = tmp_path / "s_flair.nii.gz"
    lock = tmp_path / "s_flair.nii.gz.lock"
    lock.write_text(f"{socket.gethostname()}:{int(dead.stdout)}")
    with subject_lock(target) as got:
        assert got and lock.read_text().endswith(f":{os.getpid()}")
    # a lock written on another host is never taken over (its process cannot be checked)
    lock.write_text(f"another-host.invalid:{int(dead.stdout)}")
    with subject_lock(target) as got:
        assert not got
    assert lock.exists()


def test_subject_seed_is_stable_and_distinct():
    assert subject_seed(0, "sub-01") == subject_seed(0, "sub-01")
    seeds = {subject_seed(s, sid) for s in (0, 1) for sid in ("sub-01", "sub-02", "sub-03")}
    assert len(seeds) == 6
    assert all(0 <= s < 2**63 for s in seeds)
    # pinned: a rerun with another version of the package draws the same numbers
    assert subject_seed(0, "sub-01") == 3645224990371179424
