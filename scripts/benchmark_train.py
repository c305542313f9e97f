"""Benchmark LoRA training steps on the small MAGNeT architecture with random weights (no download), beside one
exact decoding step of the same window, timed back to back.

    python scripts/benchmark_train.py                    # small, 10 s crops (500 frames), batch 1, rank 16, fp32 CPU
    python scripts/benchmark_train.py --seconds 5 --steps 2

Each measurement runs in its own process, so its peak RSS is its own (weights included):

- train: seconds per training step (forward with the stage's attention, cross entropy on the masked positions,
  backward into the LoRA factors, gradient clipping, AdamW), one step per stage (0..3) after one warm-up step,
  with and without gradient checkpointing; and the bytes autograd keeps for the backward (no checkpointing);
- decode: one exact decoding step of the same window (the decoding loop's step: conditional and null rows for
  guidance), median over 2 steps per stage, every position computed (no pruning), and the peak RSS of that
  generation.

Then the arithmetic for a 12 GB GPU (bf16 autocast, float16 weights): weights + LoRA parameters, their gradients
and AdamW moments (float32) + the kept activations at half the float32 bytes.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from magnet.random_models import random_lm, release_arch

HERE = Path(__file__).resolve()
SMALL = release_arch("small")


def build(seconds: float):
    return random_lm("small", seconds=seconds, float16_values=False)


def run_train(a) -> dict:
    from magnet import lora
    from magnet.train import _checkpointed, masked_loss, span_starts_table, spans_mask, text_memory
    lm = build(a.seconds)
    T = int(a.seconds * 50)
    train_lm, adapters = lora.attach(lm, lora.DEFAULT_TARGETS, a.rank, float(a.rank),
                                     generator=torch.Generator().manual_seed(0))
    train_lm.train()
    if a.checkpointing:
        for layer in train_lm.transformer.layers:
            _checkpointed(layer)
    params = [p for m in adapters.values() for p in (m.lora_A, m.lora_B)]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, SMALL["card"], (1, SMALL["n_q"], T), generator=g)
    hidden, tmask = torch.randn(1, 12, SMALL["text_dim"], generator=g), torch.ones(1, 12, dtype=torch.long)
    table = span_starts_table(T, 3)
    saved, seen = [0], set()

    def step(stage, count=False):
        one_step(stage, count)

    def one_step(stage, count):
        mask = spans_mask(torch.tensor([0.5]), T, 3, table, g)
        if count:
            weights = {q.data_ptr() for q in train_lm.parameters()}

            def pack(t):        # what the backward keeps beyond the weights themselves (each storage once)
                ptr = t.untyped_storage().data_ptr()
                if ptr not in weights and ptr not in seen:
                    seen.add(ptr)
                    saved[0] += t.untyped_storage().nbytes()
                return t
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = masked_loss(train_lm, codes, text_memory(train_lm, hidden, tmask), stage, mask)
        else:
            loss = masked_loss(train_lm, codes, text_memory(train_lm, hidden, tmask), stage, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0, count=not a.checkpointing)           # warm-up (and the saved-bytes count)
    times = []
    for i in range(a.steps):
        t0 = time.perf_counter()
        step(i % 4)
        times.append(time.perf_counter() - t0)
    return dict(step_s=sum(times) / len(times), steps=times, saved_mb=saved[0] / 2 ** 20,
                lora_params=sum(p.numel() for p in params), base_params=sum(p.numel() for p in lm.parameters()),
                peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, threads=torch.get_num_threads())


def run_decode(a) -> dict:
    from magnet.sampling import SamplingParams, StepCounter, generate, make_generator
    from magnet.stage_forward import DecodingSettings
    from magnet.text import TextCondition
    lm = build(a.seconds)
    T = int(a.seconds * 50)
    hidden = torch.randn(2, 12, SMALL["text_dim"])
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1:] = 0
    cond = TextCondition(["x"], hidden, mask, torch.zeros(2, 12, dtype=torch.long), "random")
    steps = [2, 2, 2, 2]
    stamps = []
    job = StepCounter(total=sum(steps), progress=lambda d, t: stamps.append(time.perf_counter()))
    gen, _ = make_generator(0, "cpu")
    t0 = time.perf_counter()
    generate(lm, cond, T, SamplingParams(decoding_steps=steps), generator=gen, job=job,
             decoding=DecodingSettings(prune_on_cpu=False))
    times = [b - a_ for a_, b in zip([t0] + stamps[:-1], stamps)]
    return dict(step_s=sorted(times)[len(times) // 2], steps=times,
                peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def child(mode: str, a) -> dict:
    cmd = [sys.executable, str(HERE), "--child", mode, "--seconds", str(a.seconds), "--steps", str(a.steps),
           "--rank", str(a.rank), "--threads", str(a.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=4, help="timed training steps (after one warm-up)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own); 1 is steadier on a "
                                                          "machine shared with other work")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.child:
        a.checkpointing = a.child == "ckpt"
        print(json.dumps(run_decode(a) if a.child == "decode" else run_train(a)))
        return
    dec = child("decode", a)
    plain = child("train", a)
    ckpt = child("ckpt", a)
    dec2 = child("decode", a)          # again after: the machine's speed drifts
    dstep = (dec["step_s"] + dec2["step_s"]) / 2
    T = int(a.seconds * 50)
    print(f"small architecture (dim {SMALL['dim']}, {SMALL['num_heads']} heads, {SMALL['num_layers']} layers, "
          f"{SMALL['n_q']} x {SMALL['card']}), {a.seconds:g} s = {T} frames, batch 1, "
          f"rank {a.rank} on {', '.join(__import__('magnet.lora', fromlist=['x']).DEFAULT_TARGETS)}, float32 CPU, "
          f"{plain['threads']} threads")
    print(f"  exact decoding step (cond + null rows) : {dstep:6.2f} s   (runs: {dec['step_s']:.2f}, {dec2['step_s']:.2f})"
          f"   generation peak RSS {max(dec['peak_mb'], dec2['peak_mb']) / 1024:.2f} GiB")
    for name, r in (("training step", plain), ("training step, checkpointing", ckpt)):
        print(f"  {name:<38}: {r['step_s']:6.2f} s = {r['step_s'] / dstep:.2f} x decoding step   "
              f"peak RSS {r['peak_mb'] / 1024:.2f} GiB ({(r['peak_mb'] - max(dec['peak_mb'], dec2['peak_mb'])) / 1024:+.2f} "
              f"vs generation)")
    base, lp, saved = plain["base_params"], plain["lora_params"], plain["saved_mb"]
    w16 = base * 2 / 2 ** 30
    opt = lp * 16 / 2 ** 30             # fp32 parameter + gradient + two AdamW moments
    act = saved / 2 / 1024              # bf16 activations: half the float32 bytes autograd keeps
    print(f"  autograd keeps {saved / 1024:.2f} GiB for the backward (float32, no checkpointing); LoRA parameters "
          f"{lp / 1e6:.1f} M, base {base / 1e6:.0f} M")
    print(f"12 GB GPU (bf16 autocast, float16 base weights): weights {base / 1e6:.0f} M x 2 B = {w16:.2f} GiB; "
          f"LoRA {lp / 1e6:.1f} M x 16 B (param, grad, 2 moments) = {opt:.2f} GiB; activations {saved / 1024:.2f} / 2 = "
          f"{act:.2f} GiB per 10 s example -> batch 1 needs ~{w16 + opt + act:.2f} GiB; "
          f"batch {int((11.0 - w16 - opt) // act) if act > 0 else 0} fits in ~11 GiB usable without checkpointing "
          f"(more with it).")


if __name__ == "__main__":
    main()
