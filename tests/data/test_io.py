"""Tests of yoda.data.io: canonical reading, exact write-back, atomic writes, grid checks."""

from __future__ import annotations

import gzip
import os
import re
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import (
    aff2axcodes,
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    ornt_transform,
)

import yoda.data.io as io_module
from yoda.data.io import (
    Geometry,
    check_same_grid,
    copy_in_order,
    field_of_view,
    load_image,
    read_voxel_size,
    resample_like,
    save_image,
)
from yoda.errors import ConfigError, GridMismatchError, InputError

RAS = axcodes2ornt("RAS")
SHAPE = (9, 11, 7)  # canonical (x, y, z)


def _ras_affine() -> np.ndarray:
    """A RAS+ affine with anisotropic voxels and an off-centre origin."""
    return np.array(
        [
            [1.5, 0.0, 0.0, -40.25],
            [0.0, 2.0, 0.0, 13.5],
            [0.0, 0.0, 2.5, -7.75],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )


def _oblique_affine() -> np.ndarray:
    """Rotation about two axes, a shear and anisotropic voxels (not representable as qform)."""
    a, b = np.deg2rad(25.0), np.deg2rad(-12.0)
    rot_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    shear = np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.15], [0.0, 0.0, 1.0]])
    lin = rot_z @ rot_x @ shear @ np.diag([0.9, 1.3, 3.1])
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = [12.5, -101.0, 33.3]
    return aff


def _stored(canonical: np.ndarray, affine_ras: np.ndarray, codes: str):
    """The same image stored with voxel axes in orientation ``codes``."""
    to_codes = ornt_transform(RAS, axcodes2ornt(codes))
    data = apply_orientation(canonical, to_codes)
    affine = affine_ras @ inv_ornt_aff(to_codes, canonical.shape)
    return data, affine


