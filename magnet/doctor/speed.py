"""The doctor's speed test: the time of one decoding step of the small releases' architecture (random
weights), in exact and, on the CPU, in fast mode, its real-time factor and the peak memory."""
from __future__ import annotations

import contextlib
import gc
import sys
import time

import torch

from .. import devices, linears
from ..random_models import Tiny, empty_lm, init_for_timing, release_arch, release_config, tiny_codec
from ..stage_forward import StageForward
from .environment import autocast, dtype_name

SPEED_STEPS = (20, 10, 10, 10)  # the 10 s releases' steps, for the real-time factor
ARCH = release_arch("small")    # the architecture timed by default: the small music releases'


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _peak_memory(device: torch.device) -> tuple[float | None, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30, "CUDA max_memory_allocated"
    if device.type == "mps":
        with contextlib.suppress(Exception):
            return torch.mps.driver_allocated_memory() / 2 ** 30, "MPS driver_allocated_memory"
        return None, "MPS"
    try:
        import resource                                   # not on Windows
    except ImportError:
        return None, "not measured on this OS"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2 ** 30 if sys.platform == "darwin" else 2 ** 20), "process peak RSS"


def check_speed(device: torch.device, dtype=None, arch: dict | None = None, frames: int = 500, repeats=None):
    """Seconds per decoding step of a real-size architecture (default: the small releases', 10 s = 500 frames,
    one prompt with guidance = 2 rows), random weights; exact mode, and on the CPU fast mode with the linear
    layers it chooses here (`linears.choose_linears`: bf16 or int8; none when float32 is fastest). The
    real-time factor assumes every step costs a full step (an upper bound where the CPU prunes positions)."""
    from ..model import MagnetModel
    from ..sampling import FastMode
    arch = dict(ARCH if arch is None else arch)
    dtype = devices.parse_dtype(dtype, device)
    t0 = time.perf_counter()
    cfg = release_config(arch=arch, seconds=frames / 50)
    lm = empty_lm(cfg, device, dtype)
    init_for_timing(lm)
    lm.eval().requires_grad_(False)
    holder = MagnetModel(lm, tiny_codec(Tiny()))    # the engine's autocast policy and settings for this LM
    built = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    repeats = repeats or (5 if device.type == "cuda" else 1)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 12, cfg.text_dim, generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1:] = 0
    codes = torch.full((1, cfg.n_q, frames), cfg.card, dtype=torch.long, device=device)
    used = torch.ones(1, frames, dtype=torch.bool, device=device)
    numbers: dict = {"arch": {k: v for k, v in arch.items()}, "frames": frames, "rows": 2,
                     "dtype": dtype_name(dtype), "build_seconds": built, "timed_steps": repeats}
    times = {}

    def timed(stage: int, fast=None) -> float:
        with torch.inference_mode(), autocast(holder):
            mem = lm.memory(hidden.to(device), mask.to(device), null_rows=1)
            forward = StageForward(lm, mem, guided=True, batch=1, stage=stage, n_steps=10, fast=fast,
                                   settings=holder.decoding)
            if device.type != "cpu":                  # warm-up (and, on CUDA, the graph capture)
                forward.logits(codes, used, 3.0)
                forward.logits(codes, used, 3.0)
            _sync(device)
            t = time.perf_counter()
            for _ in range(repeats):
                forward.logits(codes, used, 3.0)
            _sync(device)
            return (time.perf_counter() - t) / repeats

    times["exact_stage0"] = timed(0)
    if device.type != "cpu":
        times["exact_band"] = timed(1)
    per0 = times["exact_stage0"]
    per1 = times.get("exact_band", per0)
    steps = SPEED_STEPS
    seconds = frames / 50
    numbers["seconds_per_step"] = per0
    numbers["seconds_per_step_band"] = per1
    numbers["rtf_exact"] = (steps[0] * per0 + sum(steps[1:]) * per1) / seconds
    text = f"exact {per0:.3g} s/step"
    if "exact_band" in times:
        text += f" (band stages {per1:.3g} s)"
    text += f", RTF {numbers['rtf_exact']:.3g} at {','.join(map(str, steps))} steps"
    path = linears.fast_linears(FastMode(), device, dtype)
    if path is not None:
        t = time.perf_counter()
        linears.fast_copy(lm, path)
        numbers["fast_copy_seconds"] = time.perf_counter() - t
        numbers["fast_linears"] = path
        per_fast = timed(0, FastMode())
        fast_steps = FastMode().steps(steps)
        numbers["seconds_per_step_fast"] = per_fast
        numbers["rtf_fast"] = sum(fast_steps) * per_fast / seconds
        text += (f"; fast ({path}) {per_fast:.3g} s/step, RTF {numbers['rtf_fast']:.3g} at "
                 f"{','.join(map(str, fast_steps))} ({path} copy made once in {numbers['fast_copy_seconds']:.1f} s)")
        linears.drop_fast_copy(lm)
    peak, how = _peak_memory(device)
    numbers["peak_memory_gib"], numbers["peak_memory_kind"] = peak, how
    numbers["weights_gib"] = sum(p.numel() * p.element_size() for p in lm.parameters()) / 2 ** 30
    if peak is not None:
        text += f"; peak memory {peak:.2f} GiB ({how}; weights {numbers['weights_gib']:.2f} GiB)"
    del lm, holder
    gc.collect()
    return True, numbers, text

