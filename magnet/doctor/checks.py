"""The doctor's checks on the device against the specification.

A loaded model (the tiny random-weight MAGNeT, or a release) is compared with its reference (`reference`):
the same weights in float32 on the CPU, decoded through `LM.forward`. Each stage's logits over several steps
(`stage_forward.StageForward`, so static buffers and CUDA-graph replays run), greedy decoding in both span
arrangements, a long-form join, the codec both ways, and the largest activation (the fp16 overflow
question); on CUDA, that the graphs stayed on. Each check returns (ok, numbers, summary).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time

import torch

from ..cuda_graphs import graph_state, graphs_wanted
from ..stage_forward import StageForward
from .environment import autocast, dtype_name

# Largest |error| of the logits the device computes, as a share of the logit scale (the largest |logit| of the
# specification over the compared positions). Measured on the tiny model on the development CPU (x86, oneDNN):
# the decoding forward in float32 within 6e-7 of the scale; LM weights in bf16 within 8e-3, in fp16 within 1e-3.
# Wrong paths measured there: a band one frame too narrow or too wide 0.1-0.2, positions shifted by one
# 0.17-0.27, one text token dropped 0.13-0.21, a layer norm's bias dropped 0.03-0.05. The bounds leave margins
# of 170x (fp32), 10x (fp16) and 6x (bf16) for other kernels (cuBLAS, autocast, SDPA) and deeper models.
RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# Greedy decoding in fp16/bf16 may take another argmax where two logits are within rounding, and every later
# step then sees other codes: identical tokens are required in float32 only; in half precision at least this
# share of the tokens must agree (chance agreement is 1/card; measured on the CPU: bf16 0.84-0.96, fp16 0.91-0.97).
HALF_AGREEMENT = 0.5
CODES_AGREEMENT = 0.9          # codec encode on the device vs the CPU (nearest-codeword ties flip a few)
FP16_MAX = 65504.0

STEPS = (6, 3, 3, 3)           # decoding steps of the tiny checks
SMALL_MODEL_PARAMS = 20_000_000  # below this, the CPU side runs on one thread (microsecond ops: hand-offs cost more)
STAGE_STEPS = 10               # the stage length the logits checks' forwards are built for (as a release's)


def _e(x) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2e}"


# -- the reference ----------------------------------------------------------------------------------

class _Spec(torch.nn.Module):
    """An LM run as its specification: `LM.forward` itself (the decoding loop's `plan` is dropped).
    Everything else (cfg, memory, mask_id, parameters) is the wrapped LM's."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["lm"], name)

    def forward(self, codes, mem, stage=-1, heads=None, cache=None, *, plan=None):
        return self.lm(codes, mem, stage=stage, heads=heads, cache=cache)


def _cpu_float32(module, build):
    """`module` itself when it is float32 on the CPU, else a float32 CPU copy of it (`build()` makes an empty
    one of the same structure): the reference computes in float32 on the very weights the device holds (a
    model loaded in fp16 or bf16 is compared on its rounded weights, so only the computation differs)."""
    params = list(module.parameters())
    if all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params):
        return module
    copy = build()
    copy.load_state_dict({k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
                          for k, v in module.state_dict().items()}, assign=True)
    return copy.eval().requires_grad_(False)


def reference(model):
    """The reference of a loaded model: its weights in float32 on the CPU, decoded through `LM.forward` (no
    pruning, no static buffers, no CUDA graphs), and its codec in float32 on the CPU."""
    from ..model import MagnetModel
    from ..transformer import LM

    def empty_lm():
        with torch.device("meta"):
            return LM(model.lm.cfg)
    lm = _cpu_float32(model.lm, empty_lm)
    codec = _cpu_float32(model.codec, lambda: copy.deepcopy(model.codec))
    ref = MagnetModel(_Spec(lm), codec)
    ref.decoding = dataclasses.replace(model.decoding, prune_on_cpu=False, cuda_graphs=False,
                                       static_steps_on_cpu=False)
    return ref


