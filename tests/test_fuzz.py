"""Property-based fuzzing of the image reader through translation.

A small source file (a 24^3 crop of the phantom's test subject, identity affine) gets a corrupted
NIfTI header (dims, pixdims, qform/sform codes and parameters, datatype, scaling, data offset) or
corrupted voxels (NaN, Inf, constant, huge values). Every such input must either translate
correctly (the output has the source's shape and affine and finite values) or be refused with a
``YodaError`` (one stderr line and exit code 1 on the command line); nothing else may happen:
no other exception, no crash, no hang.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import signal
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from yoda.cli import main
from yoda.errors import YodaError
from yoda.translate import Translator

#: Seconds one example may take before it counts as a hang.
HANG_S = 60

FUZZ = settings(
    max_examples=50,
    deadline=timedelta(seconds=HANG_S),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

ODD = [0.0, -1.0, -2.5, 1e-30, 1e30, 3.4e38, float("nan"), float("inf"), float("-inf")]
odd_float = st.sampled_from(ODD) | st.floats(-10, 10, allow_nan=False)
DATATYPES = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 99]
dims = st.tuples(
    st.integers(-1, 9),
    *[st.integers(-3, 40) | st.just(32767) for _ in range(7)],
)
header_edit = st.one_of(
    st.tuples(st.just("dim"), dims.map(list)),
    st.tuples(st.just("pixdim"), st.lists(odd_float, min_size=8, max_size=8)),
    st.tuples(st.sampled_from(["qform_code", "sform_code"]), st.integers(-3, 300)),
    st.tuples(st.just("datatype"), st.sampled_from(DATATYPES)),
    st.tuples(st.just("bitpix"), st.sampled_from([0, 1, 8, 16, 24, 32, 64, 128, -8])),
    st.tuples(st.sampled_from(["scl_slope", "scl_inter"]), odd_float),
    st.tuples(
        st.just("vox_offset"),
        st.sampled_from([0.0, 16.0, 100.0, 348.0, 353.0, 368.0, 1e6, 1e12, -5.0, float("nan")]),
    ),
    st.tuples(st.sampled_from(["quatern_b", "quatern_c", "quatern_d", "qoffset_y"]), odd_float),
    st.tuples(
        st.sampled_from(["srow_x", "srow_y", "srow_z"]),
        st.lists(odd_float, min_size=4, max_size=4),
    ),
)
content_edit = st.one_of(
    st.tuples(st.just("nan"), st.integers(1, 50)),
    st.tuples(st.just("inf"), st.integers(1, 50)),
    st.tuples(st.just("constant"), odd_float),
    st.tuples(st.just("scale"), st.sampled_from([1e-30, 1e-6, 1e6, 1e30, -1.0])),
    st.tuples(st.just("outlier"), st.sampled_from([1e30, 3.4e38, -3.4e38, 1e10])),
    st.tuples(st.just("int16"), st.just(0)),
)


@contextlib.contextmanager
def hard_timeout(seconds: int) -> Iterator[None]:
    """Fail (TimeoutError) if the body runs longer than ``seconds``: a hang, not a slow run."""

    def alarm(_signum, _frame):
        raise TimeoutError(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def base_volume(phantom_cohort: Path) -> np.ndarray:
    """A 24^3 float32 crop of the test subject's T1w through the middle of the head."""
    t1w = phantom_cohort.parent / "sub-004" / "t1w.nii.gz"
    data = np.asarray(nib.load(t1w).dataobj, dtype=np.float32)
    cx, cy, cz = (s // 2 for s in data.shape)
    crop = data[cx - 12 : cx + 12, cy - 12 : cy + 12, cz - 12 : cz + 12]
    assert crop.shape == (24, 24, 24) and crop.std() > 0
    return np.ascontiguousarray(crop)


@pytest.fixture(scope="module")
def translator(tiny_model: Path) -> Translator:
    return Translator.load(tiny_model, device="cpu")


def corrupted_file(
    folder: Path, base: np.ndarray, header: list, content: list, gzipped: bool
) -> Path:
    """Write ``base`` (identity affine) with the content edits, then overwrite header fields."""
    data = base.copy()
    rng = np.random.default_rng(0)
    for kind, value in sorted(content, key=lambda edit: edit[0] == "int16"):  # int16 last
        flat = data.reshape(-1)
        if kind in ("nan", "inf"):
            idx = rng.choice(flat.size, size=value, replace=False)
            flat[idx] = np.nan if kind == "nan" else np.inf
        elif kind == "constant":
            data[...] = value
        elif kind == "scale":
            with np.errstate(over="ignore"):
                data = (data * np.float32(value)).astype(np.float32)
        elif kind == "outlier":
            flat[rng.integers(flat.size)] = value
        elif kind == "int16":
            data = np.clip(np.nan_to_num(data), -32768, 32767).astype(np.int16)
    raw = nib.Nifti1Image(data, np.eye(4)).to_bytes()
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    for field, value in header:
        hdr[field] = value  # raw structured-array write: no validation
    blob = hdr.binaryblock + raw[len(hdr.binaryblock) :]
    path = folder / ("src.nii.gz" if gzipped else "src.nii")
    path.write_bytes(gzip.compress(blob) if gzipped else blob)
    return path


def expected_grid(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape (trailing singleton dims dropped) and affine of the source as nibabel reads it."""
    img = nib.load(str(path))
    shape = list(img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    return tuple(shape), np.asarray(img.affine, dtype=np.float64)


def assert_good_output(out: Path, src: Path) -> None:
    shape, affine = expected_grid(src)
    img = nib.load(str(out))
    assert img.shape == shape
    np.testing.assert_allclose(img.affine, affine, rtol=1e-5, atol=1e-4)
    assert np.isfinite(img.get_fdata()).all()
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, "out.json", src.name])


#: Hard cases, always tried besides the random ones.
KNOWN = [
    # RGB voxels: numpy cannot cast the structured type to float
    dict(header=[("datatype", 128), ("bitpix", 24)], content=[], gzipped=False),
    # a header claiming 32767^3 voxels: a 140 TB allocation (MemoryError) for a gzip file
    dict(header=[("dim", [3, 32767, 32767, 32767, 1, 1, 1, 1])], content=[], gzipped=True),
    # more data declared than stored: nibabel's message spans two lines
    dict(header=[("datatype", 64), ("bitpix", 64)], content=[], gzipped=False),
    # scaling beyond float32: the cast overflows to Inf with a RuntimeWarning on stderr
    dict(header=[("scl_slope", 1e37)], content=[], gzipped=False),
    # pixdims of 0 and negative: nibabel fixes them and logs the fix to stderr
    dict(header=[("pixdim", [-1.0, 0.0, -2.5, 1.0, 1, 1, 1, 1])], content=[], gzipped=True),
]


def with_known(test):
    for case in KNOWN:
        test = example(**case)(test)
    return test


edits = dict(
    header=st.lists(header_edit, max_size=3),
    content=st.lists(content_edit, max_size=2),
    gzipped=st.booleans(),
)


@FUZZ
@with_known
@given(**edits)
def test_api_translates_or_refuses_clearly(
    translator, base_volume, tmp_path_factory, header, content, gzipped
):
    folder = tmp_path_factory.mktemp("fuzz")
    src = corrupted_file(folder, base_volume, header, content, gzipped)
    out = folder / "out.nii.gz"
    with hard_timeout(HANG_S):
        try:
            res = translator.translate({"t1w": src, "t2w": src}, mode="regression", views="axial")
        except YodaError as exc:
            event(f"refused: {type(exc).__name__}")
            message = str(exc)
            assert message and "Traceback" not in message
            assert sorted(p.name for p in folder.iterdir()) == [src.name]
            return
        # an accepted input must also be writable in its own grid
        res.save(out)
    event("translated")
    assert res.info["nfe"] == 1
    assert_good_output(out, src)


@settings(FUZZ, max_examples=25)
@with_known
@given(**edits)
def test_cli_translates_or_fails_with_one_line(
    tiny_model, base_volume, tmp_path_factory, header, content, gzipped
):
    folder = tmp_path_factory.mktemp("fuzzcli")
    src = corrupted_file(folder, base_volume, header, content, gzipped)
    out = folder / "out.nii.gz"
    args = ["translate", "--model", str(tiny_model), "--t1w", str(src), "--t2w", str(src)]
    args += ["--out", str(out), "--views", "axial", "--device", "cpu", "--no-progress"]
    err = io.StringIO()
    with (
        hard_timeout(HANG_S),
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO()),
        warnings.catch_warnings(record=True) as caught,  # would be printed on stderr too
    ):
        warnings.simplefilter("always")
        code = main(args)
    lines = err.getvalue().strip().splitlines() + [str(w.message) for w in caught]
    event(f"exit code {code}")
    if code == 0:
        assert_good_output(out, src)
    else:
        assert code == 1, lines  # 3 would be an internal error
        assert len(lines) == 1 and lines[0].startswith("yoda translate: error: "), lines
        assert sorted(p.name for p in folder.iterdir()) == [src.name]
