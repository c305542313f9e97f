"""What previews cost during LoRA training, on the small MAGNeT architecture with random weights (no download).

    python scripts/benchmark_previews.py                 # default settings: 500 steps, previews at the end
    python scripts/benchmark_previews.py --train-steps 2 --save-every 100

Times, back to back in one process: training steps as `train_lora` runs them (10 s crops, batch 1, rank 16 on
the default targets, float32 on the CPU), and one preview render as `train_lora` runs it (the default prompts:
the trigger word and two captions, so 3 clips of the default preview length, through the exact decoding loop
with the release's steps 20,10,10,10, on the LM with its adapters attached). Prints seconds per training step,
seconds per preview render, and the previews' share of a whole run at the given settings:
renders x render time / (steps x step time + renders x render time). The codec's decoding of the previews
(under a second for 15 s of audio) is not included.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch

from magnet.random_models import random_lm, release_arch


def cpu_flags() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    flags = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), [])
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    return f"{model}; {' '.join(f for f in wanted if f in flags) or 'no avx2'}"


def main() -> None:
    from magnet import lora, sampling
    from magnet.objective import masked_loss, masking_rates, span_starts_table, spans_mask, text_memory
    from magnet.previews import render_previews  # noqa: F401  (the path timed below, spelled out)
    from magnet.text import TextCondition
    from magnet.train import PREVIEW_SECONDS, TrainSettings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = TrainSettings()
    ap.add_argument("--steps", type=int, default=d.steps, help=f"training steps of the run (default {d.steps})")
    ap.add_argument("--save-every", type=int, default=d.save_every, help="periodic saves (default: none)")
    ap.add_argument("--train-steps", type=int, default=3, help="training steps timed (default 3)")
    ap.add_argument("--prompts", type=int, default=3, help="preview clips per render (default 3)")
    ap.add_argument("--seconds", type=float, default=PREVIEW_SECONDS, help="preview length")
    a = ap.parse_args()

    arch = release_arch("small")
    lm = random_lm("small", seconds=10, float16_values=False)
    T = 500
    train_lm, adapters = lora.attach(lm, d.targets or lora.DEFAULT_TARGETS, d.rank, float(d.rank),
                                     generator=torch.Generator().manual_seed(0))
    train_lm.train()
    params = [p for m in adapters.values() for p in (m.lora_A, m.lora_B)]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    table = span_starts_table(T, 3)
    hidden, tmask = torch.randn(1, 12, arch["text_dim"], generator=g), torch.ones(1, 12, dtype=torch.long)
    times = []
    for i in range(a.train_steps + 1):                     # the first one warms up
        codes = torch.randint(0, arch["card"], (1, arch["n_q"], T), generator=g)
        mask = spans_mask(masking_rates(1, g), T, 3, table, g)
        t0 = time.perf_counter()
        mem = text_memory(train_lm, hidden, tmask)
        loss = masked_loss(train_lm, codes, mem, i % arch["n_q"], mask, reduction="sum") / max(1, int(mask.sum()))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    print(f"CPU: {cpu_flags()}; {torch.get_num_threads()} threads; small architecture, random weights, float32")
    print(f"training step (10 s crop, batch 1, rank {d.rank}): {step:.2f} s (median of {len(times)})", flush=True)

    B, L = a.prompts, 12
    hidden = torch.randn(2 * B, L, arch["text_dim"], generator=g)
    mask = torch.ones(2 * B, L, dtype=torch.long)
    mask[B:] = 0
    cond = TextCondition(["x"] * B, hidden, mask, torch.zeros(2 * B, L, dtype=torch.long), "random")
    params_ = sampling.SamplingParams(decoding_steps=(20, 10, 10, 10)).check(arch["n_q"], {})
    train_lm.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        sampling.generate(train_lm, cond, int(a.seconds * 50), params_, generator=torch.Generator().manual_seed(1))
    render = time.perf_counter() - t0

    renders = 1 + (len(range(a.save_every, a.steps, a.save_every)) if a.save_every else 0)
    share = renders * render / (a.steps * step + renders * render)
    print(f"preview render ({B} clips of {a.seconds:g} s, steps 20,10,10,10, exact): {render:.1f} s")
    print(f"a run of {a.steps} steps with {renders} render(s): previews {share * 100:.1f}% of the time")


if __name__ == "__main__":
    main()
