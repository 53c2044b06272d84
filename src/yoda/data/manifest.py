"""Cohort manifests: which subject has which image, and the readers of common dataset layouts.

A manifest lists subjects with an id, a split, one image path per named modality, and
optional mask, label and noise-free ("clean") paths. It is stored as CSV (columns ``id, split,
<modality>..., mask, label_<name>..., clean_<modality>...``; empty cells mean "absent") or as
JSON (``{"subjects": [{"id", "split", "images": {...}, "mask", "labels": {...}, "clean":
{...}}]}``). Relative paths resolve against the manifest's folder.

Readers build a manifest from BIDS, BraTS 2023, IXI and phantom folders; layouts without a split
get a deterministic train/val/test split from a seeded shuffle.
"""

from __future__ import annotations

import csv
import io as _io
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from yoda.atomic import write_text_atomic
from yoda.errors import ConfigError, GridMismatchError, InputError

#: Layouts understood by :func:`load_manifest`.
LAYOUTS = ("auto", "manifest", "bids", "brats", "ixi", "phantom")
#: Default train/val/test fractions for layouts that carry no split.
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
SPLITS = ("train", "val", "test")

#: BIDS suffix -> modality name (``PD`` is the deprecated spelling of ``PDw``).
BIDS_SUFFIXES = {"T1w": "t1w", "T2w": "t2w", "FLAIR": "flair", "PDw": "pd", "PD": "pd"}
#: BraTS 2023 file suffix -> modality name; ``seg`` is the label map.
BRATS_SUFFIXES = {"t1n": "t1n", "t1c": "t1c", "t2w": "t2w", "t2f": "flair"}
BRATS_LABEL = "seg"
#: IXI file suffix -> modality name.
IXI_SUFFIXES = {"T1": "t1w", "T2": "t2w", "PD": "pd"}

_NIFTI = re.compile(r"^(?P<stem>.+?)\.(nii|nii\.gz|mgz)$")
_BRATS = re.compile(r"^(?P<case>.+)-(?P<suffix>t1n|t1c|t2w|t2f|seg)\.nii(\.gz)?$")
_IXI = re.compile(r"^(?P<id>IXI\d+-[A-Za-z]+-\d+)-(?P<suffix>T1|T2|PD)\.nii(\.gz)?$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_+\-]*$")


def check_subject_id(sid: str) -> str:
    """Return ``sid`` if it is a safe file name stem, else raise :class:`InputError`.

    Outputs are later named by subject id, so ids must not contain path separators or ``..``,
    start with ``.``, be empty, or contain control characters.
    """
    if not isinstance(sid, str) or not sid.strip():
        raise InputError(f"subject id {sid!r} is empty")
    bad = (
        "/" in sid
        or "\\" in sid
        or ".." in sid
        or sid.startswith(".")
        or sid != sid.strip()
        or any(ord(c) < 32 for c in sid)
    )
    if bad:
        raise InputError(
            f"subject id {sid!r} is not a safe name (no path separators, no '..', no leading '.', "
            "no surrounding spaces); outputs are named by subject id"
        )
    return sid


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InputError(
            f"{what} name {name!r} is invalid: use lower-case letters, digits, '_', '-' or '+'"
        )
    return name


@dataclass
class Subject:
    """One subject: images by modality name, and optional mask, label maps and clean images.

    Parameters
    ----------
    id : str
        Safe subject id (see :func:`check_subject_id`).
    split : str
        Split name, e.g. "train", "val" or "test".
    images : dict[str, Path]
        Image path per lower-case modality name.
    mask : Path or None
        Brain/foreground mask.
    labels : dict[str, Path]
        Label maps by name (e.g. "seg", "tissue", "wmh", "wm").
    clean : dict[str, Path]
        Noise-free images by modality name (phantom only).
    """

    id: str
    split: str
    images: dict[str, Path]
    mask: Path | None = None
    labels: dict[str, Path] = field(default_factory=dict)
    clean: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_subject_id(self.id)
        if not isinstance(self.split, str) or not self.split.strip():
            raise InputError(f"subject {self.id!r}: split is empty")
        self.images = {_check_name(k, "modality"): Path(v) for k, v in self.images.items()}
        self.labels = {_check_name(k, "label"): Path(v) for k, v in self.labels.items()}
        self.clean = {_check_name(k, "modality"): Path(v) for k, v in self.clean.items()}
        if self.mask is not None:
            self.mask = Path(self.mask)

    def files(self) -> dict[str, Path]:
        """All files of the subject by role ("t1w", "mask", "label_seg", "clean_t1w", ...)."""
        out: dict[str, Path] = dict(self.images)
        if self.mask is not None:
            out["mask"] = self.mask
        out.update({f"label_{k}": v for k, v in self.labels.items()})
        out.update({f"clean_{k}": v for k, v in self.clean.items()})
        return out