def _write(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    cls = nib.MGHImage if path.name.endswith((".mgz", ".mgh")) else nib.Nifti1Image
    nib.save(cls(data, affine), str(path))
    return path


def _random(shape=SHAPE, dtype=np.float32, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        return rng.integers(0, 256, size=shape).astype(np.uint8)
    return (rng.standard_normal(shape) * 100.0).astype(dtype)


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("codes", ["RAS", "LIA", "LPS", "PSR", "oblique"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".mgz"])
@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_round_trip_is_exact(tmp_path, codes, suffix, dtype):
    canonical = _random(dtype=np.uint8 if dtype == "uint8" else np.float32)
    if codes == "oblique":
        data, affine = canonical, _oblique_affine()
    else:
        data, affine = _stored(canonical, _ras_affine(), codes)
        assert "".join(aff2axcodes(affine)) == codes
    src = _write(tmp_path / f"in{suffix}", data, affine)
    original = nib.load(str(src))

    arr, geom = load_image(src, name="t1w")
    assert arr.dtype == np.float32
    assert arr.shape == geom.canonical_shape
    out = save_image(arr, geom, tmp_path / f"out{suffix}", dtype=dtype)

    back = nib.load(str(out))
    assert tuple(int(s) for s in back.shape) == tuple(int(s) for s in original.shape)
    assert np.array_equal(back.affine, original.affine)
    assert back.get_data_dtype().newbyteorder("=") == np.dtype(dtype)  # MGH is big-endian
    assert np.array_equal(back.get_fdata(), original.get_fdata())


def test_canonical_array_is_ras(tmp_path):
    """A marker at a known world position lands at the expected RAS index."""
    nx, ny, nz = 8, 10, 12  # stored axes: L, I, A
    zooms = np.array([2.0, 3.0, 1.5])
    affine = np.array(
        [
            [-zooms[0], 0.0, 0.0, 30.0],
            [0.0, 0.0, zooms[2], -50.0],
            [0.0, -zooms[1], 0.0, 40.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    assert "".join(aff2axcodes(affine)) == "LIA"
    data = np.zeros((nx, ny, nz), dtype=np.float32)
    i, j, k = 2, 7, 3
    data[i, j, k] = 1.0
    world = affine @ [i, j, k, 1.0]
    src = _write(tmp_path / "lia.nii.gz", data, affine)

    arr, geom = load_image(src)
    assert arr.shape == (nx, nz, ny)
    expected = (nx - 1 - i, k, ny - 1 - j)  # x flips L->R, y = stored A axis, z flips I->S
    assert np.unravel_index(np.argmax(arr), arr.shape) == expected
    # The canonical affine is diagonal with positive voxel sizes and maps the index to the marker.
    lin = geom.canonical_affine[:3, :3]
    assert np.allclose(lin, np.diag([zooms[0], zooms[2], zooms[1]]))
    assert np.allclose(geom.canonical_affine @ [*expected, 1.0], world)
    assert geom.voxel_size == pytest.approx((2.0, 1.5, 3.0))
    assert read_voxel_size(src) == pytest.approx((2.0, 1.5, 3.0))  # from the header alone
    with pytest.raises(InputError, match="file not found"):
        read_voxel_size(tmp_path / "missing.nii.gz")


def test_qform_only_header_round_trip(tmp_path):
    """A file whose mapping lives in the qform (sform code 0) keeps it bit for bit."""
    canonical = _random()
    data, affine = _stored(canonical, _ras_affine(), "LPS")
    img = nib.Nifti1Image(data, None)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=0)
    img.header["descrip"] = b"qform only"
    img.header.set_xyzt_units("mm", "msec")
    nib.save(img, str(tmp_path / "q.nii.gz"))
    original = nib.load(str(tmp_path / "q.nii.gz"))

    arr, geom = load_image(tmp_path / "q.nii.gz")
    back = nib.load(str(save_image(arr, geom, tmp_path / "o.nii.gz")))
    assert np.array_equal(back.affine, original.affine)
    hdr = back.header
    for key in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "xyzt_units"):
        assert hdr[key] == original.header[key], key
    assert hdr["descrip"].tobytes().rstrip(b"\0") == b"qform only"
    assert np.array_equal(back.get_fdata(), original.get_fdata())


def test_header_codes_units_and_scaling(tmp_path):
    canonical = _random()
    data, affine = _stored(canonical, _ras_affine(), "PSR")
    img = nib.Nifti1Image((data * 10).astype(np.int16), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=4)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = b"scanner T1w"
    img.header.set_slope_inter(0.5, -3.0)
    nib.save(img, str(tmp_path / "s.nii"))
    raw = (data * 10).astype(np.int16)

    arr, geom = load_image(tmp_path / "s.nii")
    # Reading applies scl_slope / scl_inter.
    assert np.array_equal(arr, apply_orientation(raw * 0.5 - 3.0, axcodes2ornt("PSR")))
    back = nib.load(str(save_image(arr, geom, tmp_path / "o.nii")))
    hdr = back.header
    assert int(hdr["qform_code"]) == 1 and int(hdr["sform_code"]) == 4
    assert hdr.get_xyzt_units() == ("mm", "sec")
    assert hdr["descrip"].tobytes().rstrip(b"\0") == b"scanner T1w"
    # Stored as given: no scaling, float32, values equal the scaled input.
    slope, inter = hdr.get_slope_inter()
    assert slope in (None, 1.0) and inter in (None, 0.0)
    assert back.get_data_dtype() == np.float32
    assert np.array_equal(np.asarray(back.dataobj.get_unscaled()), raw * 0.5 - 3.0)


def test_uint8_output_rounds_and_clips(tmp_path):
    affine = _ras_affine()
    arr = np.array([-20.0, 0.4, 0.6, 127.5, 254.6, 300.0], dtype=np.float32).reshape(1, 2, 3)
    arr = np.tile(arr, (2, 1, 1))
    _, geom = load_image((np.zeros(arr.shape, np.float32), affine))
    out = save_image(arr, geom, tmp_path / "u.nii.gz", dtype="uint8")
    back = nib.load(str(out))
    assert back.get_data_dtype() == np.uint8
    expected = np.tile(np.array([0, 0, 1, 128, 255, 255]).reshape(1, 2, 3), (2, 1, 1))
    assert np.array_equal(np.asarray(back.dataobj), expected)


def test_single_volume_4d_is_squeezed(tmp_path):
    canonical = _random()
    data, affine = _stored(canonical, _ras_affine(), "LIA")
    _write(tmp_path / "four.nii.gz", data[..., None], affine)
    arr, geom = load_image(tmp_path / "four.nii.gz")
    assert geom.shape == data.shape
    assert np.array_equal(arr, canonical)
    back = nib.load(str(save_image(arr, geom, tmp_path / "o.nii.gz")))
    assert back.shape == data.shape
    assert np.array_equal(back.affine, nib.load(str(tmp_path / "four.nii.gz")).affine)
    assert np.array_equal(back.get_fdata(), data)


def test_array_and_image_inputs(tmp_path):
    canonical = _random()
    data, affine = _stored(canonical, _oblique_affine(), "LIA")
    arr_pair, geom_pair = load_image((data, affine), name="t2w")
    arr_img, geom_img = load_image(nib.Nifti1Image(data, affine))
    path = _write(tmp_path / "f.nii.gz", data, affine)
    arr_file, geom_file = load_image(path)
    for arr in (arr_pair, arr_img):
        assert np.array_equal(arr, arr_file)
    assert geom_pair.header is None and geom_pair.path is None
    assert geom_file.path == str(path)
    np.testing.assert_allclose(geom_pair.canonical_affine, geom_file.canonical_affine, atol=1e-5)
    # The input array is not aliased by the canonical array.
    arr_pair[...] = -1
    assert not np.any(data == -1)
    # An array geometry is written with its affine (float32 header precision) and codes set.
    for suffix in (".nii.gz", ".mgz"):
        back = nib.load(str(save_image(arr_file, geom_pair, tmp_path / f"p{suffix}")))
        assert back.shape == data.shape
        np.testing.assert_allclose(back.affine, affine, atol=1e-5)
        np.testing.assert_array_equal(back.get_fdata(), data)
    assert int(nib.load(str(tmp_path / "p.nii.gz")).header["sform_code"]) > 0


def test_cross_format_write(tmp_path):
    """An MGZ input written as NIfTI (and back) keeps its grid."""
    canonical = _random()
    data, affine = _stored(canonical, _oblique_affine(), "LIA")
    src = _write(tmp_path / "in.mgz", data, affine)
    arr, geom = load_image(src)
    nii = nib.load(str(save_image(arr, geom, tmp_path / "o.nii")))
    np.testing.assert_allclose(nii.affine, nib.load(str(src)).affine, atol=1e-5)
    np.testing.assert_array_equal(nii.get_fdata(), data)
    arr2, geom2 = load_image(tmp_path / "o.nii")
    mgz = nib.load(str(save_image(arr2, geom2, tmp_path / "o.mgz")))
    np.testing.assert_allclose(mgz.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(mgz.get_fdata(), data)


# ---------------------------------------------------------------------------------------------
# atomic writes


def _inputs(tmp_path) -> tuple[np.ndarray, Geometry]:
    data, affine = _stored(_random(), _ras_affine(), "LIA")
    return load_image(_write(tmp_path / "src.nii.gz", data, affine))


def _failing_write(calls):
    def write(img, filename, suffix):
        calls.append(str(filename))
        with open(filename, "wb") as fh:  # a partial file, then a crash
            fh.write(b"\x00" * 100)
        raise RuntimeError("disk exploded")

    return write


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mgz"])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, suffix):
    arr, geom = _inputs(tmp_path)
    before = sorted(os.listdir(tmp_path))
    calls: list[str] = []
    monkeypatch.setattr(io_module, "_write", _failing_write(calls))
    out = tmp_path / f"out{suffix}"
    with pytest.raises(RuntimeError, match="disk exploded"):
        save_image(arr, geom, out)
    # The temporary file was in the output folder and kept the format suffix.
    assert len(calls) == 1
    tmp = Path(calls[0])
    assert tmp.parent == tmp_path and tmp.name.endswith(suffix) and tmp != out
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("gzipper", ["isal", "zlib"])
@pytest.mark.parametrize(("packed", "plain"), [(".nii.gz", ".nii"), (".mgz", ".mgh")])
def test_compressed_output_is_plain_gzip_of_the_uncompressed_file(
    tmp_path, monkeypatch, packed, plain, gzipper
):
    if gzipper == "zlib":  # as where isal is not installed
        monkeypatch.setattr(io_module, "igzip", None)
    arr, geom = _inputs(tmp_path)
    for dtype in ("float32", "uint8"):
        a = save_image(arr, geom, tmp_path / f"{dtype}{packed}", dtype=dtype).read_bytes()
        b = save_image(arr, geom, tmp_path / f"{dtype}{plain}", dtype=dtype)
        assert gzip.decompress(a) == b.read_bytes()
        # no file name, time stamp 0: the same image gives the same bytes
        assert a[3] == 0 and a[4:8] == bytes(4)
        again = save_image(arr, geom, tmp_path / f"again{packed}", dtype=dtype, overwrite=True)
        assert again.read_bytes() == a


def test_failed_overwrite_keeps_existing_file(tmp_path, monkeypatch):
    arr, geom = _inputs(tmp_path)
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"precious")
    before = sorted(os.listdir(tmp_path))

    def failing_write(img, filename, suffix):
        Path(filename).write_bytes(b"partial")
        raise OSError("no space left on device")

    monkeypatch.setattr(io_module, "_write", failing_write)
    with pytest.raises(InputError, match="out.nii.gz.*no space left"):
        save_image(arr, geom, out, overwrite=True)
    assert out.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == before


def test_existing_output_requires_overwrite(tmp_path):
    arr, geom = _inputs(tmp_path)
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"precious")
    with pytest.raises(InputError, match="out.nii.gz.*exists"):
        save_image(arr, geom, out)
    assert out.read_bytes() == b"precious"
    save_image(arr, geom, out, overwrite=True)
    assert np.array_equal(load_image(out)[0], arr)


def test_output_folder_is_created(tmp_path):
    arr, geom = _inputs(tmp_path)
    out = save_image(arr, geom, tmp_path / "a" / "b" / "out.nii.gz")
    assert np.array_equal(load_image(out)[0], arr)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_folder(tmp_path):
    arr, geom = _inputs(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(InputError, match="locked"):
            save_image(arr, geom, locked / "out.nii.gz")
    finally:
        locked.chmod(0o700)


def test_folder_without_write_permission(tmp_path, monkeypatch):
    """The permission check itself (root passes real permission checks, so simulate one)."""
    arr, geom = _inputs(tmp_path)
    real_access = os.access
    out_dir = tmp_path / "readonly"
    out_dir.mkdir()

    def access(path, mode, *args, **kwargs):
        if Path(path) == out_dir and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    with pytest.raises(InputError, match="readonly.*not writable"):
        save_image(arr, geom, out_dir / "out.nii.gz")
    assert list(out_dir.iterdir()) == []


def test_folder_that_is_a_file(tmp_path):
    arr, geom = _inputs(tmp_path)
    (tmp_path / "plain").write_text("not a folder")
    with pytest.raises(InputError, match="plain"):
        save_image(arr, geom, tmp_path / "plain" / "out.nii.gz")


def test_save_rejects_bad_requests(tmp_path):
    arr, geom = _inputs(tmp_path)
    with pytest.raises(ConfigError, match="int16"):
        save_image(arr, geom, tmp_path / "o.nii.gz", dtype="int16")
    with pytest.raises(InputError, match="unsupported output format"):
        save_image(arr, geom, tmp_path / "o.png")
    with pytest.raises(InputError, match="shape"):
        save_image(arr[:-1], geom, tmp_path / "o.nii.gz")
    bad = arr.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="1 NaN"):
        save_image(bad, geom, tmp_path / "o.nii.gz")
    with pytest.raises(InputError, match="directory"):
        save_image(arr, geom, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.nii.gz"]


def test_stale_header_is_rewritten_from_the_affine(tmp_path):
    """A header whose stored mapping disagrees with the recorded affine does not win."""
    arr, geom = _inputs(tmp_path)
    moved = geom.affine.copy()
    moved[0, 3] += 5.0
    stale = Geometry(moved, geom.shape, geom.header, geom.ornt, geom.path)
    back = nib.load(str(save_image(arr, stale, tmp_path / "o.nii.gz")))
    np.testing.assert_allclose(back.affine, moved, atol=1e-5)
    assert int(back.header["sform_code"]) == int(geom.header["sform_code"])
    np.testing.assert_array_equal(load_image(tmp_path / "o.nii.gz")[0], arr)


def test_save_refuses_a_grid_it_cannot_reproduce(tmp_path, monkeypatch):
    """If the image built for writing does not carry the input's grid, nothing is written."""
    arr, geom = _inputs(tmp_path)
    build = io_module._build_image

    def flipped(data, geometry, suffix):
        img = build(data, geometry, suffix)
        return nib.Nifti1Image(
            np.asarray(img.dataobj), np.diag([-1.0, 1.0, 1.0, 1.0]) @ geom.affine
        )

    monkeypatch.setattr(io_module, "_build_image", flipped)
    with pytest.raises(InputError, match="does not reproduce the grid"):
        save_image(arr, geom, tmp_path / "w.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.nii.gz"]


# ---------------------------------------------------------------------------------------------
# bad inputs


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputError, match=r"t1w .*nope\.nii\.gz.*not found"):
        load_image(tmp_path / "nope.nii.gz", name="t1w")
    with pytest.raises(InputError, match=re.escape(f"t1w ({tmp_path}): is a directory")):
        load_image(tmp_path, name="t1w")


def test_not_an_image(tmp_path):
    (tmp_path / "notes.nii").write_text("hello, I am not a NIfTI file")
    with pytest.raises(InputError, match=r"notes\.nii"):
        load_image(tmp_path / "notes.nii")
    (tmp_path / "garbage.nii.gz").write_bytes(b"garbage" * 50)
    with pytest.raises(InputError, match=r"garbage\.nii\.gz"):
        load_image(tmp_path / "garbage.nii.gz")
    (tmp_path / "empty.mgz").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.mgz"):
        load_image(tmp_path / "empty.mgz")
    with pytest.raises(InputError, match="expected a file path"):
        load_image(42)


@pytest.mark.parametrize("gzipper", ["isal", "zlib"])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mgz"])
def test_truncated_file(tmp_path, monkeypatch, suffix, gzipper):
    if gzipper == "zlib":
        monkeypatch.setattr(io_module, "igzip", None)
    data, affine = _stored(_random((20, 20, 20)), _ras_affine(), "RAS")
    full = _write(tmp_path / f"full{suffix}", data, affine).read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full[: len(full) // 2])
    with pytest.raises(InputError, match=rf"cut\{suffix}.*(damaged|truncated|readable)"):
        load_image(cut)


class _ReadSpy:
    """io's ``igzip``, recording where each ``IGzipFile`` stood when it was closed."""

    igzip = io_module.igzip  # the module itself (None where isal is not installed)

    def __init__(self, positions):
        self.positions = positions

    def IGzipFile(self, *args, **kwargs):  # noqa: N802 (the module's name)
        fh = self.igzip.IGzipFile(*args, **kwargs)
        close = fh.close

        def spy():
            if not fh.closed:
                self.positions.append(fh.tell())
            close()

        fh.close = spy
        return fh


@pytest.mark.skipif(io_module.igzip is None, reason="isal is not installed")
@pytest.mark.parametrize("kind", ["float32", "scaled int16", "big-endian", "nifti2"])
def test_gzipped_nifti_reads_through_isal_as_through_nibabel(tmp_path, monkeypatch, kind):
    data, affine = _stored(_random((21, 18, 15)), _ras_affine(), "LPI")
    if kind == "nifti2":
        img = nib.Nifti2Image(data.astype(np.float64), affine)
    elif kind == "float32":
        img = nib.Nifti1Image(data.astype(np.float32), affine)
    else:
        dtype = np.dtype(np.int16).newbyteorder(">" if kind == "big-endian" else "=")
        img = nib.Nifti1Image((data * 100).astype(dtype), affine)
        img.header.set_slope_inter(0.25, -7.0)
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"pushes the voxels on"))
    path = tmp_path / "img.nii.gz"
    nib.save(img, str(path))
    # the gzip stream goes on past the voxels: nothing beyond them is read
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()) + bytes(1 << 20)))
    positions = []
    monkeypatch.setattr(io_module, "igzip", _ReadSpy(positions))
    got, geom = load_image(path)
    monkeypatch.setattr(io_module, "igzip", None)
    want, geom_nibabel = load_image(path)
    assert np.array_equal(got, want) and got.dtype == np.float32
    assert np.array_equal(geom.affine, geom_nibabel.affine) and geom.shape == geom_nibabel.shape
    offset = nib.load(str(path)).dataobj.offset
    assert offset > 352 and positions == [offset + data.size * img.get_data_dtype().itemsize]


