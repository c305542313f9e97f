"""Benchmark MAGNeT decoding on real-size architectures with random weights (no download), ours in
exact and fast mode beside the reference implementation (audiocraft) when its venv is given.

    python scripts/benchmark.py                                  # small, 10 s, batch 1, exact + fast + reference
    python scripts/benchmark.py --impl exact fast --batch 1 4
    python scripts/benchmark.py --measure-steps 2,2,2,2          # shorter: fewer steps, extrapolated
    python scripts/benchmark.py --ref-python REF_VENV/bin/python \\
        --ref-config AUDIOCRAFT_SDIST/config                     # where the reference lives

The reference column needs a venv with audiocraft 1.3.0 (`--ref-python`, or $MAGNET_REF_PYTHON) and the
config/ folder of its sdist (`--ref-config`, or $AUDIOCRAFT_CONFIG_DIR); without them it is skipped, with a
note saying so.

Prints one table: per implementation, seconds per decoding step (median per stage), total seconds,
real-time factor (seconds of compute per second of audio), peak memory (the process's peak RSS on
the CPU, peak allocated on CUDA) and the useful matmul rate, plus the fp32 matmul throughput this
machine sustains (torch.mm, and oneDNN's inner product, which our exact mode uses on x86 CPUs).

- Each configuration runs in its own process, so its peak memory is its own (weights included).
- GFLOP/s = the matmul work of a *dense* step (self-attention and feed-forward of the conditional and
  null rows, cross-attention of the conditional rows, attention within the band for codebooks >= 1,
  the stage's head), summed over the steps, divided by the wall time. The same count is used for the
  reference, so the column compares useful work per second. Ours skips part of that work (positions
  that cannot reach the sampled logits), so its rate can exceed the machine's matmul throughput.
- --measure-steps runs fewer steps per stage and extrapolates to --steps from the per-stage medians.
  Ours then computes every position at every step (no pruning: otherwise steps differ in cost), so
  its extrapolated times are an upper bound; the reference's steps all have the same shapes.
- Fast mode: the low-precision copy of the LM (bf16 or int8: the path fast mode chooses on this CPU,
  shown in the header and the `linears` column; MAGNET_FAST_LINEARS forces one) is made before timing (a
  one-time cost per loaded model, printed below the table). The random weights are float16 values, as the
  releases are published, so the copy's float32 originals are held in float16 meanwhile, as with a release.
- The header prints the CPU's features (AMX, avx512_bf16, VNNI, AVX2), so figures from different machines
  can be read.

The text memory is a random T5-width tensor (12 tokens); the codec and T5 are not timed (they run once
per generation, not per step).

Loading (a separate table):

    python scripts/benchmark.py --load RELEASE_DIR [--converted FILE.safetensors]
    python scripts/benchmark.py --make-release /tmp/magnet-small-random    # a real-size random release

times, each in a fresh process after the imports, reading the official `.bin` pair and the converted
`.safetensors` (made float32 with `python -m magnet convert` when not given) up to a model on the CPU in
float32 with every weight touched once, and the process's peak RSS. `--make-release` writes an
official-format release (float16 `state_dict.bin`, as published) with the small architecture and random
weights, using the tiny codec of ../shared/reference/magnet-music (the LM is what takes the time).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from magnet.random_models import HIDDEN_SCALE, RELEASE_SCALES, random_lm, random_release, release_arch

HERE = Path(__file__).resolve()
REFERENCE = HERE.parents[2] / "shared" / "reference"           # the reference fixtures beside the project
REF_TOOLS = REFERENCE / "tools"


def matmul_gflops(kind: str = "mm", seconds: float = 2.0, n: int = 1024) -> float:
    """fp32 [2n, 4n] @ [4n, n] throughput: `mm` = torch.mm (MKL on x86), `onednn` = oneDNN inner product."""
    a, b = torch.randn(n * 2, n * 4), torch.randn(n * 4, n)
    if kind == "mm":
        def f():
            return a @ b
    else:
        bt = b.t().contiguous()

        def f():
            return torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [], "")
    f()
    flops, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        f()
        flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
    return flops / (time.perf_counter() - t0) / 1e9


def step_gflop(scale: str, batch: int, frames: int, stage: int, context: int = 5, text_len: int = 12) -> float:
    """Matmul GFLOP of one dense decoding step (see the module docstring)."""
    s = release_arch(scale)
    D, L, F, card = s["dim"], s["num_layers"], s["ffn_dim"], s["card"]
    rows, T = 2 * batch, frames
    keys = T if stage == 0 else min(T, 2 * context + 1)
    macs = L * (rows * T * (4 * D * D + 2 * D * F)          # self-attention projections, feed-forward
                + batch * T * 2 * D * D                      # cross-attention q / out (conditional rows)
                + rows * T * keys * D * 2                    # self-attention scores and values
                + batch * T * text_len * D * 2)              # cross-attention scores and values
    macs += rows * T * D * card                              # the stage's head
    return 2 * macs / 1e9


def run_ours(a) -> dict:
    from magnet.linears import fast_copy, fast_linears
    from magnet.sampling import FastMode, SamplingParams, StepCounter, generate, make_generator
    from magnet.stage_forward import DecodingSettings
    from magnet.text import TextCondition
    dev = torch.device(a.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    lm = random_lm(a.scale, seconds=a.seconds, device=dev, dtype=dtype)    # float16 values, as published
    fast = FastMode() if a.impl == "fast" else False
    prep_s, copy_mb, recorded_mb = 0.0, 0.0, 0.0
    linears = fast_linears(fast, dev, dtype)
    if linears:
        t0 = time.perf_counter()
        copy = fast_copy(lm, linears)
        prep_s = time.perf_counter() - t0
        copy_mb, recorded_mb = copy.nbytes / 2 ** 20, copy.recorded / 2 ** 20
    B, L = a.batch, 12
    hidden = torch.randn(2 * B, L, lm.cfg.text_dim)
    mask = torch.ones(2 * B, L, dtype=torch.long)
    mask[B:] = 0
    cond = TextCondition(["x"] * B, hidden, mask, torch.zeros(2 * B, L, dtype=torch.long), "random")
    frames = int(a.seconds * 50)
    full = SamplingParams(decoding_steps=[int(x) for x in a.steps.split(",")], fast=fast).check(4).decoding_steps
    steps = full
    settings = DecodingSettings()
    if a.measure_steps:
        steps = SamplingParams(decoding_steps=[int(x) for x in a.measure_steps.split(",")], fast=fast).check(4)
        steps = steps.decoding_steps
        settings = DecodingSettings(prune_on_cpu=False)   # every step of a stage then costs the same: extrapolation holds
    stamps = []
    job = StepCounter(total=sum(steps), progress=lambda d, t: stamps.append(time.perf_counter()))
    params = SamplingParams(decoding_steps=steps, fast=fast)
    gen, _ = make_generator(0, dev)
    from magnet.devices import autocast_for
    ac = autocast_for(dev, dtype)
    t0 = time.perf_counter()
    with ac:
        generate(lm, cond, frames, params, generator=gen, job=job, decoding=settings)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    times = [t1 - t0_ for t0_, t1 in zip([t0] + stamps[:-1], stamps)]
    per_stage, i = [], 0
    for n in steps:
        chunk = sorted(times[i:i + n])
        per_stage.append(chunk[len(chunk) // 2])
        i += n
    total = sum(p * n for p, n in zip(per_stage, full)) if a.measure_steps else total
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return dict(per_step_s=per_stage, steps=list(full), measured_steps=sum(steps), total_s=total, peak_mb=peak,
                prep_s=prep_s, copy_mb=copy_mb, recorded_mb=recorded_mb, linears=linears or "fp32",
                threads=torch.get_num_threads(),
                params_m=sum(p.numel() for p in lm.parameters()) / 1e6)


def run_reference(a, scale: str, batch: int) -> dict | None:
    """audiocraft's MAGNeT through ../shared/reference/tools/ref_speed.py in its own venv."""
    if not (a.ref_python and a.ref_config):
        return None
    py, cfgdir, tools = Path(a.ref_python), Path(a.ref_config), Path(a.ref_tools)
    if not (py.is_file() and cfgdir.is_dir() and (tools / "ref_speed.py").is_file()):
        return None
    steps = a.measure_steps or a.steps
    env = dict(os.environ, AUDIOCRAFT_CONFIG_DIR=str(cfgdir), PYTHONPATH=str(tools))
    cmd = [str(py), "ref_speed.py", "--scale", scale, "--seconds", str(int(a.seconds)), "--steps", steps,
           "--batch", str(batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tools))
    m = re.search(r"total_s=([\d.]+) per_step_s=([\d.]+) rtf=[\d.]+ peak_rss_mb=(\d+)", out.stdout)
    if out.returncode or not m:
        print(f"reference failed:\n{out.stderr[-1500:]}")
        return None
    per = float(m.group(2))
    full = [int(x) for x in a.steps.split(",")]
    measured = [int(x) for x in steps.split(",")]
    return dict(per_step_s=[per] * len(full), steps=full, measured_steps=sum(measured), total_s=per * sum(full),
                peak_mb=float(m.group(3)), prep_s=0.0, linears="fp32")


