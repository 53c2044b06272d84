"""Cohort cache: each subject normalized, ROI-cropped and stored as a memory-mappable .npy.

Training draws random slabs from thousands of volumes; decoding compressed NIfTI for each
draw would starve the network. :func:`prepare_cache` therefore converts every subject once to
an uncompressed float32 array ``(C, x, y, z)`` with channels ``[target, source_1, ...,
source_S, mask]`` on the network scale ([-1, 1], background -1; the mask is 0/1), cropped to
the ROI (bounding box of the mask expanded by the margins). Arrays are opened with
``np.load(mmap_mode="r")``, so a slab read touches only the bytes it needs.

The cache is reused while it is up to date. Each array file is named by a key over the input
files (paths, modification times, sizes), the normalization, the margins, the sources and the
target, so a changed input or option leads to a rebuild of exactly the affected subjects. An
index JSON per split and set of options (``index-<split>-<digest>.json``, :func:`index_path`)
lists per subject the array file, its shape, the ROI box within the original canonical volume
and the fitted intensity parameters; caches of other options share the folder. Arrays listed
by any index of the folder are reused (an index of the older name ``index-<split>.json`` is
replaced by the current one). All files are written atomically (temporary file in the same
folder, then ``os.replace``), so readers never see a partial file. When several processes train
together, let one prepare the cache while the others wait, then open it with
:meth:`CachedCohort.open`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from yoda.atomic import atomic_path, write_text_atomic
from yoda.data.manifest import Manifest, Subject
from yoda.data.normalize import crop
from yoda.data.subject import prepare_subject, resolve_normalization
from yoda.errors import ConfigError, InputError

#: Format version of the cache (part of every key).
CACHE_VERSION = 1
#: Default ROI margins (voxels) along x (LR), y (AP), z (IS).
DEFAULT_MARGINS = (20, 10, 5)


# ---------------------------------------------------------------------------- normalization


def _check_names(sources: Sequence[str], target: str) -> tuple[list[str], str]:
    sources = [str(s) for s in sources]
    if not sources:
        raise ConfigError("at least one source modality is needed")
    if len(set(sources)) != len(sources):
        raise ConfigError(f"sources {sources} contain a duplicate")
    if target in sources:
        raise ConfigError(f"target {target!r} is also a source")
    return sources, str(target)


@dataclass
class SubjectArrays:
    """One subject normalized and cropped, as the network sees it.

    Attributes
    ----------
    data : float32 array (C, x, y, z)
        Channels [target, sources..., mask] on the network scale, mask 0/1, cropped to ``bbox``.
    bbox : tuple of slice
        ROI box within the full canonical volume.
    shape : tuple of int
        Full canonical shape (before cropping).
    intensities : dict
        Fitted :class:`~yoda.data.normalize.Intensity` per modality.
    geometry : Geometry
        Grid of the first source (for writing outputs).
    mask_source : str
        "mask" (the subject's mask) or "foreground:<first source>".
    """

    data: np.ndarray
    bbox: tuple[slice, slice, slice]
    shape: tuple[int, int, int]
    intensities: dict[str, Any]
    geometry: Any
    mask_source: str


def load_subject_arrays(
    subject: Subject,
    sources: Sequence[str],
    target: str,
    normalization: str | Mapping[str, Any] = "tissue",
    *,
    margins: Sequence[int] = DEFAULT_MARGINS,
) -> SubjectArrays:
    """Load, check, normalize and ROI-crop one subject (the same arrays the cache stores).

    The mask is the subject's mask, else :func:`~yoda.data.normalize.foreground_mask` of the
    first source; the ROI is :func:`~yoda.data.normalize.roi_bbox` of the mask. Each image is
    scaled by :func:`~yoda.data.normalize.fit_intensity` (within the mask) and mapped to the
    network scale.

    Raises
    ------
    InputError
        A modality is missing, a file cannot be read, the images are not co-registered, or the
        mask is empty.
    """
    sources, target = _check_names(sources, target)
    names = [target, *sources]
    missing = [m for m in names if m not in subject.images]
    if missing:
        raise InputError(f"subject {subject.id}: missing modality {', '.join(missing)}")
    prep = prepare_subject(
        subject.images,
        names,
        normalization=normalization,
        reference=sources[0],
        mask=subject.mask,
        margins=margins,
        label=subject.id,
    )
    return SubjectArrays(
        data=np.concatenate([prep.data, crop(prep.mask, prep.bbox)[None].astype(np.float32)]),
        bbox=prep.bbox,
        shape=prep.shape,
        intensities=prep.intensities,
        geometry=prep.geometry,
        mask_source=prep.mask_source,
    )


# ---------------------------------------------------------------------------- cache


@dataclass
class CachedCohort:
    """A prepared cache: per-subject arrays (C, x, y, z) plus their index.

    Attributes
    ----------
    cache_dir : Path
    index_path : Path
    sources, target : modality names; channels are [target, *sources, "mask"].
    normalization : resolved per-modality normalization.
    margins : ROI margins.
    use_mask_weights : whether training weights voxels by the mask.
    entries : list of dict
        Per subject: "id", "file", "key", "shape" (C, x, y, z), "bbox" ([start, stop] per axis),
        "full_shape", "mask_source", "intensity" (per modality).
    rebuilt : list of str
        Ids written by the call that returned this object (empty when fully reused).
    """

    cache_dir: Path
    index_path: Path
    sources: list[str]
    target: str
    normalization: dict[str, dict[str, Any]]
    margins: tuple[int, int, int]
    use_mask_weights: bool
    entries: list[dict[str, Any]]
    rebuilt: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def ids(self) -> list[str]:
        """Subject ids in cache order."""
        return [e["id"] for e in self.entries]

    @property
    def shapes(self) -> list[tuple[int, int, int, int]]:
        """Array shape (C, x, y, z) per subject."""
        return [tuple(e["shape"]) for e in self.entries]  # type: ignore[misc]

    @property
    def channels(self) -> list[str]:
        """Channel names: [target, *sources, "mask"]."""
        return [self.target, *self.sources, "mask"]

    def path(self, i: int) -> Path:
        """Array file of subject ``i``."""
        return self.cache_dir / self.entries[i]["file"]

    def load(self, i: int, *, mmap: bool = True) -> np.ndarray:
        """Array (C, x, y, z) of subject ``i``, memory-mapped read-only by default."""
        return np.load(self.path(i), mmap_mode="r" if mmap else None, allow_pickle=False)

    def bbox(self, i: int) -> tuple[slice, slice, slice]:
        """ROI box of subject ``i`` within its full canonical volume."""
        b = self.entries[i]["bbox"]
        return (slice(*b[0]), slice(*b[1]), slice(*b[2]))

    @classmethod
    def open(cls, index_path: str | os.PathLike) -> CachedCohort:
        """Open a prepared cache from its index JSON (no manifest or image files needed)."""
        index_path = Path(index_path)
        index = _read_index(index_path)
        if index is None:
            raise InputError(f"cache index {index_path} is missing, damaged or of another version")
        for e in index["subjects"]:
            if not (index_path.parent / e["file"]).is_file():
                raise InputError(f"cache index {index_path}: array file {e['file']} is missing")
        return cls(
            cache_dir=index_path.parent,
            index_path=index_path,
            sources=list(index["sources"]),
            target=index["target"],
            normalization=index["normalization"],
            margins=tuple(index["margins"]),  # type: ignore[arg-type]
            use_mask_weights=bool(index["use_mask_weights"]),
            entries=list(index["subjects"]),
        )


def _read_index(path: Path) -> dict | None:
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = (
        isinstance(index, dict)
        and index.get("format") == "yoda-cache"
        and index.get("version") == CACHE_VERSION
        and isinstance(index.get("subjects"), list)
    )
    return index if ok else None


def _file_stamp(path: Path, sid: str, role: str) -> list:
    try:
        st = os.stat(path)
    except OSError:
        raise InputError(f"subject {sid}: {role} file {path} not found") from None
    return [str(Path(path).absolute()), st.st_mtime_ns, st.st_size]


def _subject_key(
    subject: Subject,
    sources: list[str],
    target: str,
    norm: dict,
    margins: tuple[int, int, int],
) -> str:
    files = {m: _file_stamp(subject.images[m], subject.id, m) for m in [target, *sources]}
    if subject.mask is not None:
        files["mask"] = _file_stamp(subject.mask, subject.id, "mask")
    payload = {
        "version": CACHE_VERSION,
        "files": files,
        "normalization": norm,
        "sources": sources,
        "target": target,
        "margins": list(margins),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


def _atomic_write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def _array_ok(path: Path, shape: Sequence[int]) -> bool:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return tuple(arr.shape) == tuple(shape) and arr.dtype == np.float32


def _referenced_files(cache_dir: Path) -> set[str]:
    refs: set[str] = set()
    for p in cache_dir.glob("index-*.json"):
        index = _read_index(p)
        if index is not None:
            refs.update(str(e.get("file")) for e in index["subjects"])
    return refs


def _checked_options(
    sources: Sequence[str],
    target: str,
    split: str | None,
    normalization: str | Mapping[str, Any],
    use_mask_weights: bool,
    margins: Sequence[int],
) -> tuple[str, dict[str, Any]]:
    """The split's name and the options that shape a cache (normalization resolved per
    modality), checked: what its index records and its file name digests."""
    sources, target = _check_names(sources, target)
    margins_t = [int(m) for m in margins]
    if len(margins_t) != 3 or min(margins_t) < 0:
        raise ConfigError(f"ROI margins {tuple(margins)} must be three non-negative integers")
    if split is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", str(split)):
        raise ConfigError(f"split name {split!r} must be letters, digits, '_' or '-'")
    options = {
        "sources": sources,
        "target": target,
        "normalization": resolve_normalization(normalization, [target, *sources]),
        "margins": margins_t,
        "use_mask_weights": bool(use_mask_weights),
    }
    return "all" if split is None else str(split), options


def _index_file(cache_dir: str | os.PathLike, split_name: str, options: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser().absolute() / f"index-{split_name}-{digest}.json"


def index_path(
    cache_dir: str | os.PathLike,
    sources: Sequence[str],
    target: str,
    *,
    split: str | None = "train",
    normalization: str | Mapping[str, Any] = "tissue",
    use_mask_weights: bool = False,
    margins: Sequence[int] = DEFAULT_MARGINS,
) -> Path:
    """The index file :func:`prepare_cache` writes for these arguments.

    It is named by the split and a digest of the options (``index-<split>-<digest>.json``), so
    caches of other sources, targets or normalizations share a folder without overwriting
    each other's index.
    """
    checked = _checked_options(sources, target, split, normalization, use_mask_weights, margins)
    return _index_file(cache_dir, *checked)


def prepare_cache(
    manifest: Manifest,
    sources: Sequence[str],
    target: str,
    cache_dir: str | os.PathLike,
    *,
    split: str | None = "train",
    normalization: str | Mapping[str, Any] = "tissue",
    use_mask_weights: bool = False,
    margins: Sequence[int] = DEFAULT_MARGINS,
    progress: bool = False,
) -> CachedCohort:
    """Cache the subjects of one split as memory-mappable arrays; reuse what is up to date.

    Parameters
    ----------
    manifest : Manifest
    sources : sequence of str
        Source modality names (channel order of the conditioning).
    target : str
        Target modality name.
    cache_dir : path
        Folder of the cache (created if needed).
    split : str or None
        Split to cache (None: all subjects).
    normalization : str or mapping
        See :func:`resolve_normalization`.
    use_mask_weights : bool
        Training will weight the loss by the mask; then every subject needs its own mask.
    margins : (x, y, z)
        ROI margins in voxels.
    progress : bool
        Show a progress bar.

    Returns
    -------
    CachedCohort
    """
    from tqdm import tqdm

    split_name, options = _checked_options(
        sources, target, split, normalization, use_mask_weights, margins
    )
    sources, target, norm = options["sources"], options["target"], options["normalization"]
    margins_t = tuple(options["margins"])
    subjects = manifest.split(split).subjects
    if not subjects:
        raise InputError(f"manifest under {manifest.root}: no subjects in split {split!r}")
    Manifest(subjects, manifest.root).require([target, *sources], where=f"split {split_name}")
    if use_mask_weights:
        lacking = [s.id for s in subjects if s.mask is None]
        if lacking:
            raise InputError(
                f"mask weighting needs a mask per subject; {len(lacking)} lack one: "
                + ", ".join(lacking[:20])
                + (" ..." if len(lacking) > 20 else "")
            )
    path = _index_file(cache_dir, split_name, options)
    cache_dir = path.parent
    cache_dir.mkdir(parents=True, exist_ok=True)
    reusable = _reusable_entries(cache_dir, path)

    entries: list[dict[str, Any]] = []
    rebuilt: list[str] = []
    for subject in tqdm(subjects, desc="cache", unit="subject", disable=not progress):
        key = _subject_key(subject, sources, target, norm, margins_t)
        fname = f"{subject.id}.{key[:16]}.npy"
        prev = reusable.get((subject.id, key, fname))
        if prev is not None and _array_ok(cache_dir / fname, prev.get("shape", ())):
            entries.append(prev)
            continue
        arrays = load_subject_arrays(subject, sources, target, normalization, margins=margins_t)
        _atomic_save_npy(cache_dir / fname, arrays.data)
        entries.append(
            {
                "id": subject.id,
                "file": fname,
                "key": key,
                "shape": list(arrays.data.shape),
                "full_shape": list(arrays.shape),
                "bbox": [[b.start, b.stop] for b in arrays.bbox],
                "mask_source": arrays.mask_source,
                "intensity": {k: v.to_dict() for k, v in arrays.intensities.items()},
            }
        )
        rebuilt.append(subject.id)

    index = {
        "format": "yoda-cache",
        "version": CACHE_VERSION,
        "split": split_name,
        **options,
        "channels": [target, *sources, "mask"],
        "subjects": entries,
    }
    if _read_index(path) != index:
        _atomic_write_json(path, index)
    stale = list(dict.fromkeys(rebuilt + _remove_legacy_index(cache_dir, index)))
    if stale:
        _remove_stale(cache_dir, stale)
    return CachedCohort(
        cache_dir=cache_dir,
        index_path=path,
        sources=sources,
        target=target,
        normalization=norm,
        margins=margins_t,  # type: ignore[arg-type]
        use_mask_weights=bool(use_mask_weights),
        entries=entries,
        rebuilt=rebuilt,
    )


def _reusable_entries(cache_dir: Path, first: Path) -> dict[tuple, dict[str, Any]]:
    """Entries of every readable index in ``cache_dir`` by (id, key, file); ``first``'s win.

    An entry's key covers the input files and every option that shapes its array, so an entry
    of another index (other options of the index, or an index of an older name) with the same
    key describes the same array.
    """
    entries: dict[tuple, dict[str, Any]] = {}
    for p in [first, *sorted(q for q in cache_dir.glob("index-*.json") if q != first)]:
        index = _read_index(p)
        for e in index["subjects"] if index is not None else []:
            if isinstance(e, dict):
                entries.setdefault((e.get("id"), e.get("key"), e.get("file")), e)
    return entries


def _remove_legacy_index(cache_dir: Path, index: dict[str, Any]) -> list[str]:
    """Delete the index of the older name ``index-<split>.json`` where it was built with the
    options of ``index`` (just written under the current name); return its subject ids.

    An older index of other options (sources, target, normalization, ...) is left alone: the
    older name held one index per split, whatever its options.
    """
    legacy = cache_dir / f"index-{index['split']}.json"
    old = _read_index(legacy)
    shaping = ("split", "sources", "target", "normalization", "margins", "use_mask_weights")
    if old is None or any(old.get(k) != index[k] for k in shaping):
        return []
    try:
        legacy.unlink()
    except OSError:
        return []
    return [str(e.get("id")) for e in old["subjects"] if isinstance(e, dict)]


def _remove_stale(cache_dir: Path, ids: list[str]) -> None:
    """Delete arrays of these subjects that no index refers to any more."""
    refs = _referenced_files(cache_dir)
    for sid in ids:
        pattern = re.compile(re.escape(sid) + r"\.[0-9a-f]{16}\.npy")
        for p in cache_dir.glob(f"{_glob_escape(sid)}.*.npy"):
            if pattern.fullmatch(p.name) and p.name not in refs:
                try:
                    p.unlink()
                except OSError:
                    pass


def _glob_escape(text: str) -> str:
    """Escape glob metacharacters in a literal file name part."""
    return re.sub(r"([\[\]*?])", r"[\1]", text)
