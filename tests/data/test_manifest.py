"""Manifests, layout readers, splits and `yoda check-data`."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from yoda.cli import main
from yoda.data.manifest import (
    Manifest,
    Subject,
    assign_splits,
    check_data,
    detect_layout,
    from_bids,
    from_brats,
    from_ixi,
    from_phantom,
    load_manifest,
    read_manifest,
    write_manifest,
)
from yoda.errors import ConfigError, InputError

SHAPE = (6, 7, 5)


def write_nii(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    nib.Nifti1Image(data.astype(np.float32), np.eye(4) if affine is None else affine).to_filename(
        path
    )
    return path


def touch_all(root: Path, names: list[str]) -> None:
    for name in names:
        write_nii(root / name)


# ----------------------------------------------------------------------------- layouts


def test_bids_without_sessions_finds_files_and_reports_missing(tmp_path):
    touch_all(
        tmp_path,
        [
            "sub-01/anat/sub-01_T1w.nii.gz",
            "sub-01/anat/sub-01_acq-fast_T1w.nii.gz",  # a variant: the plain file is preferred
            "sub-01/anat/sub-01_T2w.nii.gz",
            "sub-01/anat/sub-01_FLAIR.nii.gz",
            "sub-01/anat/sub-01_PDw.nii",
            "sub-02/anat/sub-02_T1w.nii.gz",
            "sub-02/anat/sub-02_T2w.nii.gz",
            "sub-02/anat/sub-02_FLAIR.nii.gz",
            "sub-03/anat/sub-03_T1w.nii.gz",
            "sub-03/anat/sub-03_T2w.nii.gz",
            "sub-03/func/sub-03_task-rest_bold.nii.gz",  # not anatomical: ignored
        ],
    )
    (tmp_path / "sub-01/anat/sub-01_T1w.json").write_text("{}")
    m = from_bids(tmp_path)
    assert m.ids == ["sub-01", "sub-02", "sub-03"]
    s1 = m.subject("sub-01")
    assert s1.images == {
        "t1w": tmp_path / "sub-01/anat/sub-01_T1w.nii.gz",
        "t2w": tmp_path / "sub-01/anat/sub-01_T2w.nii.gz",
        "flair": tmp_path / "sub-01/anat/sub-01_FLAIR.nii.gz",
        "pd": tmp_path / "sub-01/anat/sub-01_PDw.nii",
    }
    assert set(m.subject("sub-03").images) == {"t1w", "t2w"}
    assert m.missing(["t1w", "flair", "pd"]) == [
        ("sub-02", "pd"),
        ("sub-03", "flair"),
        ("sub-03", "pd"),
    ]
    with pytest.raises(InputError, match=r"sub-03 lacks flair") as err:
        from_bids(tmp_path, require=["t1w", "flair"])
    assert "sub-01" not in str(err.value) and "sub-02" not in str(err.value)
    assert detect_layout(tmp_path) == "bids"


def test_bids_with_sessions_one_subject_per_session_sharing_split(tmp_path):
    names = []
    for i in range(1, 13):
        for ses in ("ses-1", "ses-2"):
            sub = f"sub-{i:02d}"
            names += [f"{sub}/{ses}/anat/{sub}_{ses}_{s}.nii.gz" for s in ("T1w", "T2w")]
    touch_all(tmp_path, names)
    m = from_bids(tmp_path, require=["t1w", "t2w"], seed=3)
    assert len(m) == 24
    s = m.subject("sub-05_ses-2")
    assert s.images["t2w"] == tmp_path / "sub-05/ses-2/anat/sub-05_ses-2_T2w.nii.gz"
    for i in range(1, 13):
        assert m.subject(f"sub-{i:02d}_ses-1").split == m.subject(f"sub-{i:02d}_ses-2").split
    # 12 participants at 0.8/0.1/0.1 -> 10/1/1 participants, two sessions each
    assert m.splits == {"train": 20, "val": 2, "test": 2}


def test_brats_layout(tmp_path):
    root = tmp_path / "BraTS2023-GLI"
    cases = ["BraTS-GLI-00000-000", "BraTS-GLI-00002-000"]
    for c in cases:
        touch_all(root, [f"{c}/{c}-{s}.nii.gz" for s in ("t1n", "t1c", "t2w", "t2f", "seg")])
    write_nii(root / "BraTS-GLI-00003-000/BraTS-GLI-00003-000-t1n.nii.gz")
    m = from_brats(tmp_path)
    assert m.ids == [*cases, "BraTS-GLI-00003-000"]
    s = m.subject(cases[1])
    c = cases[1]
    assert s.images == {
        "t1n": root / c / f"{c}-t1n.nii.gz",
        "t1c": root / c / f"{c}-t1c.nii.gz",
        "t2w": root / c / f"{c}-t2w.nii.gz",
        "flair": root / c / f"{c}-t2f.nii.gz",
    }
    assert s.labels == {"seg": root / c / f"{c}-seg.nii.gz"}
    assert m.subject("BraTS-GLI-00003-000").labels == {}
    with pytest.raises(InputError, match=r"BraTS-GLI-00003-000 lacks t1c, flair"):
        from_brats(tmp_path, require=["t1n", "t1c", "flair"])
    assert detect_layout(tmp_path) == "brats"


def test_ixi_layout_groups_by_subject(tmp_path):
    touch_all(
        tmp_path,
        [
            "IXI002-Guys-0828-T1.nii.gz",
            "IXI002-Guys-0828-T2.nii.gz",
            "IXI002-Guys-0828-PD.nii.gz",
            "IXI002-Guys-0828-MRA.nii.gz",  # not used
            "IXI012-HH-1211-T1.nii.gz",
            "IXI012-HH-1211-T2.nii.gz",
        ],
    )
    m = from_ixi(tmp_path)
    assert m.ids == ["IXI002-Guys-0828", "IXI012-HH-1211"]
    assert m.subject("IXI002-Guys-0828").images == {
        "t1w": tmp_path / "IXI002-Guys-0828-T1.nii.gz",
        "t2w": tmp_path / "IXI002-Guys-0828-T2.nii.gz",
        "pd": tmp_path / "IXI002-Guys-0828-PD.nii.gz",
    }
    with pytest.raises(InputError, match=r"IXI012-HH-1211 lacks pd"):
        from_ixi(tmp_path, require=["t2w", "pd"])
    assert detect_layout(tmp_path) == "ixi"


def test_phantom_manifest_relative_paths_resolve_against_its_folder(tmp_path, monkeypatch):
    root = tmp_path / "phantom"
    for sid in ("p000", "p001"):
        touch_all(root, [f"{sid}/{n}.nii.gz" for n in ("t1w", "t2w", "mask", "tissue", "ct1")])
    (root / "manifest.csv").write_text(
        "id,split,t1w,t2w,mask,label_tissue,clean_t1w\n"
        "p000,train,p000/t1w.nii.gz,p000/t2w.nii.gz,p000/mask.nii.gz,p000/tissue.nii.gz,"
        "p000/ct1.nii.gz\n"
        "p001,test,p001/t1w.nii.gz,p001/t2w.nii.gz,,p001/tissue.nii.gz,\n"
    )
    monkeypatch.chdir(tmp_path)  # a working directory other than the manifest's folder
    m = from_phantom(root)
    assert detect_layout(root) == "phantom"
    s0, s1 = m.subjects
    assert (s0.id, s0.split, s1.split) == ("p000", "train", "test")
    assert s0.images["t2w"] == root.absolute() / "p000/t2w.nii.gz"
    assert s0.mask == root.absolute() / "p000/mask.nii.gz"
    assert s0.labels == {"tissue": root.absolute() / "p000/tissue.nii.gz"}
    assert s0.clean == {"t1w": root.absolute() / "p000/ct1.nii.gz"}
    assert s1.mask is None and s1.clean == {}
    assert all(p.is_file() for s in m for p in s.files().values())


# ----------------------------------------------------------------------------- CSV / JSON


def _example_manifest(root: Path) -> Manifest:
    subjects = [
        Subject(
            "a01",
            "train",
            {"t1w": root / "a01/t1.nii.gz", "flair": root / "a01/fl.nii.gz"},
            mask=root / "a01/mask.nii.gz",
            labels={"wmh": root / "a01/wmh.nii.gz"},
            clean={"flair": root / "a01/cfl.nii.gz"},
        ),
        Subject("a02", "val", {"t1w": root / "a02/t1.nii.gz"}),
        Subject("a03", "test", {"t1w": Path("/elsewhere/a03_t1.nii.gz")}, mask=None),
    ]
    return Manifest(subjects, root)


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_manifest_round_trip(tmp_path, suffix):
    m = _example_manifest(tmp_path)
    out = write_manifest(m, tmp_path / f"manifest{suffix}")
    text = out.read_text()
    assert "a01/t1.nii.gz" in text and str(tmp_path) not in text  # relative inside the folder
    assert "/elsewhere/a03_t1.nii.gz" in text  # absolute outside it
    back = read_manifest(out)
    assert back.subjects == m.subjects
    assert back.root == tmp_path
    if suffix == ".csv":
        header = text.splitlines()[0]
        assert header == "id,split,t1w,flair,mask,label_wmh,clean_flair"
    else:
        assert json.loads(text)["subjects"][0]["images"]["flair"] == "a01/fl.nii.gz"
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left


def test_manifest_without_split_gets_deterministic_splits(tmp_path):
    rows = "\n".join(f"s{i:02d},s{i:02d}.nii.gz" for i in range(20))
    (tmp_path / "m.csv").write_text("id,t1w\n" + rows + "\n")
    a = read_manifest(tmp_path / "m.csv", seed=7)
    b = read_manifest(tmp_path / "m.csv", seed=7)
    c = read_manifest(tmp_path / "m.csv", seed=8)
    assert [s.split for s in a] == [s.split for s in b]
    assert [s.split for s in a] != [s.split for s in c]
    assert a.splits == {"train": 16, "val": 2, "test": 2}
    ids = [f"s{i:02d}" for i in range(20)]
    # drawn splits are marked: translation and evaluation then take every subject
    assert a.drawn_splits == set(ids)
    assert a.default_split() is None and a.split("test").drawn_splits <= a.drawn_splits
    (tmp_path / "half.csv").write_text("id,split,t1w\na,test,a.nii.gz\nb,,b.nii.gz\n")
    half = read_manifest(tmp_path / "half.csv")
    assert half.drawn_splits == {"b"} and half.default_split() == "test"  # some are given
    assert _example_manifest(tmp_path).default_split() == "test"
    # the assignment does not depend on the order of the ids
    assert assign_splits(ids, seed=7) == assign_splits(ids[::-1], seed=7)
    assert assign_splits(ids, seed=7) == {s.id: s.split for s in a}
    counts = list(assign_splits(ids[:7], (0.5, 0.25, 0.25), seed=1).values())
    assert sorted(counts.count(k) for k in ("train", "val", "test")) == [2, 2, 3]
    with pytest.raises(ConfigError):
        assign_splits(ids, (0.5, 0.6, 0.1))


def test_split_options_of_the_commands(tmp_path):
    m = _example_manifest(tmp_path)
    assert m.split_for(None) == "test" and m.split_for("val") == "val"
    assert m.split_for("all") is None and len(m.split(m.split_for("all"))) == 3
    with pytest.raises(InputError, match=r"split 'tset' .*it has test \(1\), train \(1\), "
                       r"val \(1\); 'all' takes every subject"):  # fmt: skip
        m.split_for("tset")
    named_all = Manifest([Subject("x", "all", {"t1w": tmp_path / "x.nii.gz"})], tmp_path)
    assert named_all.split_for("all") == "all"
    with pytest.raises(InputError, match=r"split 'test' .*\(it has all \(1\)\)$"):
        named_all.split_for(None)  # the default split is checked too


@pytest.mark.parametrize("bad", ["../evil", "a/b", "a\\b", ".hidden", "x..y", ""])
def test_unsafe_ids_are_rejected(tmp_path, bad):
    (tmp_path / "m.csv").write_text(f"id,split,t1w\nok,train,a.nii.gz\n{bad},train,b.nii.gz\n")
    with pytest.raises(InputError, match="id"):
        read_manifest(tmp_path / "m.csv")
    with pytest.raises(InputError):
        Subject(bad, "train", {"t1w": Path("a.nii.gz")})


def test_manifest_errors_are_clear(tmp_path):
    (tmp_path / "dup.csv").write_text("id,t1w\na,a.nii.gz\na,b.nii.gz\n")
    with pytest.raises(InputError, match="duplicate subject ids: a"):
        read_manifest(tmp_path / "dup.csv")
    (tmp_path / "noid.csv").write_text("name,t1w\na,a.nii.gz\n")
    with pytest.raises(InputError, match="no 'id' column"):
        read_manifest(tmp_path / "noid.csv")
    (tmp_path / "twice.csv").write_text("id,split,t1w,t2w,T1w\na,test,a.nii.gz,b.nii.gz,c.nii\n")
    with pytest.raises(InputError, match=r"twice.csv: repeated column\(s\) t1w"):
        read_manifest(tmp_path / "twice.csv")
    for subject in ('{"id": "a", "t1w": "a.nii", "T1w": "b.nii"}',
                    '{"id": "a", "t1w": "a.nii", "t1w": "b.nii"}',
                    '{"id": "a", "images": {"t1w": "a.nii", "T1w ": "b.nii"}}',
                    '{"id": "a", "images": {"t1w": "a.nii", "t1w": "b.nii"}}'):  # fmt: skip
        (tmp_path / "twice.json").write_text('{"subjects": [' + subject + "]}")
        with pytest.raises(InputError, match=r"twice.json: repeated key\(s\) t1w"):
            read_manifest(tmp_path / "twice.json")
    with pytest.raises(InputError, match="does not exist"):
        read_manifest(tmp_path / "missing.csv")
    (tmp_path / "binary.csv").write_bytes(b"\x1f\x8b\x08\x00\xff\xfe")
    with pytest.raises(InputError, match="binary.csv is not a text manifest"):
        read_manifest(tmp_path / "binary.csv")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InputError, match="cannot recognise the layout"):
        load_manifest(tmp_path / "empty_dir")
    with pytest.raises(ConfigError, match="layout"):
        load_manifest(tmp_path, "nifti-zoo")


# ----------------------------------------------------------------------------- check-data


def _subject_files(root: Path, sid: str, *, affine_t2=None, t2_data=None, mask=None) -> dict:
    rng = np.random.default_rng(zlib.crc32(sid.encode()))
    t1 = write_nii(root / sid / "t1.nii.gz", rng.random(SHAPE))
    t2 = write_nii(
        root / sid / "t2.nii.gz", rng.random(SHAPE) if t2_data is None else t2_data, affine_t2
    )
    m = np.zeros(SHAPE) if mask is None else mask
    if mask is None:
        m[2:4, 2:5, 1:4] = 1
    mk = write_nii(root / sid / "mask.nii.gz", m)
    return {"id": sid, "t1w": t1, "t2w": t2, "mask": mk}


def _write_csv(path: Path, rows: list[dict]) -> Path:
    lines = ["id,split,t1w,t2w,mask"]
    lines += [f"{r['id']},train,{r['t1w']},{r['t2w']},{r['mask']}" for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_check_data_clean_set_exit_0(tmp_path, capsys):
    rows = [_subject_files(tmp_path, f"ok{i}") for i in range(3)]
    csv_path = _write_csv(tmp_path / "m.csv", rows)
    out_manifest = tmp_path / "out" / "built.json"
    code = main(
        ["check-data", "--data", str(csv_path), "--quiet", "--write-manifest", str(out_manifest)]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "all 3 subjects OK" in out
    assert read_manifest(out_manifest).subjects == read_manifest(csv_path).subjects
    assert check_data(read_manifest(csv_path)) == []


def test_check_data_reports_all_problems_at_once(tmp_path, capsys):
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    nan_data = np.ones(SHAPE)
    nan_data[1, 1, 1] = np.nan
    rows = [
        _subject_files(tmp_path, "good"),
        _subject_files(tmp_path, "misreg", affine_t2=shifted),
        _subject_files(tmp_path, "nan", t2_data=nan_data),
        _subject_files(tmp_path, "empty", mask=np.full(SHAPE, 0.4)),  # translation: empty
        _subject_files(tmp_path, "broken"),
    ]
    (tmp_path / "broken" / "t1.nii.gz").write_bytes(b"this is not a nifti file")
    rows.append(
        {
            "id": "gone",
            "t1w": tmp_path / "nope.nii.gz",
            "t2w": rows[0]["t2w"],
            "mask": rows[0]["mask"],
        }
    )
    csv_path = _write_csv(tmp_path / "m.csv", rows)
    code = main(["check-data", "--data", str(csv_path), "--quiet"])
    out = capsys.readouterr().out
    assert code == 1
    lines = [
        ln
        for ln in out.splitlines()
        if ln.split(": ", 1)[0] in {"good", "misreg", "nan", "empty", "broken", "gone"}
    ]
    by_id = {ln.split(": ", 1)[0] for ln in lines}
    assert by_id == {"misreg", "nan", "empty", "broken", "gone"}  # all problems, one run
    text = "\n".join(lines)
    assert "misreg: t1w (" in text and "not on the same voxel grid" in text
    assert "nan: t2w (" in text and "NaN" in text
    assert "empty: mask (" in text and "mask is empty" in text
    assert "broken: t1w (" in text and "not a readable" in text
    assert "gone: t1w (" in text and "not found" in text
    assert len(lines) == 5
    assert "5 problem(s) in 5 of 6 subject(s)" in out


def test_check_data_reports_missing_modalities(tmp_path, capsys):
    rows = [_subject_files(tmp_path, f"s{i}") for i in range(2)]
    csv_path = _write_csv(tmp_path / "m.csv", rows)
    code = main(["check-data", "--data", str(csv_path), "--quiet", "--modalities", "t1w", "FLAIR"])
    out = capsys.readouterr().out
    assert code == 1
    assert "s0: missing modality 'flair'" in out and "s1: missing modality 'flair'" in out


def test_check_data_on_bids_folder_writes_manifest(tmp_path, capsys):
    root = tmp_path / "bids"
    touch_all(root, [f"sub-0{i}/anat/sub-0{i}_{s}.nii.gz" for i in (1, 2) for s in ("T1w", "T2w")])
    out_csv = tmp_path / "built.csv"
    code = main(["check-data", "--data", str(root), "--write-manifest", str(out_csv)])  # with bar
    assert code == 0, capsys.readouterr().out
    built = read_manifest(out_csv)
    assert built.ids == ["sub-01", "sub-02"]
    assert built.subject("sub-02").images["t2w"] == root / "sub-02/anat/sub-02_T2w.nii.gz"