def load_one(path: str) -> dict:
    import magnet.checkpoints  # noqa: F401  (imports are not timed: ComfyUI has them loaded already)
    from transformers import EncodecConfig, EncodecModel  # noqa: F401
    from magnet.checkpoints import build_lm, load_release
    t0 = time.perf_counter()
    r = load_release(path)
    lm = build_lm(r.lm_config, r.lm_state, path, device="cpu", dtype=torch.float32)
    del r.lm_state
    loaded = time.perf_counter() - t0
    total = 0.0
    for p in lm.parameters():              # first use: a memory-mapped weight is read here
        total += float(p.sum())
    return dict(load_s=loaded, total_s=time.perf_counter() - t0, peak_mb=resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024, weights_mb=sum(p.numel() * 4 for p in lm.parameters()) / 2 ** 20)


def bench_load(a):
    release = Path(a.load)
    conv = Path(a.converted) if a.converted else release.parent / (release.name + ".fp32.safetensors")
    if not conv.exists():
        from magnet.checkpoints import convert_release
        t0 = time.perf_counter()
        convert_release(release, conv)
        print(f"converted {release} -> {conv} in {time.perf_counter() - t0:.1f} s "
              f"({conv.stat().st_size / 2 ** 20:.0f} MB)")
    print(f"{'file':48} {'load s':>7} {'+ first use s':>14} {'peak MB':>8} {'weights MB':>10}")
    res = {}
    for _ in range(a.repeat):
        for name, path in (("official .bin", release), ("converted .safetensors", conv)):
            cmd = [sys.executable, str(HERE), "--load-single", str(path)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-2000:])
                return
            r = json.loads(out.stdout.strip().splitlines()[-1])
            res.setdefault(name, []).append(r)
            print(f"{name + ' ' + path.name:48} {r['load_s']:>7.2f} {r['total_s']:>14.2f} {r['peak_mb']:>8.0f} "
                  f"{r['weights_mb']:>10.0f}", flush=True)
    best = {k: min(x["total_s"] for x in v) for k, v in res.items()}
    print(f"converted / official (best of {a.repeat}, load + first use): "
          f"{best['official .bin'] / best['converted .safetensors']:.1f}x faster")