def condition(batch: int, length: int, text_dim: int, seed: int):
    """Random 'T5 states' for `batch` prompts and their null rows (mask all zero), one prompt padded."""
    from ..text import TextCondition
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * batch, length, text_dim, generator=g)
    mask = torch.ones(2 * batch, length, dtype=torch.long)
    mask[batch:] = 0
    if batch > 1:
        mask[1, length // 2:] = 0
    return TextCondition([f"doctor {i}" for i in range(batch)], hidden, mask,
                         torch.zeros(2 * batch, length, dtype=torch.long), "random states")


# -- the checks -------------------------------------------------------------------------------------

def precision(model) -> torch.dtype:
    """The precision the LM's matmuls run at: the autocast dtype, else the weights'; float32 matmuls that
    may use TF32 on CUDA count as float16 (10-bit mantissa)."""
    ac = autocast(model)
    dt = ac.fast_dtype if getattr(ac, "_enabled", False) else model.dtype
    if dt == torch.float32 and model.device.type == "cuda" and (
            torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"):
        return torch.float16
    return dt


def _step_codes(g, batch, n_q, frames, card, mask_id, span, stage, share):
    """Codes as in a decoding step of `stage`: earlier codebooks final, later ones masked, `share` of the
    stage's spans masked (all when share >= 1). -> (codes [B, K, T], masked bool [B, T])."""
    codes = torch.randint(0, card, (batch, n_q, frames), generator=g)
    codes[:, stage + 1:] = mask_id
    spans = torch.rand(batch, frames // span, generator=g) < share
    spans[:, 0] |= ~spans.any(dim=1)                  # at least one span per row
    masked = spans.repeat_interleave(span, dim=-1)
    codes[:, stage][masked] = mask_id
    return codes, masked


class _Peak:
    """The largest |output| of every linear layer inside the transformer's layers and of every layer (the
    residual stream), on the spec forward, each with the largest value its dtype holds."""

    def __init__(self, lm):
        self.values, self.hooks = [], []
        for layer in lm.transformer.layers:
            for mod in [layer, *(m for m in layer.modules() if isinstance(m, torch.nn.Linear))]:
                kind = "residual" if mod is layer else "linear"
                self.hooks.append(mod.register_forward_hook(
                    lambda m, i, out, kind=kind: self.values.append((kind, out.dtype, out.detach().abs().amax()))))

    def close(self) -> list:
        for h in self.hooks:
            h.remove()
        return [(kind, dtype, float(v.float().cpu())) for kind, dtype, v in self.values]


def check_logits(dev, ref, stage: int, cond, frames: int, calls: int, seed: int, peaks: list | None = None):
    """Stage `stage`'s logits from the decoding loop's forward on the device (`StageForward.logits`, the
    model's settings, exact mode) over `calls` steps with different codes, each against `LM.forward` in
    float32 on the CPU, at the positions the step uses."""
    cfg = dev.cfg
    B = cond.batch
    d = dev.device
    tol_rel = RELATIVE_TOLERANCE[precision(dev)]
    g = torch.Generator().manual_seed(seed + 100 * stage)
    worst = scale = spec_dev = 0.0
    path = ""
    with torch.inference_mode():
        mem_ref = ref.lm.memory(cond.hidden, cond.mask, null_rows=B)
        with autocast(dev):
            c = cond.to(d)
            mem = dev.lm.memory(c.hidden, c.mask, null_rows=B)
            forward = StageForward(dev.lm, mem, guided=True, batch=B, stage=stage, n_steps=STAGE_STEPS, fast=None,
                                   settings=dev.decoding)
        shares = [1.0] + [0.6 * (1 - i / calls) + 0.05 for i in range(1, calls)]
        for share in shares:
            codes, used = _step_codes(g, B, cfg.n_q, frames, cfg.card, dev.lm.mask_id, cfg.span_len, stage, share)
            with autocast(dev):
                logits, guided = forward.logits(codes.to(d), used.to(d), 3.0)
                if peaks is not None:
                    peak = _Peak(dev.lm)
                    try:
                        eager = dev.lm(codes.to(d), mem, stage=stage, heads=[stage])[:, 0].float().cpu()
                    finally:
                        peaks.extend(peak.close())
            spec = ref.lm(codes, mem_ref, stage=stage, heads=[stage])[:, 0]
            cols = used.any(dim=0)
            if not guided or tuple(logits.shape) != tuple(spec.shape):
                raise RuntimeError(f"the stage forward gave logits {tuple(logits.shape)} (guided={guided}), the "
                                   f"specification {tuple(spec.shape)}")
            diff = (logits.cpu()[:, cols] - spec[:, cols]).abs().max().item()
            worst = max(worst, diff) if not math.isnan(diff) else math.nan
            scale = max(scale, spec[:, cols].abs().max().item())
            if peaks is not None:
                spec_dev = max(spec_dev, (eager[:, cols] - spec[:, cols]).abs().max().item())
        if getattr(forward, "static", False):
            path = "static buffers" + (" + CUDA graph replays" if getattr(forward, "graph", False) and
                                       d.type == "cuda" else "")
        elif getattr(forward, "prune", False):
            path = "pruned positions"
        else:
            path = "all positions"
    tol = tol_rel * scale
    ok = worst <= tol            # NaN fails
    numbers = {"max_abs_error": worst, "tolerance": tol, "relative_tolerance": tol_rel, "logit_scale": scale,
               "steps": calls, "frames": frames, "path": path}
    if peaks is not None:
        numbers["spec_on_device_max_abs_error"] = spec_dev
    text = (f"max abs error {_e(worst)} {'<=' if ok else '>'} {_e(tol)} ({tol_rel:g} x logit scale {scale:.2f}); "
            f"{calls} steps, {path}")
    if peaks is not None and (d.type != "cpu" or dev.dtype != torch.float32):
        text += f"; LM.forward itself on {d}: {_e(spec_dev)}"
    return ok, numbers, text


def check_graphs(dev):
    """On CUDA: the stages' CUDA graphs were captured and their first replays matched the eager forward (a
    failed capture or check turns a model's graphs off: slower, the same result)."""
    if not graphs_wanted(dev.decoding):
        why = "MAGNET_CUDA_GRAPHS=" + os.environ.get("MAGNET_CUDA_GRAPHS", "") \
            if getattr(dev.decoding, "cuda_graphs", False) else "off in the model's settings"
        return True, {"graphs": "off", "why": why}, f"off ({why}): every step runs eagerly"
    state = graph_state(dev.lm)
    off = state.off
    verified = len(getattr(state, "verified", ()))
    ok = off is None and verified > 0
    text = (f"captured and replayed; {verified} shape(s) checked against the eager forward" if ok else
            f"turned off: {off}" if off else "no graph was captured")
    return ok, {"graphs": "on" if ok else "off", "why": off, "verified_shapes": verified}, text


def _compare_codes(dev_codes, ref_codes, card: int, frames: int, exact: bool, what: str):
    a, b = dev_codes.cpu(), ref_codes.cpu()
    same_shape = tuple(a.shape) == tuple(b.shape)
    valid = bool(a.numel()) and int(a.min()) >= 0 and int(a.max()) < card
    agree = float((a == b).float().mean()) if same_shape else 0.0
    length_ok = a.shape[-1] == frames
    identical = same_shape and bool(torch.equal(a, b))
    ok = valid and same_shape and length_ok and (identical if exact else agree >= HALF_AGREEMENT)
    numbers = {"identical": identical, "agreement": agree, "valid_codes": valid, "frames": int(a.shape[-1]),
               "expected_frames": frames, "required": "identical" if exact else f"agreement >= {HALF_AGREEMENT}"}
    text = (f"{what}: {'identical to' if identical else f'{agree:.1%} of tokens agree with'} the CPU float32 "
            f"reference ({'identical' if exact else f'>= {HALF_AGREEMENT:.0%}'} required), "
            f"{int(a.shape[-1])}/{frames} frames, codes {'valid' if valid else 'INVALID'}")
    return ok, numbers, text


def check_greedy(dev, ref, cond, frames: int, arrangement: str, steps=STEPS):
    """Greedy decoding on the device vs the CPU float32 reference (the same loop through `LM.forward`)."""
    from ..sampling import SamplingParams
    params = SamplingParams(use_sampling=False, decoding_steps=steps, span_arrangement=arrangement)
    out = dev.generate_from_condition(cond, frames=frames, params=params, seed=0).codes
    want = ref.generate_from_condition(cond, frames=frames, params=params, seed=0).codes
    exact = precision(dev) == torch.float32
    expected = frames - frames % dev.cfg.span_len if arrangement == "nonoverlap" and frames <= dev.max_frames \
        else frames
    ok, numbers, text = _compare_codes(out, want, dev.cfg.card, expected, exact, f"{sum(steps)} steps")
    numbers["span_arrangement"] = arrangement
    return ok, numbers, text, want


def check_longform(dev, ref, cond, frames: int):
    """A generation longer than the window (sliding windows, `magnet.longform`): the device vs the reference."""
    ok, numbers, text, _ = check_greedy(dev, ref, cond, frames, "nonoverlap")
    numbers["window_frames"] = dev.max_frames
    return ok, numbers, f"{frames} frames over a {dev.max_frames}-frame window, " + text


def _codec_tolerance(model) -> float:
    p = next(model.codec.parameters())
    dt = p.dtype
    if dt == torch.float32 and p.device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        dt = torch.float16                      # cuDNN convolutions in TF32
    return RELATIVE_TOLERANCE.get(dt, 5e-2)


def _test_signal(sample_rate: int, seconds: float = 1.0) -> torch.Tensor:
    t = torch.arange(int(sample_rate * seconds)) / sample_rate
    wav = 0.3 * torch.sin(2 * math.pi * 220 * t) + 0.2 * torch.sin(2 * math.pi * (100 + 900 * t) * t)
    return wav.view(1, 1, -1)


def check_codec(dev, ref, codes: torch.Tensor | None = None):
    """The codec on the device vs the CPU: decode the same codes (max abs error vs the waveform scale) and
    encode a test signal (share of equal codes)."""
    tol_rel = _codec_tolerance(dev)
    numbers: dict = {}
    if codes is None:
        codes = ref.encode(_test_signal(ref.sample_rate), ref.sample_rate)
    wav = dev.decode(codes)
    want = ref.decode(codes)
    err = (wav - want).abs().max().item() if wav.shape == want.shape else math.inf
    scale = want.abs().max().item()
    tol = tol_rel * scale
    numbers.update(max_abs_error=err, tolerance=tol, relative_tolerance=tol_rel, waveform_scale=scale,
                   samples=int(want.shape[-1]))
    ok = err <= tol
    text = f"decode: max abs error {_e(err)} {'<=' if err <= tol else '>'} {_e(tol)} ({tol_rel:g} x scale {scale:.3f})"
    signal = _test_signal(ref.sample_rate)
    a = dev.encode(signal, ref.sample_rate).cpu()
    b = ref.encode(signal, ref.sample_rate).cpu()
    agree = float((a == b).float().mean()) if a.shape == b.shape else 0.0
    numbers.update(codes_agreement=agree, required_agreement=CODES_AGREEMENT, codec_device=str(
        next(dev.codec.parameters()).device), codec_dtype=dtype_name(next(dev.codec.parameters()).dtype))
    ok = ok and agree >= CODES_AGREEMENT
    text += f"; encode: {agree:.1%} of codes agree (>= {CODES_AGREEMENT:.0%} required)"
    if dev.codec is ref.codec:
        numbers["note"] = "the codec runs in float32 on the CPU, as the reference: a smoke run"
        text += " (float32 on the CPU: the reference itself)"
    return ok, numbers, text


def check_activations(peaks: list):
    """The largest |output| of the layers' linear maps and of the residual stream seen on the device: finite,
    and within what each output's dtype holds (fp16: 65504). `fp16_headroom`: how far the linear outputs are
    from fp16's limit, whatever the dtype here (the fp16 overflow question)."""
    if not peaks:
        raise RuntimeError("no layer output was seen")
    linear = max((v for kind, _, v in peaks if kind == "linear"), default=0.0)
    residual = max((v for kind, _, v in peaks if kind == "residual"), default=0.0)
    over = [(kind, dtype_name(dt), v) for kind, dt, v in peaks if not math.isfinite(v) or v >= torch.finfo(dt).max]
    dtypes = sorted({f"{kind} {dtype_name(dt)}" for kind, dt, _ in peaks})
    fp16 = FP16_MAX / linear if linear and math.isfinite(linear) else None
    ok = not over
    text = (f"largest |linear output| {linear:.4g}, |residual| {residual:.4g} ({', '.join(dtypes)}); linear "
            f"outputs at {1 / fp16:.2g} of fp16's limit {FP16_MAX:g}" if fp16 else
            f"largest |linear output| {linear}, |residual| {residual}")
    if over:
        text += f"; OVERFLOW: {over[0][0]} output {over[0][2]} in {over[0][1]}"
    return ok, {"max_abs_linear_output": linear, "max_abs_residual": residual, "dtypes": dtypes,
                "fp16_limit": FP16_MAX, "fp16_headroom": fp16, "overflowed": [f"{k} {d}" for k, d, _ in over]}, text


# -- a release --------------------------------------------------------------------------------------

def release_checks(report, release, text_encoder, device, dtype, codec=None) -> None:
    """The logits, greedy decoding, activations, text encoder and codec checks on a release's real LM, for a
    handful of steps of one second."""
    from ..model import MagnetModel
    state: dict = {}

    def load():
        t = time.perf_counter()
        dev = MagnetModel.from_pretrained(release, text_encoder=text_encoder, device=device, dtype=dtype,
                                          codec=codec)
        state.update(dev=dev, ref=reference(dev))
        te = dev.text_encoder
        return True, {"release": str(release), "dtype": dtype_name(dev.dtype),
                      "text_encoder": str(te.folder) if te is not None else None,
                      "load_seconds": time.perf_counter() - t}, \
            f"{dev.cfg.dim}-dim, {dev.cfg.num_layers} layers, {dtype_name(dev.dtype)} on {dev.device}, text encoder " \
            f"{te.folder if te is not None else 'none (random states)'}"

    if not report.run("release load", load)["ok"]:
        return
    dev, ref = state["dev"], state["ref"]
    small = sum(p.numel() for p in dev.lm.parameters()) < SMALL_MODEL_PARAMS
    threads = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        _release_steps(report, dev, ref)
    finally:
        torch.set_num_threads(threads)
        state.clear()


def _release_steps(report, dev, ref) -> None:
    from ..text import TextEncoder
    prompts = ["80s thrash metal intro riff", "soft rain on a tin roof"]
    if dev.text_encoder is not None:
        cond = dev.encode_text(prompts).to("cpu")

        def text():
            want = TextEncoder(dev.text_encoder.folder, device="cpu").encode(prompts)
            err = (cond.hidden - want.hidden).abs().max().item()
            scale = want.hidden.abs().max().item()
            tf32 = dev.text_encoder.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
            tol_rel = 1e-2 if tf32 else 1e-3           # T5 runs in float32 (TF32 matmuls: fp16-like precision)
            tol = tol_rel * scale
            return err <= tol, {"max_abs_error": err, "tolerance": tol, "relative_tolerance": tol_rel,
                                "scale": scale}, \
                f"T5 states on {dev.text_encoder.device} vs the CPU: max abs error {_e(err)} " \
                f"{'<=' if err <= tol else '>'} {_e(tol)} ({tol_rel:g} x scale {scale:.3g})"
        if dev.text_encoder.device.type != "cpu":
            report.run("release text encoder", text)
    else:
        cond = condition(len(prompts), 12, dev.cfg.text_dim, 0)
    frames = int(dev.frame_rate)
    frames -= frames % dev.cfg.span_len
    peaks: list = []
    for stage in range(dev.cfg.n_q):
        report.run(f"release logits stage {stage}",
                   lambda s=stage: check_logits(dev, ref, s, cond, frames, 2, 1, peaks))
    report.run("release activations", lambda: check_activations(peaks))
    out: dict = {}

    def greedy():
        ok, numbers, text, codes = check_greedy(dev, ref, cond, frames, "nonoverlap", steps=(4,) + (2,) *
                                                (dev.cfg.n_q - 1))
        out["codes"] = codes
        return ok, numbers, text
    report.run("release greedy", greedy)
    report.run("release codec", lambda: check_codec(dev, ref, out.get("codes")))