def _nifti_gz_with_a_bad_block(tmp_path: Path) -> Path:
    """A .nii.gz whose deflate stream breaks (a reserved block type) half-way through the
    voxels, as a damaged disk or transfer may leave it."""
    data, affine = _stored(_random((40, 40, 40), np.uint8), _ras_affine(), "RAS")
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "plain.nii"))
    plain = (tmp_path / "plain.nii").read_bytes()
    deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = deflate.compress(plain[: len(plain) // 2]) + deflate.flush(zlib.Z_FULL_FLUSH)
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00" + bytes(4) + b"\x00\xff" + body + b"\x07" + bytes(64))
    return path


@pytest.mark.parametrize("gzipper", ["isal", "zlib"])
def test_damaged_deflate_stream_is_an_input_error(tmp_path, monkeypatch, gzipper):
    if gzipper == "zlib":
        monkeypatch.setattr(io_module, "igzip", None)
    with pytest.raises(InputError, match=r"bad\.nii\.gz.*damaged or truncated"):
        load_image(_nifti_gz_with_a_bad_block(tmp_path))


@pytest.mark.parametrize("gzipper", ["isal", "zlib"])
@pytest.mark.parametrize("offset", [2.0**33, 2.0**40, 1e20])
def test_voxel_offset_beyond_the_file_is_an_input_error(tmp_path, monkeypatch, gzipper, offset):
    if gzipper == "zlib":
        monkeypatch.setattr(io_module, "igzip", None)
    raw = tmp_path / "far.nii"
    nib.save(nib.Nifti1Image(_random((8, 8, 8)), _ras_affine()), str(raw))
    blob = bytearray(raw.read_bytes())
    blob[108:112] = np.float32(offset).tobytes()  # vox_offset
    path = tmp_path / "far.nii.gz"
    path.write_bytes(gzip.compress(bytes(blob)))
    with pytest.raises(InputError, match=r"far\.nii\.gz\): cannot read the image data"):
        load_image(path)


@pytest.mark.skipif(io_module.igzip is None, reason="isal is not installed")
def test_only_gzipped_nifti_files_read_through_isal(tmp_path, monkeypatch):
    data, affine = _stored(_random((12, 10, 8)), _ras_affine(), "RAS")
    sizes = []
    monkeypatch.setattr(io_module, "igzip", _ReadSpy(sizes))
    for suffix in (".nii", ".mgz"):
        arr, _ = load_image(_write(tmp_path / f"img{suffix}", data, affine))
        assert np.allclose(arr, data)
    assert sizes == []


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((9, 11), "2-D"),
        ((9, 11, 1), "2-D"),
        ((9, 11, 7, 3), "3 volumes"),
        ((9, 11, 7, 2, 2), "4 volumes"),
    ],
)
def test_wrong_dimensionality(tmp_path, shape, message):
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), _ras_affine()), str(path))
    with pytest.raises(InputError, match=rf"img\.nii\.gz.*{message}"):
        load_image(path)
    with pytest.raises(InputError, match=message):
        load_image((np.ones(shape, np.float32), _ras_affine()))