def make_release(dst: str):
    d = random_release(REFERENCE / "magnet-music", Path(dst), **RELEASE_SCALES["small"], hidden_scale=HIDDEN_SCALE)
    pkg = torch.load(d / "state_dict.bin", weights_only=True)
    pkg["best_state"] = {k: v.half() for k, v in pkg["best_state"].items()}       # as published
    torch.save(pkg, d / "state_dict.bin")
    print(f"wrote {d} ({(d / 'state_dict.bin').stat().st_size / 2 ** 20:.0f} MB state_dict.bin)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", nargs="+", default=["small"], choices=list(RELEASE_SCALES))
    ap.add_argument("--batch", nargs="+", type=int, default=[1])
    ap.add_argument("--impl", nargs="+", default=["exact", "fast", "reference"], choices=["exact", "fast", "reference"])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--steps", default="20,10,10,10")
    ap.add_argument("--measure-steps", default=None, help="run these steps per stage and extrapolate to --steps")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--ref-python", default=os.environ.get("MAGNET_REF_PYTHON"),
                    help="python of a venv with audiocraft 1.3.0 (default: $MAGNET_REF_PYTHON; none: the "
                         "reference is skipped)")
    ap.add_argument("--ref-config", default=os.environ.get("AUDIOCRAFT_CONFIG_DIR"),
                    help="the config/ folder of the audiocraft 1.3.0 sdist (default: $AUDIOCRAFT_CONFIG_DIR)")
    ap.add_argument("--ref-tools", default=str(REF_TOOLS), help="folder holding ref_speed.py and refkit.py")
    ap.add_argument("--load", metavar="RELEASE_DIR", help="time loading this release: .bin vs converted")
    ap.add_argument("--converted", metavar="FILE", help="the converted file (default: made beside the release)")
    ap.add_argument("--repeat", type=int, default=2, help="loading runs per file (default 2)")
    ap.add_argument("--make-release", metavar="DIR", help="write a real-size random release (small) to DIR")
    ap.add_argument("--load-single", help=argparse.SUPPRESS)
    ap.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.load_single:
        print(json.dumps(load_one(a.load_single)))
        return
    if a.make_release:
        make_release(a.make_release)
        return
    if a.load:
        bench_load(a)
        return
    if a.single:
        a.scale, a.batch, a.impl = a.scale[0], a.batch[0], a.impl[0]
        print(json.dumps(run_ours(a)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {a.device}, {a.dtype}")
    if a.device == "cpu":
        from magnet.linears import choose_linears, cpu_features_text
        print(f"CPU features: {cpu_features_text()}")
        print(f"fast mode here: {choose_linears().describe()}")
        mm, dnn = matmul_gflops("mm"), matmul_gflops("onednn")
        print(f"fp32 matmul throughput ([2048x4096] @ [4096x1024]): torch.mm {mm:.0f} GFLOP/s, "
              f"oneDNN {dnn:.0f} GFLOP/s")
    else:
        mm = dnn = float("nan")
    best = max(mm, dnn)
    notes = []
    head = (f"{'impl':10} {'scale':6} {'batch':>5} {'steps':>12} {'s/step (per stage)':>24} {'total s':>8} "
            f"{'RTF':>6} {'peak MB':>8} {'GFLOP/s':>8} {'% mm':>5} {'linears':>8}")
    print(head, flush=True)
    for scale in a.scale:
        for b in a.batch:
            for impl in a.impl:
                if impl == "reference":
                    if a.device != "cpu":
                        continue
                    r = run_reference(a, scale, b)
                    if r is None:
                        notes.append(f"reference ({scale}, batch {b}): skipped (no audiocraft venv python at "
                                     f"{a.ref_python or '(none: --ref-python or $MAGNET_REF_PYTHON)'} or config "
                                     f"at {a.ref_config or '(none: --ref-config or $AUDIOCRAFT_CONFIG_DIR)'})")
                        continue
                else:
                    cmd = [sys.executable, str(HERE), "--single", "--impl", impl, "--scale", scale, "--batch",
                           str(b), "--seconds", str(a.seconds), "--steps", a.steps, "--device", a.device,
                           "--dtype", a.dtype]
                    if a.measure_steps:
                        cmd += ["--measure-steps", a.measure_steps]
                    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
                    if out.returncode:
                        print(out.stderr[-2000:])
                        continue
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    if r.get("prep_s"):
                        notes.append(f"fast ({scale}, batch {b}): {r['linears']} copy of the LM made in "
                                     f"{r['prep_s']:.1f} s, {r['copy_mb']:.0f} MB, once per loaded model (not in the "
                                     f"total); {r['recorded_mb']:.0f} MB of float32 weights held in float16 meanwhile")
                frames = int(a.seconds * 50)
                gflop = sum(n * step_gflop(scale, b, frames, s) for s, n in enumerate(r["steps"]))
                rate = gflop / r["total_s"]
                per = ",".join(f"{p:.2f}" for p in r["per_step_s"])
                steps = ",".join(str(n) for n in r["steps"])
                pct = f"{100 * rate / best:5.0f}" if best == best else "    -"
                print(f"{impl:10} {scale:6} {b:>5} {steps:>12} {per:>24} {r['total_s']:>8.1f} "
                      f"{r['total_s'] / a.seconds:>6.2f} {r['peak_mb']:>8.0f} {rate:>8.0f} {pct} "
                      f"{r.get('linears', 'fp32'):>8}", flush=True)
    if a.measure_steps:
        notes.append(f"extrapolated from {a.measure_steps} steps per stage (ours without pruning: an upper bound)")
    notes.append("% mm: the useful matmul rate as a share of the faster of torch.mm / oneDNN above")
    for n in notes:
        print("  " + n)


if __name__ == "__main__":
    main()
