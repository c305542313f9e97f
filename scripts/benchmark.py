"""Benchmark MAGNeT decoding on real-size architectures with random weights (no download).

    python scripts/benchmark.py                       # small, 10 s, batch 1 and 4, steps 20,10,10,10
    python scripts/benchmark.py --scale small medium --batch 1 --measure-steps 2,1,1,1

Prints, per configuration: seconds per decoding step (per stage), total seconds, real-time factor
(seconds of compute per second of audio) and peak memory (process RSS on CPU, allocated on CUDA), plus
the fp32 matmul throughput this machine sustains. Each configuration runs in its own process so peak
memory is its own. `--measure-steps` runs fewer steps per stage and extrapolates the total to `--steps`
(every step of a stage has the same shapes, so its cost is constant).

The text memory is a random T5-width tensor (12 tokens), the codes are decoded exactly as in
generation; the codec and T5 are not timed (they run once per generation, not per step).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

SCALES = {"small": dict(dim=1024, num_heads=16, num_layers=24), "medium": dict(dim=1536, num_heads=24, num_layers=48)}


def matmul_gflops(seconds: float = 2.0, n: int = 1024) -> float:
    a, b = torch.randn(n * 2, n * 4), torch.randn(n * 4, n)
    a @ b
    flops, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
    return flops / (time.perf_counter() - t0) / 1e9


def build(scale: str, device, dtype, seconds: float):
    from magnet.transformer import LM, LMConfig, init_random
    s = SCALES[scale]
    cfg = LMConfig(kind="magnet", ffn_dim=4 * s["dim"], n_q=4, card=2048, text_dim=768, segment_duration=seconds,
                   **s)
    with torch.device("meta"):
        lm = LM(cfg)
    lm = lm.to_empty(device="cpu")
    init_random(lm)
    return lm.to(device=device, dtype=dtype).eval().requires_grad_(False)


def run_one(a) -> dict:
    from magnet.sampling import SamplingParams, _Job, generate, make_generator
    from magnet.text import TextCondition
    dev = torch.device(a.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    lm = build(a.scale, dev, dtype, a.seconds)
    B, L = a.batch, 12
    hidden = torch.randn(2 * B, L, 768)
    mask = torch.ones(2 * B, L, dtype=torch.long)
    mask[B:] = 0
    cond = TextCondition(["x"] * B, hidden, mask, torch.zeros(2 * B, L, dtype=torch.long), "random")
    frames = int(a.seconds * 50)
    steps = [int(x) for x in (a.measure_steps or a.steps).split(",")]
    full = [int(x) for x in a.steps.split(",")]
    stamps = []
    job = _Job(total=sum(steps), progress=lambda d, t: stamps.append(time.perf_counter()))
    params = SamplingParams(decoding_steps=steps)
    gen, _ = make_generator(0, dev)
    ac = torch.autocast(dev.type, dtype=dtype) if dev.type == "cuda" and dtype != torch.float32 else \
        torch.autocast(dev.type, enabled=False)
    t0 = time.perf_counter()
    with ac:
        generate(lm, cond, frames, params, generator=gen, job=job)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    # per-stage step time: first step of a generation includes the text memory; use the stage medians
    times = [t1 - t0_ for t0_, t1 in zip([t0] + stamps[:-1], stamps)]
    per_stage, i = [], 0
    for n in steps:
        chunk = sorted(times[i:i + n])
        per_stage.append(chunk[len(chunk) // 2])
        i += n
    extrapolated = sum(p * n for p, n in zip(per_stage, full)) if a.measure_steps else total
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return dict(scale=a.scale, batch=B, seconds=a.seconds, steps=a.steps, measured_steps=sum(steps),
                per_step_s=[round(p, 3) for p in per_stage], mean_step_s=round(extrapolated / sum(full), 3),
                total_s=round(extrapolated, 1), rtf=round(extrapolated / a.seconds, 2), peak_mb=round(peak),
                device=str(dev), dtype=a.dtype, threads=torch.get_num_threads(),
                params_m=round(sum(p.numel() for p in lm.parameters()) / 1e6))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", nargs="+", default=["small"], choices=list(SCALES))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--steps", default="20,10,10,10")
    ap.add_argument("--measure-steps", default=None, help="run these steps per stage and extrapolate to --steps")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.single:
        a.scale, a.batch = a.scale[0], a.batch[0]
        print(json.dumps(run_one(a)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {a.device}")
    if a.device == "cpu":
        print(f"fp32 matmul throughput: {matmul_gflops():.0f} GFLOP/s")
    print(f"{'scale':7} {'batch':>5} {'s/step (per stage)':>28} {'mean s/step':>11} {'total s':>8} {'RTF':>6} {'peak MB':>8}")
    for scale in a.scale:
        for b in a.batch:
            cmd = [sys.executable, __file__, "--single", "--scale", scale, "--batch", str(b), "--seconds",
                   str(a.seconds), "--steps", a.steps, "--device", a.device, "--dtype", a.dtype]
            if a.measure_steps:
                cmd += ["--measure-steps", a.measure_steps]
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if out.returncode:
                print(out.stderr[-2000:])
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            per = ",".join(f"{p:.2f}" for p in r["per_step_s"])
            note = f"  (extrapolated from {r['measured_steps']} steps)" if a.measure_steps else ""
            print(f"{scale:7} {b:>5} {per:>28} {r['mean_step_s']:>11.2f} {r['total_s']:>8.1f} {r['rtf']:>6.2f} "
                  f"{r['peak_mb']:>8}{note}")


if __name__ == "__main__":
    main()