@pytest.mark.parametrize(("value", "count"), [(np.nan, 3), (np.inf, 2), (-np.inf, 1)])
def test_non_finite_voxels(tmp_path, value, count):
    data = _random()
    data.flat[[5, 50, 100][:count]] = value
    path = _write(tmp_path / "nan.nii", data, _ras_affine())
    with pytest.raises(InputError, match=rf"nan\.nii.*{count} voxel\(s\) are NaN or Inf"):
        load_image(path)


@pytest.mark.parametrize("kind", ["singular", "nan"])
def test_bad_affine(tmp_path, kind):
    affine = _ras_affine()
    if kind == "singular":
        affine[:3, 2] = affine[:3, 0] * 2.0  # third voxel axis parallel to the first
        match = "singular"
    else:
        affine[1, 3] = np.nan
        match = "NaN"
    with pytest.raises(InputError, match=rf"flair.*{match}"):
        load_image((_random(), affine), name="flair")
    img = nib.Nifti1Image(_random(), None)
    img.header.set_sform(affine, code=1)
    path = tmp_path / "bad.nii.gz"
    nib.save(img, str(path))
    with pytest.raises(InputError, match=rf"bad\.nii\.gz.*{match}"):
        load_image(path)


# ---------------------------------------------------------------------------------------------
# co-registration


