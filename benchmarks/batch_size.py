"""Fixed batch sizes against the automatic one, interleaved in one run.

For each batch size (``auto`` is the default of translation, by slice size and device), the
figures of ``yoda bench`` that depend on it, measured on the bench's 64^3 volume: the
regression's network time and ``network_efficiency``, ``translate_overhead``, and one
diffusion trajectory against a batched ExpA (N_Ex = 4) per NFE, with ``expa_batching``.
``--volume N`` instead times translate (regression, 3 views) of a synthetic N^3 head.
Rounds alternate the order of the batch sizes; every round is printed.

    python benchmarks/batch_size.py [--device cuda] [--preset small] [--batch-sizes 32,auto]
        [--rounds 2] [--volume N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from yoda.bench import _SOURCES, _Bench, _write_model, _write_subject
from yoda.translate import Translator

_FIGURES = ("network_efficiency", "translate_overhead", "expa_batching")
_ABSOLUTE = ("regression_network_s", "translate_s", "per_nfe_diffusion_s", "per_nfe_expa_s")


def _bench_rounds(device: torch.device, preset: str, sizes: dict, rounds: int, work: Path):
    benches = {}
    for name, batch in sizes.items():
        b = _Bench(device, preset, "default", "auto", batch, False, work / name)
        b.work.mkdir()
        b.setup()
        benches[name] = b
    for r in range(rounds):
        for name in list(benches) if r % 2 == 0 else list(benches)[::-1]:
            b = benches[name]
            b.efficiency(2)
            b.translate(2)
            b.expa(2)
            row = {k: b.figures[k] for k in _FIGURES} | {k: b.absolute[k] for k in _ABSOLUTE}
            yield name, {k: round(float(v), 4) for k, v in row.items()}


def _volume_rounds(device: torch.device, preset: str, sizes: dict, rounds: int, work: Path, n: int):
    model = _write_model(work / "model", preset)
    head = _write_subject(work / "head", n, seed=2, suffix=".nii")
    sources = {k: str(head[k]) for k in _SOURCES}
    trs = {name: Translator.load(model, device=device, batch_size=b) for name, b in sizes.items()}
    for tr in trs.values():  # a first call per size (CUDA start-up, kernel choice)
        if device.type == "cuda":
            tr.translate(sources, mode="regression")
    for r in range(rounds):
        for name in list(trs) if r % 2 == 0 else list(trs)[::-1]:
            start = time.perf_counter()
            res = trs[name].translate(sources, mode="regression")
            seconds = time.perf_counter() - start
            sampling = res.info["sampling_seconds"]
            yield name, {"seconds": round(seconds, 2), "sampling_s": round(sampling, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-sizes", default="32,auto", help="comma-separated; auto: default")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--volume", type=int, default=0, help="time translate of an N^3 head")
    parser.add_argument("--json", help="write the rounds to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = {s: None if s == "auto" else int(s) for s in args.batch_sizes.split(",")}
    results: dict[str, list] = {name: [] for name in sizes}
    with tempfile.TemporaryDirectory(prefix="yoda-batch-") as tmp:
        if args.volume:
            rounds = _volume_rounds(device, args.preset, sizes, args.rounds, Path(tmp), args.volume)
        else:
            rounds = _bench_rounds(device, args.preset, sizes, args.rounds, Path(tmp))
        for name, row in rounds:
            results[name].append(row)
            print(f"batch {name:>5} {json.dumps(row)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
