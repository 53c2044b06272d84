"""`yoda check-data`: what it refuses before any work (an image as --data, an existing
--write-manifest without --force)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from yoda.cli import main
from yoda.data.manifest import read_manifest


def _error(capsys) -> tuple[str, str]:
    """The single stderr line of a failed check-data, and what it printed on stdout."""
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("yoda check-data: error: ") and "Traceback" not in err[0]
    return err[0], captured.out


def test_existing_manifest_is_not_replaced_without_force(phantom_cohort, capsys):
    before = phantom_cohort.read_bytes()
    data = str(phantom_cohort.parent)
    code = main(["check-data", "--data", data, "--write-manifest", str(phantom_cohort)])
    assert code == 1
    err, out = _error(capsys)
    assert "exists; pass --force to replace it" in err
    assert out == ""  # refused before the data were read
    assert phantom_cohort.read_bytes() == before


def test_force_replaces_an_existing_manifest(phantom_cohort, tmp_path, capsys):
    target = tmp_path / "manifest.json"
    target.write_text("an older file\n")
    args = ["check-data", "--data", str(phantom_cohort), "--no-verify"]
    assert main([*args, "--write-manifest", str(target)]) == 1
    assert "exists" in _error(capsys)[0]
    assert target.read_text() == "an older file\n"
    assert main([*args, "--write-manifest", str(target), "--force"]) == 0
    assert f"wrote manifest {target}" in capsys.readouterr().out
    assert read_manifest(target).subjects == read_manifest(phantom_cohort).subjects


def test_write_manifest_must_be_a_csv_or_json_file_name(phantom_cohort, tmp_path, capsys):
    args = ["check-data", "--data", str(phantom_cohort), "--no-verify", "--force"]
    assert main([*args, "--write-manifest", str(tmp_path / "m.txt")]) == 1
    assert "use .csv or .json" in _error(capsys)[0]
    (tmp_path / "folder.csv").mkdir()
    assert main([*args, "--write-manifest", str(tmp_path / "folder.csv")]) == 1
    assert "is a folder" in _error(capsys)[0]


@pytest.mark.parametrize("name", ["t1w.nii", "t1w.nii.gz"])
@pytest.mark.parametrize("layout", [[], ["--layout", "manifest"]])
def test_an_image_given_as_data_is_named_as_such(tmp_path, capsys, name, layout):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(np.arange(64, dtype=np.float32).reshape(4, 4, 4), np.eye(4)), path)
    assert main(["check-data", "--data", str(path), *layout]) == 1
    err, _ = _error(capsys)
    assert err.endswith(
        f"--data {path} is not a manifest (.csv, .tsv or .json) or a dataset folder"
    )
    assert "codec" not in err


def test_a_manifest_is_still_read(phantom_cohort, capsys):
    assert main(["check-data", "--data", str(phantom_cohort), "--quiet"]) == 0
    assert "check-data: all 5 subjects OK" in capsys.readouterr().out
