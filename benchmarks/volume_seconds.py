"""Seconds per volume, end to end, under each translation speed option (one run).

Writes a synthetic N^3 head (uncompressed NIfTI) and a random-weight model whose card records
a training canvas covering the head's brain region (as a model trained on such heads has, so
every view's slices have one size), then times ``Translator.translate`` + ``save`` of a
regression (3 views) under each option: the first call (compiling, when compiled) and the best
of ``--repeats`` warm calls, split into preparation (read, mask, normalize), sampling, and
output (conversion, write). ``--diffusion`` also times one truncated diffusion (251 NFE) with
the last option. ``--cohort N`` times cohort translation (``translate_cohort``) of N subjects
(copies of the head) with the last option, sequential and overlapped (the next subject is
prepared and the previous one written while one samples), alternating, best of ``--repeats``.

    python benchmarks/volume_seconds.py [--device cuda] [--preset small] [--size 256]
        [--options fp16,fp16+compile,...] [--repeats 3] [--diffusion] [--cohort N]
        [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from yoda.batch import translate_cohort
from yoda.bench import _SOURCES, _write_model, _write_subject
from yoda.data.manifest import Manifest, Subject
from yoda.translate import Translator, prepare_sources

#: name -> Translator options
OPTIONS = {
    "fp32": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
    "fp16": {"precision": "fp16"},
    "fp16+b64": {"precision": "fp16", "batch_size": 64},
    "fp16+cl": {"precision": "fp16", "channels_last": True},
    "bf16+compile": {"precision": "bf16", "compile": "default"},
    "fp16+compile": {"precision": "fp16", "compile": "default"},
    "fp16+compile-graphs": {"precision": "fp16", "compile": "reduce-overhead"},
}


def _canvas(sources: dict[str, str], multiple: int) -> tuple[int, int]:
    """The square canvas a sampler trained on this head would use (its largest ROI side)."""
    prep = prepare_sources(sources, list(_SOURCES), normalization={"method": "tissue"})
    side = max(prep.data.shape[1:])
    side = -(-side // multiple) * multiple
    return side, side


def _time(tr: Translator, sources: dict[str, str], out: Path, mode: str) -> tuple[dict, np.ndarray]:
    start = time.perf_counter()
    res = tr.translate(sources, mode=mode)
    before_save = time.perf_counter()
    res.save(out, overwrite=True)
    total = time.perf_counter() - start
    info = res.info
    row = {
        "seconds": total,
        "prepare_s": info["prepare_seconds"],
        "sampling_s": info["sampling_seconds"],
        "output_s": total - info["prepare_seconds"] - info["sampling_seconds"],
        "save_s": time.perf_counter() - before_save,
        "nfe": info["nfe"],
    }
    return row, res.image


def _time_cohort(tr: Translator, sources: dict[str, str], work: Path, n: int, repeats: int) -> dict:
    """Best seconds per subject of a cohort of ``n`` copies of the head, sequential and
    overlapped (alternating runs)."""
    subjects = [
        Subject(id=f"s{i}", split="test", images={k: Path(v) for k, v in sources.items()})
        for i in range(n)
    ]
    manifest = Manifest(subjects, work)
    times: dict[str, list[float]] = {"sequential": [], "overlapped": []}
    for _ in range(repeats):
        for name in times:
            start = time.perf_counter()
            result = translate_cohort(
                tr, manifest, split=None, out_dir=work / "cohort", options={"mode": "regression"},
                force=True, progress=False, overlap=name == "overlapped",
            )  # fmt: skip
            times[name].append((time.perf_counter() - start) / n)
            if result.failed:
                raise SystemExit(f"error: cohort translation failed: {result.failed}")
    row = {f"{k}_s_per_subject": round(min(v), 3) for k, v in times.items()}
    row["speedup"] = round(min(times["sequential"]) / min(times["overlapped"]), 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--options", default="fp16,fp16+compile", help="comma-separated")
    parser.add_argument("--diffusion", action="store_true", help="also time one diffusion")
    parser.add_argument("--cohort", type=int, default=0, help="also time a cohort of N subjects")
    parser.add_argument("--multiple", type=int, default=16, help="canvas multiple")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run)")
    args = parser.parse_args()
    names = args.options.split(",")
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        raise SystemExit(f"error: unknown option(s) {unknown}; choose from {list(OPTIONS)}")
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device")
    if dev.type == "cpu" and any(OPTIONS[n]["precision"] == "fp16" for n in names):
        raise SystemExit("error: fp16 needs CUDA; on the CPU try --options fp32,bf16")
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="yoda-volume-") as tmp:
        work = Path(tmp)
        paths = _write_subject(work / "head", args.size, seed=2, suffix=".nii")
        sources = {k: str(paths[k]) for k in _SOURCES}
        canvas = _canvas(sources, args.multiple)
        training = {"note": "random weights", "slab_size": list(canvas)}
        model = _write_model(work / "model", args.preset, training)
        out = work / "out.nii"
        reference = None
        tr = None
        for name in names:
            if "compile" in OPTIONS[name]:
                torch._dynamo.reset()  # compiled code of another autocast dtype is reused
            tr = Translator.load(model, device=dev, **OPTIONS[name])
            first, image = _time(tr, sources, out, "regression")
            warm = [_time(tr, sources, out, "regression")[0] for _ in range(args.repeats)]
            best = min(warm, key=lambda r: r["seconds"])
            if reference is None:
                reference = image
            rows[name] = {
                "first_s": round(first["seconds"], 3),
                **{k: round(v, 3) for k, v in best.items()},
                "median_s": round(float(np.median([r["seconds"] for r in warm])), 3),
                "max_abs_diff_vs_first_option": float(np.abs(image - reference).max()),
            }
            print(f"{name:22s} {json.dumps(rows[name])}", flush=True)
        diffusion = None
        if args.diffusion and tr is not None:
            timed, _ = _time(tr, sources, out, "diffusion")
            diffusion = {k: round(v, 3) for k, v in timed.items()}
            diffusion["option"] = names[-1]
            print(f"diffusion ({names[-1]}) {json.dumps(diffusion)}", flush=True)
        cohort = None
        if args.cohort > 0 and tr is not None:
            cohort = _time_cohort(tr, sources, work, args.cohort, args.repeats)
            cohort.update(option=names[-1], subjects=args.cohort)
            print(f"cohort ({names[-1]}) {json.dumps(cohort)}", flush=True)
    result = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "grid": [args.size] * 3,
        "canvas": list(canvas),
        "regression": rows,
        "diffusion": diffusion,
        "cohort": cohort,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
