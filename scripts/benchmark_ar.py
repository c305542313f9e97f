"""Latency of the autoregressive side next to plain MAGNeT, on real-size LMs with random weights.

    python scripts/benchmark_ar.py [--scale small|medium] [--seconds 10] [--steps 2,1,1,1]
                                   [--ar-seconds 1,2,3] [--threads auto] [--device cpu] [--only nar,ar]

Modes (batch 1, classifier-free guidance on, as in real use):
  nar        pure MAGNeT (the decoding steps given by --steps)
  hybrid-Ns  MusicGen writes the first N seconds (+ max delay, dropped), MAGNeT the rest
  ar         pure MusicGen (KV cache, seconds * 50 + 3 steps)
  rescored   MAGNeT with the MusicGen rescorer (one teacher-forced MusicGen pass per step, w = 0.5)

Both LMs are built from an LMConfig (the release architecture; no weights needed) and filled by
`magnet.random_models`; the text memory is a random T5-like hidden state, so this times the
LMs and the decoding loops only (T5 and the codec are the same for every mode). The default --steps is
small so that the whole run stays around 10-15 minutes on a 2-core CPU; every MAGNeT step costs the
same, so the table also gives the wall time extrapolated to the releases' 20,10,10,10 steps.
Peak memory: the process's peak resident set during each mode (Linux VmHWM, reset before each mode;
both models' weights included), or CUDA's peak allocated memory on a GPU.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from types import SimpleNamespace

import torch

from magnet import sampling
from magnet.devices import autocast_for
from magnet.musicgen import ARParams, MusicGenModel, MusicGenRescorer, ar_decode
from magnet.random_models import RELEASE_SCALES, TEXT_DIMS, random_lm
from magnet.sampling import SamplingParams
from magnet.text import TextCondition
from magnet.transformer import LM

SCALES = {"tiny": dict(dim=64, num_heads=4, num_layers=2),     # a smoke test of the script itself
          **RELEASE_SCALES}
RELEASE_STEPS = (20, 10, 10, 10)
FRAME_RATE = 50


def build(kind: str, scale: str, seconds: float, device, dtype, seed: int) -> LM:
    window = max(10.0, seconds) if kind == "magnet" else max(30.0, seconds)
    return random_lm(SCALES[scale], kind=kind, seconds=window, device=device, dtype=dtype, seed=seed,
                     float16_values=False)


def text_condition(device) -> TextCondition:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 12, TEXT_DIMS["music"], generator=g) * 0.1
    mask = torch.zeros(2, 12, dtype=torch.long)
    mask[0] = 1
    return TextCondition(["benchmark"], hidden.to(device), mask.to(device), torch.zeros(2, 12, dtype=torch.long),
                         "t5-base")


class PeakMemory:
    """Peak memory over a block: CUDA peak allocated, or the process's VmHWM (reset on entry)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.mb = float("nan")

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.mb = torch.cuda.max_memory_allocated() / 2 ** 20
        else:
            try:
                with open("/proc/self/status") as f:
                    self.mb = int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024
            except (OSError, AttributeError):
                import resource
                self.mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", default="small", choices=sorted(SCALES))
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--steps", default="2,1,1,1", help="MAGNeT decoding steps per codebook (default 2,1,1,1; "
                                                    "the releases use 20,10,10,10: see the extrapolated column)")
    ap.add_argument("--ar-seconds", default="1,2,3", help="AR prompt lengths for the hybrid rows")
    ap.add_argument("--only", default="", help="comma-separated subset of: nar, hybrid, ar, rescored")
    ap.add_argument("--threads", default="auto", help="torch CPU threads; auto = all cores, or 1 when the machine "
                                                      "is already busy (oversubscribed threads make small AR steps "
                                                      "~10x slower)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    a = ap.parse_args(argv)

    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = (1 if load >= cores - 0.5 else cores) if a.threads == "auto" else int(a.threads)
    torch.set_num_threads(threads)
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    steps = tuple(sampling.parse_steps(a.steps))
    frames = int(a.seconds * FRAME_RATE)
    ar_list = [float(s) for s in a.ar_seconds.split(",") if s.strip()]
    only = {s.strip() for s in a.only.split(",") if s.strip()} or {"nar", "hybrid", "ar", "rescored"}
    autocast = autocast_for(dev, dtype)

    t0 = time.perf_counter()
    magnet = build("magnet", a.scale, a.seconds, dev, dtype, seed=0)
    musicgen = build("musicgen", a.scale, a.seconds, dev, dtype, seed=1)
    print(f"# {a.scale}: MAGNeT {sum(p.numel() for p in magnet.parameters()) / 1e6:.0f}M + MusicGen {sum(p.numel() for p in musicgen.parameters()) / 1e6:.0f}M "
          f"params (random), {a.dtype} on {dev}, {threads} thread(s) of {cores} cores, load average {load:.1f}, "
          f"batch 1, {a.seconds:g} s = {frames} frames, MAGNeT steps {','.join(map(str, steps))}; "
          f"models built in {time.perf_counter() - t0:.0f} s", flush=True)
    cond = text_condition(dev)
    params = SamplingParams(decoding_steps=steps)
    ar_params = ARParams()
    mg_model = MusicGenModel(musicgen, SimpleNamespace(frame_rate=FRAME_RATE, sample_rate=32000, channels=1),
                             source="random musicgen")
    D = max(musicgen.cfg.delays)

    def nar(prompt=None, rescorer=None):
        g, _ = sampling.make_generator(0, dev)
        return sampling.generate(magnet, cond, frames, params, prompt=prompt, generator=g, rescorer=rescorer)

    def ar(n):
        g, _ = sampling.make_generator(0, dev)
        with torch.inference_mode():
            return ar_decode(musicgen, cond, n, ar_params, generator=g)

    # a short warm-up of both paths (allocator, kernels), not timed
    with autocast:
        ar(4)
        sampling.generate(magnet, cond, 30, SamplingParams(decoding_steps=(1, 1, 1, 1)))

    modes = []
    if "nar" in only:
        modes.append(("nar", 0, False))
    if "hybrid" in only:
        modes += [(f"hybrid-{s:g}s", int(s * FRAME_RATE), False) for s in ar_list
                  if 0 < int(s * FRAME_RATE) < frames]
    if "ar" in only:
        modes.append(("ar", frames, False))
    if "rescored" in only:
        modes.append(("rescored", 0, True))

    rows = []
    for name, ar_frames, rescored in modes:
        nar_s = ar_s = 0.0
        with PeakMemory(dev) as mem, autocast:
            if name == "ar":
                sync(dev)
                t = time.perf_counter()
                ar(frames)
                sync(dev)
                ar_s = time.perf_counter() - t
                n_ar, n_nar = frames + D, 0
            else:
                prompt, n_ar = None, 0
                if ar_frames:
                    sync(dev)
                    t = time.perf_counter()
                    n_gen = min(ar_frames + D, frames)
                    prompt = ar(n_gen)[..., :ar_frames]
                    sync(dev)
                    ar_s = time.perf_counter() - t
                    n_ar = n_gen + D
                rescorer = MusicGenRescorer(mg_model, weight=0.5) if rescored else None
                sync(dev)
                t = time.perf_counter()
                nar(prompt, rescorer)
                sync(dev)
                nar_s = time.perf_counter() - t
                n_nar = sum(steps)
        total = ar_s + nar_s
        per_step = nar_s / n_nar if n_nar else float("nan")
        per_frame = ar_s / n_ar if n_ar else float("nan")
        at_release = ar_s + (per_step * sum(RELEASE_STEPS) if n_nar else 0.0)
        rows.append((name, n_ar, n_nar, total, per_step, per_frame, total / a.seconds, at_release,
                     at_release / a.seconds, mem.mb))
        print(f"  {name}: {total:.1f} s", file=sys.stderr, flush=True)

    head = ("mode", "AR steps", "NAR steps", "wall s", "s/NAR step", "s/AR step", "RTF",
            "wall s @20,10,10,10", "RTF @20,10,10,10", "peak MB")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        name, n_ar, n_nar, total, ps, pf, rtf, rel, rrtf, mb = r
        f = lambda x: "-" if x != x else f"{x:.3g}"  # noqa: E731  (NaN -> '-')
        print(f"| {name} | {n_ar or '-'} | {n_nar or '-'} | {total:.1f} | {f(ps)} | {f(pf)} | {rtf:.2f} | "
              f"{rel:.0f} | {rrtf:.1f} | {mb:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