def _geom(affine: np.ndarray, shape=SHAPE, path: str | None = None) -> Geometry:
    _, geom = load_image((np.zeros(shape, np.float32), affine))
    geom.path = path
    return geom


def test_same_grid_passes():
    affine = _ras_affine()
    same = affine.copy()
    same[0, 3] += 1e-6
    check_same_grid({"t1w": _geom(affine), "t2w": _geom(same)})
    # The same grid stored in another axis order has the same canonical grid.
    data, lia = _stored(np.zeros(SHAPE, np.float32), affine, "LIA")
    check_same_grid({"t1w": _geom(affine), "t2w": _geom(lia, data.shape)})
    check_same_grid({"t1w": _geom(affine)})


def test_shape_mismatch_is_named():
    geoms = {
        "t1w": _geom(_ras_affine(), path="/data/sub-01_T1w.nii.gz"),
        "t2w": _geom(_ras_affine(), (9, 11, 8), path="/data/sub-01_T2w.nii.gz"),
    }
    with pytest.raises(GridMismatchError) as err:
        check_same_grid(geoms)
    msg = str(err.value)
    assert "t1w" in msg and "sub-01_T1w.nii.gz" in msg and "sub-01_T2w.nii.gz" in msg
    assert "(9, 11, 7) vs (9, 11, 8)" in msg


