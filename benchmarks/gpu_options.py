"""Which speed options pay off for regression of a whole volume on a GPU? (one run)

Times regression sampling (3 views, one network evaluation each) of an N^3 grid with a
random-weight network under each combination of precision, channels-last inputs, cuDNN
autotuning, TF32 and ``torch.compile``, each against the plain fp32 path in the same process,
and reports the largest output difference from fp32. Network only: no reading or writing.

    python benchmarks/gpu_options.py [--preset small] [--size 256] [--repeats 2] [--compile]
        [--only bf16,fp16+compile,...] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from yoda.bench import random_network
from yoda.diffusion import sampling
from yoda.diffusion.schedule import make_schedule
from yoda.model.denoiser import VolumeDenoiser, compile_network

#: name -> (autocast dtype, channels_last, cudnn.benchmark, TF32, compiled)
OPTIONS = {
    "fp32": (None, False, False, False, False),
    "fp32+tf32": (None, False, False, True, False),
    "bf16": ("bf16", False, False, False, False),
    "bf16+cl": ("bf16", True, False, False, False),
    "bf16+cl+cudnn-benchmark": ("bf16", True, True, False, False),
    "fp16": ("fp16", False, False, False, False),
    "fp16+cl": ("fp16", True, False, False, False),
    "bf16+compile": ("bf16", False, False, False, True),
    "fp16+compile": ("fp16", False, False, False, True),
    "bf16+cl+compile": ("bf16", True, False, False, True),
}


@contextlib.contextmanager
def _backends(benchmark: bool, tf32: bool):
    before = (
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
    )
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        (
            torch.backends.cudnn.benchmark,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32,
        ) = before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--only", help="comma-separated options to time (fp32 always runs)")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run)")
    args = parser.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device")

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    net = random_network(args.preset).to(dev)
    compiled = compile_network(net, "default") if args.compile else None
    sched = make_schedule("linear", 1000)
    shape = (args.size,) * 3
    cond = torch.randn((2, *shape), device=dev)
    reference = None
    rows = {}
    only = None if args.only is None else {"fp32", *args.only.split(",")}
    for name, (amp, cl, bench, tf32, comp) in OPTIONS.items():
        if (comp and compiled is None) or (amp == "fp16" and dev.type != "cuda"):
            continue
        if only is not None and name not in only:
            continue
        if comp:
            # compiled code ran under another autocast dtype is otherwise reused as it is
            torch._dynamo.reset()
        den = VolumeDenoiser(
            compiled if comp else net, sched, "v", cond, batch_size=args.batch_size,
            autocast_dtype=amp, channels_last=cl, device=dev,
        )  # fmt: skip
        times = []
        with _backends(bench, tf32):
            for _ in range(args.repeats + 1):  # the first run warms up (and compiles)
                gen = torch.Generator(device=dev).manual_seed(0)
                sync()
                start = time.perf_counter()
                out = sampling.regression(den, shape, sched, generator=gen, device=dev).image
                sync()
                times.append(time.perf_counter() - start)
        if reference is None:
            reference = out
        rows[name] = {
            "first_s": round(times[0], 3),
            "seconds": round(min(times[1:]), 3),
            "speedup_vs_fp32": round(rows["fp32"]["seconds"] / min(times[1:]), 2) if rows else 1.0,
            "max_abs_diff_vs_fp32": float((out - reference).abs().max()),
        }
        print(f"{name:26s} {json.dumps(rows[name])}", flush=True)
    result = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "grid": list(shape),
        "batch_size": args.batch_size,
        "options": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