@dataclass
class Manifest:
    """A cohort: subjects and the folder that relative paths resolve against.

    Subject ids must be unique; :class:`InputError` lists every duplicate. ``drawn_splits``
    holds the ids whose split was drawn at random because the source gave none.
    """

    subjects: list[Subject]
    root: Path
    drawn_splits: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        counts: dict[str, int] = {}
        for s in self.subjects:
            counts[s.id] = counts.get(s.id, 0) + 1
        dups = sorted(k for k, c in counts.items() if c > 1)
        if dups:
            raise InputError(
                f"manifest under {self.root}: duplicate subject ids: {', '.join(dups)}"
            )

    def __len__(self) -> int:
        return len(self.subjects)

    def __iter__(self) -> Iterator[Subject]:
        return iter(self.subjects)

    @property
    def ids(self) -> list[str]:
        """Subject ids in manifest order."""
        return [s.id for s in self.subjects]

    @property
    def modalities(self) -> list[str]:
        """Modality names present in any subject, in order of first appearance."""
        names: dict[str, None] = {}
        for s in self.subjects:
            names.update(dict.fromkeys(s.images))
        return list(names)

    @property
    def splits(self) -> dict[str, int]:
        """Number of subjects per split."""
        counts: dict[str, int] = {}
        for s in self.subjects:
            counts[s.split] = counts.get(s.split, 0) + 1
        return counts

    def split(self, name: str | None) -> Manifest:
        """The subjects of one split (all subjects for ``None``) as a new manifest."""
        subjects = [s for s in self.subjects if name is None or s.split == name]
        ids = {s.id for s in subjects}
        return Manifest(subjects, self.root, self.drawn_splits & ids)

    def default_split(self) -> str | None:
        """The split that translation and evaluation take by default: ``"test"``, or every
        subject (None) where the manifest gives no subject's split (all were drawn)."""
        return None if len(self.drawn_splits) == len(self.subjects) else "test"

    def split_for(self, name: str | None) -> str | None:
        """The split a command's ``--split NAME`` means: :meth:`default_split` for None, every
        subject (None) for "all" (unless a split has that name), else ``name``; InputError,
        listing the splits, where no subject is in it."""
        if name is None:
            name = self.default_split()
            if name is None:
                return None
        if name == "all" and "all" not in self.splits:
            return None
        if name not in self.splits:
            have = ", ".join(f"{k} ({n})" for k, n in sorted(self.splits.items()))
            every = "" if "all" in self.splits else "; 'all' takes every subject"
            raise InputError(
                f"no subjects in split {name!r} of the manifest (it has {have}{every})"
            )
        return name

    def subject(self, sid: str) -> Subject:
        """The subject with id ``sid`` (InputError if absent)."""
        for s in self.subjects:
            if s.id == sid:
                return s
        raise InputError(f"manifest under {self.root}: no subject {sid!r}")

    def missing(self, modalities: Iterable[str]) -> list[tuple[str, str]]:
        """(subject id, modality) for every requested modality a subject lacks."""
        mods = list(modalities)
        return [(s.id, m) for s in self.subjects for m in mods if m not in s.images]

    def require(self, modalities: Iterable[str] | None, *, where: str | None = None) -> Manifest:
        """Return self if every subject has every modality, else raise one clear InputError."""
        if not modalities:
            return self
        missing = self.missing(modalities)
        if missing:
            raise InputError(_missing_message(missing, where or str(self.root)))
        return self


def _missing_message(missing: list[tuple[str, str]], where: str) -> str:
    by_subject: dict[str, list[str]] = {}
    for sid, mod in missing:
        by_subject.setdefault(sid, []).append(mod)
    parts = [f"{sid} lacks {', '.join(mods)}" for sid, mods in by_subject.items()]
    return f"{where}: {len(by_subject)} subject(s) lack required modalities: " + "; ".join(parts)