def test_affine_mismatch_is_quantified():
    other = _ras_affine()
    other[1, 3] += 0.5
    other[2, 2] = 2.0
    geoms = {"t1w": _geom(_ras_affine(), path="a.nii"), "flair": _geom(other, path="b.nii")}
    with pytest.raises(GridMismatchError) as err:
        check_same_grid(geoms)
    msg = str(err.value)
    assert "a.nii" in msg and "b.nii" in msg and "flair" in msg
    assert "differ by up to 0.5" in msg
    assert "1.5, 2, 2.5 vs 1.5, 2, 2" in msg
    assert isinstance(err.value, InputError)


def _smooth_field(points: np.ndarray) -> np.ndarray:
    x, y, z = points
    return (np.sin(x / 7.0) + np.cos(y / 9.0) * np.sin(z / 11.0) + 0.01 * x + 2.0).astype(
        np.float32
    )


def _sample(geom: Geometry) -> np.ndarray:
    idx = np.indices(geom.canonical_shape).reshape(3, -1)
    world = geom.canonical_affine[:3, :3] @ idx + geom.canonical_affine[:3, 3:4]
    return _smooth_field(world).reshape(geom.canonical_shape)


def test_resample_like_recovers_a_shifted_grid():
    shape = (24, 26, 20)
    ref = _geom(_ras_affine(), shape)
    shifted_affine = _ras_affine()
    shifted_affine[:3, 3] += [0.6, -1.3, 0.9]
    stored, lps = _stored(np.zeros(shape, np.float32), shifted_affine, "PSR")
    moved = _geom(lps, stored.shape)
    with pytest.raises(GridMismatchError):
        check_same_grid({"ref": ref, "moved": moved})

    out = resample_like(_sample(moved), moved, ref)
    assert out.shape == ref.canonical_shape and out.dtype == np.float32
    truth = _sample(ref)
    inner = (slice(2, -2),) * 3
    err = np.abs(out[inner] - truth[inner])
    assert err.max() < 0.02  # linear interpolation of a smooth field
    # Nearest neighbour is worse but bounded; outside the source the fill value is used.
    assert np.abs(
        resample_like(_sample(moved), moved, ref, order=0)[inner] - truth[inner]
    ).max() > (err.max())
    far = _geom(_ras_affine() + np.array([[0, 0, 0, 500.0]] * 3 + [[0, 0, 0, 0]]), shape)
    assert np.all(resample_like(_sample(moved), moved, far, cval=-7.0) == -7.0)


