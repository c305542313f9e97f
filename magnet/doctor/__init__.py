"""`python -m magnet doctor`: what this machine runs, and whether it runs it right.

Three parts, each line printed as it is known:

1. The environment (`environment`): Python, torch and transformers, the device (name, memory), the dtype a
   model takes there by default and the autocast policy, and which kernels run (oneDNN linears, the CPU's
   features and the linear layers fast mode chose here (bf16, int8 or fp32, with the measured rates), the
   SDPA kernels that accept the model's attention, CUDA graphs).
2. Checks on the device against the specification (`checks`). A tiny random-weight MAGNeT
   (`magnet.random_models.Tiny`, seeded, no download) is written as a converted release and loaded on the
   device as any release is (`MagnetModel.from_pretrained`); what the decoding loop runs there is compared
   with `LM.forward` in float32 on the CPU: each stage's logits over several steps
   (`stage_forward.StageForward`, so static buffers and CUDA-graph replays run), greedy decoding in both span
   arrangements, a long-form join, the codec both ways, and the largest activation (the fp16 overflow
   question). With a release, the same on its real LM.
3. The time of one decoding step of the small release's architecture (random weights), its real-time
   factor and peak memory (`speed`).

A check that raises is recorded as failed with the exception's first line, and the doctor goes on.
`run(...)` returns the report as a dict (what `--json` prints; `to_json`).
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from .. import devices
from ..errors import MagnetError, first_line
from ..random_models import Tiny, write_tiny_release
from . import checks
from . import speed as speed_test
from .environment import dtype_name, environment, environment_lines

__all__ = ["Report", "run", "to_json"]


class Report:
    """Checks as they finish, each a dict: name, ok, its numbers, `summary` (the human line) and seconds."""

    def __init__(self, echo: Callable[[str], None]):
        self.echo = echo
        self.checks: list[dict] = []

    def run(self, name: str, fn: Callable[[], tuple]) -> dict:
        """fn() -> (ok, numbers dict, summary text). An exception is a failed check; the doctor goes on."""
        t0 = time.perf_counter()
        try:
            ok, numbers, text = fn()
        except Exception as e:           # a diagnostic tool: record it and go on (KeyboardInterrupt still stops)
            ok, numbers = False, {"error": f"{type(e).__name__}: {first_line(e)}"}
            text = f"raised {numbers['error']}"
        entry = {"name": name, "ok": bool(ok), **_clean(numbers), "seconds": round(time.perf_counter() - t0, 3),
                 "summary": text}
        self.checks.append(entry)
        self.echo(f"  {'ok  ' if ok else 'FAIL'}  {name:<24} {text}")
        return entry

    @property
    def failed(self) -> list[str]:
        return [c["name"] for c in self.checks if not c["ok"]]


def _clean(numbers: dict) -> dict:
    """JSON-safe numbers: NaN / inf become None (strict JSON has neither), tensors plain values."""
    out = {}
    for k, v in numbers.items():
        if isinstance(v, torch.Tensor):
            v = v.item() if v.numel() == 1 else v.tolist()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


def run(device=None, dtype=None, *, release=None, text_encoder=None, codec=None, speed: bool = True,
        speed_arch: dict | None = None, speed_frames: int = 500, echo: Callable[[str], None] = print,
        tiny: Tiny = Tiny()) -> dict:
    """Run every check (see the module doc) and return the report: ok, verdict, device, dtype, torch,
    transformers, python, environment, checks (each: name, ok, its numbers, seconds, summary), seconds.
    `echo` gets each human-readable line as it is known."""
    from ..model import MagnetModel
    t_start = time.perf_counter()
    device = devices.parse_device(device, "--device")
    dtype_arg = None if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() in ("", "auto")) \
        else devices.parse_dtype(dtype, device, "--dtype")
    if text_encoder is not None and release is None:
        raise MagnetError("--text-encoder needs --release: give the release folder whose LM to check, e.g. "
                          "--release models/magnet/magnet-small-10secs --text-encoder models/text_encoders/t5-base.")
    if release is not None:
        from ..checkpoints import resolve_release
        resolve_release(release)              # a wrong path is a user error, before any work
    report = Report(echo)
    state: dict = {}
    folder = Path(tempfile.mkdtemp(prefix="magnet-doctor-"))

    def load():
        path = write_tiny_release(tiny, folder)
        dev = MagnetModel.from_pretrained(path, text_encoder=False, device=device, dtype=dtype_arg)
        state.update(dev=dev, ref=checks.reference(dev))
        return True, {"dtype": dtype_name(dev.dtype), "device": str(dev.device)}, \
            f"tiny random MAGNeT ({tiny.dim}-dim, {tiny.num_layers} layers, {tiny.n_q} codebooks of {tiny.card}, " \
            f"band {tiny.subcodes_context}, {tiny.frames}-frame window) as {dtype_name(dev.dtype)} on {dev.device}"

    threads = torch.get_num_threads()
    try:
        echo("MAGNeT doctor")
        loaded = Report(lambda line: None).run("load", load)
        try:
            env = environment(device, state.get("dev"))
            lines = environment_lines(env)
        except Exception as e:                  # report what is known and go on
            env = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
                   "default_dtype": None, "error": f"{type(e).__name__}: {first_line(e)}"}
            with contextlib.suppress(Exception):
                import transformers
                env["transformers"] = transformers.__version__
            report.checks.append({"name": "environment", "ok": False, "error": env["error"], "seconds": 0.0,
                                  "summary": f"raised {env['error']}"})
            lines = [f"environment could not be read fully: {env['error']}",
                     f"torch    {env['torch']}   transformers {env.get('transformers')}   python {env['python']}"]
        for line in lines:
            echo(line)
        precision = None
        with contextlib.suppress(Exception):
            precision = checks.precision(state["dev"])
        tol = checks.RELATIVE_TOLERANCE
        echo(f"checks   on {device} against LM.forward in float32 on the CPU (tolerances relative to the logit "
             f"scale: fp32 {tol[torch.float32]:g}, fp16 {tol[torch.float16]:g}, bf16 {tol[torch.bfloat16]:g}"
             + (f"; here {dtype_name(precision)}" if precision is not None else "") + ")")
        report.checks.append(loaded)
        echo(f"  {'ok  ' if loaded['ok'] else 'FAIL'}  {'load':<24} {loaded['summary']}")
        if loaded["ok"]:
            dev, ref = state["dev"], state["ref"]
            torch.set_num_threads(1)        # see checks.SMALL_MODEL_PARAMS
            cond = checks.condition(tiny.batch, tiny.text_len, tiny.text_dim, tiny.seed)
            peaks: list = []
            for stage in range(tiny.n_q):
                report.run(f"logits stage {stage}",
                           lambda s=stage: checks.check_logits(dev, ref, s, cond, tiny.frames, 4, tiny.seed, peaks))
            report.run("activations", lambda: checks.check_activations(peaks))
            if device.type == "cuda":
                report.run("cuda graphs", lambda: checks.check_graphs(dev))
            for arrangement in ("nonoverlap", "stride1"):
                report.run(f"greedy {arrangement}",
                           lambda a=arrangement: checks.check_greedy(dev, ref, cond, tiny.frames, a)[:3])
            report.run("long-form", lambda: checks.check_longform(dev, ref, cond, tiny.long_frames))
            report.run("codec", lambda: checks.check_codec(dev, ref))
            state.clear()
            torch.set_num_threads(threads)
        if release is not None:
            echo(f"release  {release}")
            checks.release_checks(report, release, text_encoder, device, dtype_arg, codec)
        if speed:
            a = speed_test.ARCH if speed_arch is None else speed_arch
            echo(f"speed    {a['dim']}-dim, {a['num_layers']} layers, {a['n_q']} codebooks of {a['card']} (the small "
                 f"releases' shape, random weights), {speed_frames} frames, 1 prompt + guidance = 2 rows")
            report.run("speed", lambda: speed_test.check_speed(device, dtype_arg, speed_arch, speed_frames))
    finally:
        torch.set_num_threads(threads)
        state.clear()
        gc.collect()
        shutil.rmtree(folder, ignore_errors=True)

    seconds = time.perf_counter() - t_start
    failed = report.failed
    where = f"{device} ({env.get('dtype') or env.get('default_dtype') or '?'})"
    if failed:
        verdict = (f"doctor: {len(failed)} check{'s' * (len(failed) != 1)} FAILED: {', '.join(failed)} on {where} "
                   f"— paste this whole output (or --json) into a bug report")
    else:
        verdict = f"doctor: ok — every check passed on {where} in {seconds:.0f} s"
    echo(verdict)
    return {"ok": not failed, "verdict": verdict, "device": str(device), "dtype": env.get("dtype"),
            "torch": torch.__version__, "transformers": env.get("transformers"), "python": platform.python_version(),
            "environment": env, "checks": report.checks, "seconds": round(seconds, 2)}


def to_json(report: dict) -> str:
    """The report as one line of strict JSON (NaN / inf as null)."""
    def fix(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [fix(v) for v in x]
        return x
    return json.dumps(fix(report), allow_nan=False, default=str)