# ---------------------------------------------------------------------------- splits


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate train/val/test fractions (three non-negative numbers summing to 1)."""
    try:
        fr = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise ConfigError(f"split fractions {fractions!r} are not numbers") from None
    if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
        raise ConfigError(
            f"split fractions {fractions!r} must be three non-negative numbers "
            "(train, val, test) summing to 1"
        )
    return fr  # type: ignore[return-value]


def assign_splits(
    ids: Sequence[str],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    groups: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Deterministic train/val/test assignment by a seeded shuffle.

    Parameters
    ----------
    ids : sequence of str
        Subject ids (order does not matter).
    fractions : (train, val, test)
        Fractions of groups per split; counts are rounded by largest remainder.
    seed : int
        Seed of the shuffle.
    groups : mapping id -> group, optional
        Ids of one group (e.g. sessions of one participant) share a split.

    Returns
    -------
    dict
        Split name per id.
    """
    fr = check_fractions(fractions)
    group_of = {i: (groups or {}).get(i, i) for i in ids}
    unique = sorted(set(group_of.values()))
    n = len(unique)
    exact = np.asarray(fr) * n
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    perm = np.random.default_rng(seed).permutation(n)
    labels = np.repeat(np.arange(3), counts)
    split_of = {unique[p]: SPLITS[labels[k]] for k, p in enumerate(perm)}
    return {i: split_of[g] for i, g in group_of.items()}


# ---------------------------------------------------------------------------- CSV / JSON


def _resolve(value: str | os.PathLike, root: Path) -> Path:
    p = Path(value).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else root / p))


def _subject_from_row(row: Mapping[str, object], root: Path, where: str) -> dict:
    """Turn a flat row (CSV columns) into Subject keyword arguments (split may be None)."""
    entry: dict = {"images": {}, "labels": {}, "clean": {}, "mask": None, "split": None}
    sid = None
    for key, raw in row.items():
        if key is None:
            raise InputError(f"{where}: a row has more cells than the header has columns")
        col = str(key).strip().lower()
        val = "" if raw is None else str(raw).strip()
        if col == "id":
            sid = val
        elif col == "split":
            entry["split"] = val or None
        elif not val or col == "":
            continue
        elif col == "mask":
            entry["mask"] = _resolve(val, root)
        elif col.startswith("label_"):
            entry["labels"][col[6:]] = _resolve(val, root)
        elif col.startswith("clean_"):
            entry["clean"][col[6:]] = _resolve(val, root)
        else:
            entry["images"][col] = _resolve(val, root)
    if not sid:
        raise InputError(f"{where}: a subject has no id (column 'id' missing or empty)")
    entry["id"] = sid
    return entry


def _check_repeated(names: Iterable[object], where: str, what: str = "column") -> None:
    """Refuse names that repeat once case and surrounding spaces are ignored (the last one
    would silently win)."""
    keys = [str(name).strip().lower() for name in names]
    repeated = sorted({k for k in keys if k and keys.count(k) > 1})
    if repeated:
        raise InputError(f"{where}: repeated {what}(s) {', '.join(repeated)}")