def test_resample_like_identity_and_integer_shift():
    shape = (10, 12, 8)
    geom = _geom(_ras_affine(), shape)
    arr = _random(shape)
    assert np.array_equal(resample_like(arr, geom, geom), arr)
    shifted = _ras_affine()
    shifted[:3, 3] += np.diag(shifted)[:3]  # one voxel along each axis
    out = resample_like(arr, geom, _geom(shifted, shape))
    np.testing.assert_allclose(out[:-1, :-1, :-1], arr[1:, 1:, 1:], rtol=1e-6, atol=1e-4)
    assert np.all(out[-1] == 0)
    with pytest.raises(InputError):
        resample_like(arr[:-1], geom, geom)


def _oblique(degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    rot = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    return rot @ _ras_affine()


def test_resampling_onto_its_own_oblique_grid_keeps_every_voxel():
    """inv(A) @ A of an oblique A is an identity only up to rounding; the border voxels must
    not fall outside the volume for it."""
    for deg in (1.0, 3.0, 4.7):
        geom = _geom(_oblique(deg), (9, 11, 7))
        arr = _random((9, 11, 7))
        assert np.array_equal(resample_like(arr, geom, geom), arr)
        assert field_of_view(geom, geom).all()


def test_field_of_view_reaches_half_a_voxel_beyond_the_outer_centres():
    shape = (10, 12, 8)
    geom = _geom(_ras_affine(), shape)
    for frac, covered in ((0.4, 9), (0.6, 8)):  # shift of the destination grid, in voxels
        moved = _ras_affine()
        moved[0, 3] += frac * moved[0, 0] + moved[0, 0]  # 1 + frac voxels along x
        inside = field_of_view(geom, _geom(moved, shape))
        assert inside.shape == shape
        assert inside.all(axis=(1, 2)).sum() == covered and not inside[covered:].any()
        out = resample_like(np.ones(shape, np.float32), geom, _geom(moved, shape), cval=-5.0)
        assert np.all(out[inside] == 1.0) and np.all(out[~inside] == -5.0)


def test_reading_in_threads_restores_the_nibabel_logger(tmp_path):
    """Overlapping reads keep nibabel's messages off while any runs, and switch the logger back
    to its former state when the last one ends."""
    import threading
    import time

    from yoda.data import io

    logger = nib.imageglobals.logger
    assert not logger.disabled
    inside, start = [], threading.Barrier(6)

    def read(k: int) -> None:
        start.wait()
        with io._quiet_nibabel():
            time.sleep(0.001 * (k % 3))
            inside.append(logger.disabled)

    for _ in range(20):
        threads = [threading.Thread(target=read, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not logger.disabled
    assert all(inside) and len(inside) == 120


@pytest.mark.parametrize("seed", range(6))
def test_copy_in_order_equals_numpys_copy(seed):
    """Tiled copies of reoriented views (flips and permutations, as loading and saving make)
    equal numpy's, in both memory orders, with casts, over any number of threads."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(1, 23, size=3))
    arr = rng.standard_normal(shape) * 100
    view = np.asfortranarray(arr) if seed % 2 else arr
    view = view.transpose(rng.permutation(3))[:: rng.choice([-1, 1]), :, :: rng.choice([-1, 1])]
    for order in ("C", "F"):
        for dtype in (None, np.float32, np.int16):
            expected = np.array(view, dtype=dtype, order=order)
            for workers in (1, 3, None):
                out = copy_in_order(view, order, dtype=dtype, workers=workers)
                assert out.dtype == expected.dtype and out.shape == view.shape
                assert out.flags["C_CONTIGUOUS" if order == "C" else "F_CONTIGUOUS"]
                assert not np.shares_memory(out, arr)
                np.testing.assert_array_equal(out, expected, err_msg=f"{order} {dtype} {workers}")
    with pytest.raises(ConfigError, match="memory order"):
        copy_in_order(arr, "K")
