"""Training slabs drawn at random from a cached cohort (paper III-D).

Each sample picks a subject uniformly, then a view uniformly, then a slice uniformly within the
subject's (cropped) ROI along that view, and reads the ``n`` slices around it straight from the
memory-mapped array (slices beyond the volume are background, -1). All samples are padded
in-plane, centred, to one fixed (H, W) for the whole cohort (multiples of ``in_multiple``).

Random stream. Sample ``g`` of rank ``r`` is a deterministic function of ``(seed, r, g)``:
draws are made in blocks of ``block`` samples, block ``b`` from a generator seeded by
``SeedSequence([seed, r, b])``, so jumping to any position costs one block. DataLoader workers
share the rank's stream: worker ``w`` of ``W`` produces chunks ``j = w, w + W, ...`` of
``batch_size`` consecutive samples. A DataLoader with the same ``batch_size`` collects chunks in
round-robin worker order, so the batches it delivers are the rank's stream in order whatever
the number of workers; workers and ranks never repeat each other's samples. Resuming needs
only the number of samples consumed (:meth:`SlabSampler.state_dict`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from yoda.data.cache import CachedCohort
from yoda.errors import ConfigError
from yoda.volume.views import VIEWS, to_view, view_name

#: Weight of voxels outside the mask when mask weighting is on (paper: epsilon = 0.01).
W_OUT = 0.01
_STATE_VERSION = 1


def view_permutation(view: str) -> tuple[int, int, int]:
    """Canonical axes (x=0, y=1, z=2) that become (D, H, W) under :func:`to_view`."""
    probe = torch.arange(24).reshape(2, 3, 4)
    permuted = to_view(probe, view)
    perm = tuple({2: 0, 3: 1, 4: 2}[s] for s in permuted.shape)
    if not torch.equal(permuted, probe.permute(*perm)):
        raise ConfigError(f"view {view!r} is not a pure axis permutation")
    return perm  # type: ignore[return-value]


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


class SlabSampler(IterableDataset):
    """Endless stream of random 2.5D training slabs from a :class:`CachedCohort`.

    Parameters
    ----------
    cohort : CachedCohort
        Prepared cache (channels [target, sources..., mask]).
    n_slices : int
        Odd slab thickness n.
    in_multiple : int
        H and W are multiples of this (the network's ``in_multiple``).
    size : (H, W), optional
        Fixed in-plane size; default the smallest multiple of ``in_multiple`` covering every
        view of every subject.
    views : sequence of str
        Views to draw from (uniformly); default all three.
    seed, rank : int
        Identify the random stream (one stream per rank; workers split it).
    batch_size : int
        Chunk size of the worker split; set it to the DataLoader's batch size.
    use_mask_weights : bool, optional
        Weight = mask * (1 - w_out) + w_out inside the image; default the cohort's setting.
        Without it the weight is 1 inside the image. Padding always has weight 0.
    w_out : float
        Weight outside the mask.
    num_samples : int, optional
        Stop after this many samples of the rank's stream (default: endless).
    block : int
        Samples per random block.
    max_open : int
        Most memory maps kept open per process (least recently used are closed).

    Each item is a dict: "target" (n, H, W), "cond" (S*n, H, W), "weight" (1, H, W) float32
    tensors, "view" (index into ``VIEWS``), "subject" (index into the cohort) and "index" (the
    sample's position in the stream).
    """

    def __init__(
        self,
        cohort: CachedCohort,
        *,
        n_slices: int = 5,
        in_multiple: int = 1,
        size: tuple[int, int] | None = None,
        views: Sequence[str] = VIEWS,
        seed: int = 0,
        rank: int = 0,
        batch_size: int = 1,
        use_mask_weights: bool | None = None,
        w_out: float = W_OUT,
        num_samples: int | None = None,
        block: int = 1024,
        max_open: int = 256,
    ) -> None:
        super().__init__()
        if isinstance(n_slices, bool) or not isinstance(n_slices, int) or n_slices < 1:
            raise ConfigError(f"n_slices must be a positive odd integer, got {n_slices!r}")
        if n_slices % 2 == 0:
            raise ConfigError(f"n_slices must be odd, got {n_slices}")
        for name, value in (("in_multiple", in_multiple), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(seed, int) or seed < 0 or not isinstance(rank, int) or rank < 0:
            raise ConfigError(f"seed and rank must be non-negative integers, got {seed}, {rank}")
        if not 0.0 <= w_out <= 1.0:
            raise ConfigError(f"w_out must be in [0, 1], got {w_out}")
        if len(cohort) == 0:
            raise ConfigError("the cohort is empty")
        self.views = tuple(view_name(v) for v in views)
        if not self.views or len(set(self.views)) != len(self.views):
            raise ConfigError(f"views {tuple(views)} must be distinct and non-empty")
        self.cohort = cohort
        self.n = n_slices
        self.in_multiple = in_multiple
        self.seed = seed
        self.rank = rank
        self.batch_size = batch_size
        self.use_mask_weights = (
            cohort.use_mask_weights if use_mask_weights is None else bool(use_mask_weights)
        )
        self.w_out = float(w_out)
        self.num_samples = num_samples
        self.block = int(block)
        self.max_open = int(max_open)
        self.n_sources = len(cohort.sources)

        self._view_index = np.array([VIEWS.index(v) for v in self.views])
        self._perm = [view_permutation(v) for v in self.views]
        shapes = np.array([s[1:] for s in cohort.shapes], dtype=np.int64)  # (N, 3) x, y, z
        if np.any(np.array([s[0] for s in cohort.shapes]) != self.n_sources + 2):
            raise ConfigError("cohort arrays do not have [target, sources..., mask] channels")
        # depth[i, v]: number of slices of subject i along view v; hw: in-plane sizes
        self._depth = np.stack([shapes[:, p[0]] for p in self._perm], axis=1)
        need_h = int(max(shapes[:, p[1]].max() for p in self._perm))
        need_w = int(max(shapes[:, p[2]].max() for p in self._perm))
        if size is None:
            size = (_round_up(need_h, in_multiple), _round_up(need_w, in_multiple))
        H, W = (int(size[0]), int(size[1]))
        if H < need_h or W < need_w or H % in_multiple or W % in_multiple:
            raise ConfigError(
                f"slab size {(H, W)} must cover {(need_h, need_w)} and be a multiple of "
                f"{in_multiple}"
            )
        self.size = (H, W)
        self._position = 0
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cached_block: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None

    # ------------------------------------------------------------------ state

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # memory maps are reopened in each worker
        state["_cached_block"] = None
        return state

    @property
    def position(self) -> int:
        """Samples of the stream consumed so far (where the next iteration starts)."""
        return self._position

    def state_dict(self, samples: int | None = None) -> dict[str, Any]:
        """Resume state: the seed and the number of samples consumed.

        When iterating in the training process (``num_workers=0``) the count is kept here.
        With DataLoader workers pass ``samples``: the position when the current iteration
        started plus the number of samples the loop consumed since (batches x batch size).
        """
        pos = self._position if samples is None else int(samples)
        return {"version": _STATE_VERSION, "seed": self.seed, "rank": self.rank, "samples": pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the stream exactly where ``state`` stopped (seed and position restored)."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ConfigError(f"sampler state {state!r} is not of version {_STATE_VERSION}")
        samples = state.get("samples")
        if not isinstance(samples, int) or samples < 0:
            raise ConfigError(f"sampler state: 'samples' must be a count, got {samples!r}")
        self.seed = int(state["seed"])
        self._position = samples
        self._cached_block = None

    # ------------------------------------------------------------------ draws

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cached = self._cached_block
        if cached is not None and cached[0] == b:
            return cached[1], cached[2], cached[3]
        seq = np.random.SeedSequence([self.seed, self.rank, b])
        rng = np.random.Generator(np.random.PCG64(seq))
        k = self.block
        subj = rng.integers(0, len(self.cohort), size=k)
        view = rng.integers(0, len(self.views), size=k)
        sl = rng.integers(0, self._depth[subj, view])
        self._cached_block = (b, subj, view, sl)
        return subj, view, sl

    def draw(self, g: int) -> tuple[int, int, int]:
        """(subject index, view index into ``self.views``, slice index) of sample ``g``."""
        subj, view, sl = self._block(g // self.block)
        o = g % self.block
        return int(subj[o]), int(view[o]), int(sl[o])

    def _array(self, i: int) -> np.ndarray:
        arr = self._open.get(i)
        if arr is None:
            arr = self.cohort.load(i, mmap=True)
            self._open[i] = arr
            if len(self._open) > self.max_open:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(i)
        return arr

    def sample(self, g: int) -> dict[str, Any]:
        """The training sample at position ``g`` of this rank's stream."""
        i, v, s = self.draw(g)
        arr = self._array(i)
        a, ph, pw = self._perm[v]
        depth = arr.shape[1 + a]
        r = self.n // 2
        lo, hi = max(s - r, 0), min(s + r + 1, depth)
        index: list[Any] = [slice(0, -1), slice(None), slice(None), slice(None)]
        index[1 + a] = slice(lo, hi)
        # (C-1, k, h, w) in view order: image channels only, the slices lo..hi-1
        block = arr[tuple(index)].transpose(0, 1 + a, 1 + ph, 1 + pw)
        h, w = block.shape[2:]
        H, W = self.size
        hb, wb = (H - h) // 2, (W - w) // 2
        out = np.full((block.shape[0], self.n, H, W), -1.0, dtype=np.float32)
        out[:, lo - (s - r) : hi - (s - r), hb : hb + h, wb : wb + w] = block
        valid = np.zeros((self.n, H, W), dtype=bool)
        valid[lo - (s - r) : hi - (s - r), hb : hb + h, wb : wb + w] = True
        weight = np.zeros((1, H, W), dtype=np.float32)
        if self.use_mask_weights:
            centre = [s if k == a else slice(None) for k in range(3)]
            m = arr[(-1, *centre)]
            m = m.T if ph > pw else m  # the centre slice's axes in (H, W) order
            weight[0, hb : hb + h, wb : wb + w] = m * (1.0 - self.w_out) + self.w_out
        else:
            weight[0, hb : hb + h, wb : wb + w] = 1.0
        return {
            "target": torch.from_numpy(out[0]),
            "cond": torch.from_numpy(out[1:].reshape(self.n_sources * self.n, H, W)),
            "weight": torch.from_numpy(weight),
            "valid": torch.from_numpy(valid),
            "view": int(self._view_index[v]),
            "subject": i,
            "index": g,
        }

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is None:
            return self.iterate()
        return self.iterate(info.id, info.num_workers)

    def iterate(self, worker: int = 0, num_workers: int = 1) -> Iterator[dict[str, Any]]:
        """The samples of one worker (of ``num_workers``) from the current position on.

        With a single worker the stream is consumed in order and :attr:`position` advances.
        """
        if not 0 <= worker < num_workers:
            raise ConfigError(f"worker {worker} is not in 0..{num_workers - 1}")
        start, bs = self._position, self.batch_size
        track = num_workers == 1
        chunk = worker
        while True:
            for k in range(bs):
                g = start + chunk * bs + k
                if self.num_samples is not None and g >= self.num_samples:
                    return
                item = self.sample(g)
                if track:
                    self._position = g + 1
                yield item
            chunk += num_workers