def _unique_keys(where: str) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """A ``json.loads`` hook that refuses an object with a repeated key (case aside)."""

    def pairs_to_dict(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        _check_repeated((key for key, _ in pairs), where, "key")
        return dict(pairs)

    return pairs_to_dict


def _subject_from_json(item: object, root: Path, where: str) -> dict:
    if not isinstance(item, Mapping):
        raise InputError(f"{where}: each subject must be a JSON object, got {type(item).__name__}")
    if "images" not in item:
        flat = {k: v for k, v in item.items() if not isinstance(v, (dict, list))}
        return _subject_from_row(flat, root, where)
    sid = item.get("id")
    if not isinstance(sid, str) or not sid:
        raise InputError(f"{where}: a subject has no id")

    def paths(key: str) -> dict[str, Path]:
        d = item.get(key) or {}
        if not isinstance(d, Mapping):
            raise InputError(f"{where}: subject {sid!r}: '{key}' must be an object of paths")
        return {str(k).lower(): _resolve(str(v), root) for k, v in d.items() if v}

    mask = item.get("mask")
    return {
        "id": sid,
        "split": item.get("split") or None,
        "images": paths("images"),
        "mask": _resolve(str(mask), root) if mask else None,
        "labels": paths("labels"),
        "clean": paths("clean"),
    }


def _build(
    entries: list[dict],
    root: Path,
    *,
    require: Iterable[str] | None,
    seed: int,
    fractions: Sequence[float],
    where: str,
    groups: Mapping[str, str] | None = None,
) -> Manifest:
    """Subjects from keyword dicts; splits assigned to those without one; require checked."""
    for e in entries:
        check_subject_id(e["id"])
    unsplit = [e["id"] for e in entries if not e.get("split")]
    if unsplit:
        assigned = assign_splits(unsplit, fractions, seed, groups)
        for e in entries:
            if not e.get("split"):
                e["split"] = assigned[e["id"]]
    manifest = Manifest([Subject(**e) for e in entries], root, frozenset(unsplit))
    if not manifest.subjects:
        raise InputError(f"{where}: no subjects found")
    return manifest.require(require, where=where)


def read_manifest(
    path: str | os.PathLike,
    *,
    require: Iterable[str] | None = None,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> Manifest:
    """Read a CSV or JSON manifest; relative paths resolve against its folder.

    Subjects without a split get one from :func:`assign_splits` (``seed``, ``fractions``).
    ``require`` lists modalities every subject must have (one InputError lists all gaps).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"manifest {path} does not exist or is not a file")
    root = path.absolute().parent
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"manifest {path} is not a text manifest (.csv, .tsv or .json)") from None
    except OSError as exc:
        raise InputError(f"manifest {path} cannot be read: {exc}") from None
    where = f"manifest {path}"
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text, object_pairs_hook=_unique_keys(where))
        except json.JSONDecodeError as exc:
            raise InputError(f"{where} is not valid JSON: {exc}") from None
        items = data.get("subjects") if isinstance(data, Mapping) else data
        if not isinstance(items, list):
            raise InputError(f"{where}: expected a list of subjects or {{'subjects': [...]}}")
        entries = [_subject_from_json(it, root, where) for it in items]
    elif path.suffix.lower() in (".csv", ".tsv"):
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        reader = csv.DictReader(_io.StringIO(text), delimiter=delimiter)
        fields = [str(f).strip().lower() for f in reader.fieldnames or []]
        _check_repeated(fields, where)
        if "id" not in fields:
            raise InputError(f"{where}: no 'id' column (columns: {', '.join(fields) or 'none'})")
        entries = [_subject_from_row(row, root, where) for row in reader]
    else:
        raise InputError(f"{where}: unknown manifest format {path.suffix!r} (use .csv or .json)")
    return _build(entries, root, require=require, seed=seed, fractions=fractions, where=where)


def _relative(p: Path, root: Path) -> str:
    try:
        return Path(p).absolute().relative_to(root).as_posix()
    except ValueError:
        return str(Path(p).absolute())


def write_manifest(manifest: Manifest, path: str | os.PathLike) -> Path:
    """Write a manifest as CSV or JSON (by suffix), atomically.

    Paths inside the manifest's folder are written relative to it, others absolute.
    """
    path = Path(path).expanduser()
    root = path.absolute().parent
    subjects = manifest.subjects
    if path.suffix.lower() == ".json":
        items = []
        for s in subjects:
            items.append(
                {
                    "id": s.id,
                    "split": s.split,
                    "images": {k: _relative(v, root) for k, v in s.images.items()},
                    "mask": _relative(s.mask, root) if s.mask is not None else None,
                    "labels": {k: _relative(v, root) for k, v in s.labels.items()},
                    "clean": {k: _relative(v, root) for k, v in s.clean.items()},
                }
            )
        text = json.dumps({"format": "yoda-manifest", "version": 1, "subjects": items}, indent=1)
        write_text_atomic(path, text + "\n")
        return path
    if path.suffix.lower() != ".csv":
        raise InputError(f"manifest {path}: unknown format {path.suffix!r} (use .csv or .json)")
    mods = manifest.modalities
    labels = list(dict.fromkeys(k for s in subjects for k in s.labels))
    clean = list(dict.fromkeys(k for s in subjects for k in s.clean))
    columns = ["id", "split", *mods, "mask"]
    columns += [f"label_{k}" for k in labels] + [f"clean_{k}" for k in clean]
    buf = _io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for s in subjects:
        row = [s.id, s.split]
        row += [_relative(s.images[m], root) if m in s.images else "" for m in mods]
        row.append(_relative(s.mask, root) if s.mask is not None else "")
        row += [_relative(s.labels[k], root) if k in s.labels else "" for k in labels]
        row += [_relative(s.clean[k], root) if k in s.clean else "" for k in clean]
        writer.writerow(row)
    write_text_atomic(path, buf.getvalue())
    return path


# ---------------------------------------------------------------------------- layouts


def _folder(root: str | os.PathLike, what: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputError(f"{what} folder {root} does not exist or is not a folder")
    return root.absolute()


def _walk_files(root: Path) -> Iterator[Path]:
    """Files under ``root`` in sorted order, skipping hidden entries."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _pick(candidates: dict[str, list[tuple[int, str, Path]]]) -> dict[str, Path]:
    """Per key, the candidate with the fewest extra entities, then the first by name."""
    return {k: sorted(v)[0][2] for k, v in candidates.items()}


def from_bids(
    root: str | os.PathLike,
    *,
    require: Iterable[str] | None = None,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> Manifest:
    """Read a BIDS folder: ``sub-*/[ses-*/]anat/sub-*[_ses-*]_<T1w|T2w|FLAIR|PDw>.nii[.gz]``.

    Modality names t1w, t2w, flair, pd. Each session is one subject (id ``sub-X_ses-Y``);
    sessions of one participant share a split. Where several files match one modality (e.g.
    ``acq-``/``run-`` variants) the one with the fewest extra entities is taken.
    """
    root = _folder(root, "BIDS")
    entries: list[dict] = []
    groups: dict[str, str] = {}
    for sub in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        sessions = sorted(p for p in sub.glob("ses-*") if p.is_dir())
        folders = [(sub.name, sub / "anat")]
        folders += [(f"{sub.name}_{ses.name}", ses / "anat") for ses in sessions]
        for sid, anat in folders:
            if not anat.is_dir():
                continue
            found: dict[str, list[tuple[int, str, Path]]] = {}
            for f in sorted(anat.iterdir()):
                m = _NIFTI.match(f.name)
                if not m or not f.is_file():
                    continue
                parts = m.group("stem").split("_")
                mod = BIDS_SUFFIXES.get(parts[-1])
                if mod is None or parts[0] != sub.name:
                    continue
                extra = len(parts) - 1 - len(sid.split("_"))
                found.setdefault(mod, []).append((extra, f.name, f))
            if found:
                entries.append({"id": sid, "split": None, "images": _pick(found)})
                groups[sid] = sub.name
    if not entries:
        raise InputError(
            f"BIDS folder {root}: no images found (expected sub-*/anat/sub-*_T1w.nii.gz, _T2w, "
            "_FLAIR or _PDw, optionally inside ses-* folders)"
        )
    return _build(
        entries,
        root,
        require=require,
        seed=seed,
        fractions=fractions,
        where=f"BIDS folder {root}",
        groups=groups,
    )


def from_brats(
    root: str | os.PathLike,
    *,
    require: Iterable[str] | None = None,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> Manifest:
    """Read a BraTS 2023 folder: ``<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz`` at any depth.

    Modality names t1n, t1c, t2w, flair (from t2f); the segmentation becomes label "seg".
    """
    root = _folder(root, "BraTS")
    cases: dict[Path, dict] = {}
    for f in _walk_files(root):
        m = _BRATS.match(f.name)
        if not m or m.group("case") != f.parent.name:
            continue
        case = cases.setdefault(
            f.parent, {"id": f.parent.name, "split": None, "images": {}, "labels": {}}
        )
        suffix = m.group("suffix")
        if suffix == BRATS_LABEL:
            case["labels"].setdefault(BRATS_LABEL, f)
        else:
            case["images"].setdefault(BRATS_SUFFIXES[suffix], f)
    entries = [c for c in cases.values() if c["images"]]
    if not entries:
        raise InputError(
            f"BraTS folder {root}: no cases found (expected <case>/<case>-t1n.nii.gz, -t1c, -t2w, "
            "-t2f, -seg)"
        )
    return _build(
        entries, root, require=require, seed=seed, fractions=fractions, where=f"BraTS folder {root}"
    )


def from_ixi(
    root: str | os.PathLike,
    *,
    require: Iterable[str] | None = None,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> Manifest:
    """Read IXI files ``IXI<nnn>-<site>-<nnnn>-{T1,T2,PD}.nii.gz`` (any folder depth).

    Files are grouped by subject id (e.g. ``IXI002-Guys-0828``); modality names t1w, t2w, pd.
    """
    root = _folder(root, "IXI")
    subjects: dict[str, dict] = {}
    for f in _walk_files(root):
        m = _IXI.match(f.name)
        if not m:
            continue
        sid = m.group("id")
        entry = subjects.setdefault(sid, {"id": sid, "split": None, "images": {}})
        entry["images"].setdefault(IXI_SUFFIXES[m.group("suffix")], f)
    if not subjects:
        raise InputError(
            f"IXI folder {root}: no images found (expected IXI*-T1.nii.gz, -T2.nii.gz, -PD.nii.gz)"
        )
    entries = [subjects[k] for k in sorted(subjects)]
    return _build(
        entries, root, require=require, seed=seed, fractions=fractions, where=f"IXI folder {root}"
    )


def from_phantom(
    root: str | os.PathLike,
    *,
    require: Iterable[str] | None = None,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> Manifest:
    """Read the phantom's output folder (its ``manifest.csv``)."""
    root = _folder(root, "phantom")
    path = root / "manifest.csv"
    if not path.is_file():
        raise InputError(f"phantom folder {root}: no manifest.csv (write one with `yoda phantom`)")
    return read_manifest(path, require=require, seed=seed, fractions=fractions)


_READERS = {"bids": from_bids, "brats": from_brats, "ixi": from_ixi, "phantom": from_phantom}


def detect_layout(path: str | os.PathLike) -> str:
    """Guess the layout of a manifest file or dataset folder."""
    path = Path(path).expanduser()
    if path.is_file():
        return "manifest"
    if not path.is_dir():
        raise InputError(f"data {path} does not exist")
    if (path / "manifest.csv").is_file():
        return "phantom"
    if any(p.is_dir() and p.name.startswith("sub-") for p in path.iterdir()):
        return "bids"
    for f in _walk_files(path):
        if _IXI.match(f.name):
            return "ixi"
        m = _BRATS.match(f.name)
        if m and m.group("case") == f.parent.name:
            return "brats"
    raise InputError(
        f"cannot recognise the layout of {path}: expected manifest.csv, BIDS sub-*/anat, BraTS "
        "<case>/<case>-t1n.nii.gz or IXI*-T1.nii.gz files; name the layout explicitly"
    )


def load_manifest(
    data: str | os.PathLike,
    layout: str = "auto",
    *,
    require: Iterable[str] | None = None,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> Manifest:
    """A manifest from a manifest file or a dataset folder of a given (or detected) layout."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r} is unknown; choose from {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = detect_layout(data)
    if layout == "manifest":
        return read_manifest(data, require=require, seed=seed, fractions=fractions)
    return _READERS[layout](data, require=require, seed=seed, fractions=fractions)


# ---------------------------------------------------------------------------- verification


def check_subject(subject: Subject, modalities: Sequence[str] | None = None) -> list[str]:
    """Every problem of one subject (missing, unreadable, non-finite, misregistered, empty mask).

    Images and clean images are checked for ``modalities`` (all of the subject's if None);
    the mask and all label maps always.
    """
    from yoda.data.io import check_same_grid, load_image

    mods = list(modalities) if modalities else list(subject.images)
    problems = [f"{subject.id}: missing modality '{m}'" for m in mods if m not in subject.images]
    files = {m: subject.images[m] for m in mods if m in subject.images}
    if subject.mask is not None:
        files["mask"] = subject.mask
    files.update({f"label_{k}": v for k, v in subject.labels.items()})
    files.update({f"clean_{k}": v for k, v in subject.clean.items() if k in mods})
    geoms = {}
    for role, path in files.items():
        try:
            arr, geom = load_image(path, name=role)
        except InputError as exc:
            problems.append(f"{subject.id}: {exc}")
            continue
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            problems.append(f"{subject.id}: {role} ({path}): {bad} voxel(s) are NaN or Inf")
            continue
        if role == "mask" and not np.any(arr > 0.5):  # as translation and training read masks
            problems.append(f"{subject.id}: mask ({path}): the mask is empty (no voxel > 0.5)")
        geoms[role] = geom
    if len(geoms) > 1:
        try:
            check_same_grid(geoms)
        except GridMismatchError as exc:
            problems.append(f"{subject.id}: {exc}")
    return problems


def check_data(
    manifest: Manifest, modalities: Sequence[str] | None = None, *, progress: bool = False
) -> list[str]:
    """Verify every subject; return all problems at once (one line each), [] if clean.

    Checks that requested modalities exist, files are readable 3-D images without NaN/Inf,
    all images of a subject share one grid (:func:`yoda.data.io.check_same_grid`) and masks
    are non-empty.
    """
    from tqdm import tqdm

    problems: list[str] = []
    for subject in tqdm(manifest.subjects, desc="check-data", unit="subject", disable=not progress):
        problems.extend(check_subject(subject, modalities))
    return problems
