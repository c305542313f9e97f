"""What makes a MAGNeT decoding step fast: the same function as `LM.forward`, with less work.

`LM.forward` / `Layer.forward` (transformer.py) are the specification. This module computes the same
logits for the decoding loop (sampling.py), skipping only work that cannot change them, plus fast mode's
low-precision layers, which change them within a tolerance:

- only the stage's output head; no cross-attention for the null-condition rows (their memory is exactly
  zero and there are no biases); the first self-attention once for rows that share their codes;
- position pruning: when the loop names the positions whose logits it uses, only the rows that can reach
  them through the layers are computed (`active_positions`);
- the band attention of codebooks >= 1 in blocks, without a [T, T] matrix (`band_attention`);
- fp32 linears on the CPU through oneDNN (`linear`), or, in fast mode, one low-precision copy of the
  layers (`FastLinears`): bf16 (AMX / avx512_bf16) or int8 (VNNI / AVX2), whichever this CPU runs
  fastest (`choose_linears`: from its features, or measured once), with the float32 weights it replaces
  held losslessly in float16 meanwhile (`magnet.lowp`), so fast mode needs no more memory than exact mode;
- static buffers and, on CUDA, a CUDA graph per stage (`StaticStep`).

`StageForward` is one stage's forward, built from (model, memory, stage, fast mode, `FastPathSettings`);
its `logits` method gives each step's logits. The settings are fields, not module switches.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import platform
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from . import lowp
from .errors import MagnetError, first_line
from .transformer import activation_dtype

log = logging.getLogger("magnet")

UNIT_CFG_TOLERANCE = 1e-5


GRAPHS_ENV = "MAGNET_CUDA_GRAPHS"


def graphs_allowed_by_env() -> bool:
    """False when the environment variable MAGNET_CUDA_GRAPHS is 0 / false / off / no (read on every
    generation, so it can be set at any time)."""
    return os.environ.get(GRAPHS_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


@dataclass(frozen=True)
class FastPathSettings:
    """How the decoding loop runs its forward (none of it changes the exact mode's result).

    prune_on_cpu: compute only the positions whose logits a step uses (CPU; the shapes vary per step).
    cuda_graphs: on CUDA, replay each stage's fixed-shape forward from a CUDA graph (also off when
        $MAGNET_CUDA_GRAPHS is 0, or once a graph of the model failed its check: see `GraphState`).
    graph_min_steps: capture a stage only when it has at least this many steps (its first step runs
        eagerly, a capture costs about one more, and every further step saves most of the launch time).
    verify_graphs: compare the first replay of each captured shape with an eager forward; a mismatch
        turns the model's graphs off (with one warning) and the eager result is used.
    static_steps_on_cpu: run the CUDA-graph bookkeeping (static buffers, no pruning, the capture policy,
        the check and the fallback) eagerly on the CPU (tests).
    int8_reduce_range: int8 activations in 7 bits (PyTorch's default for fbgemm): with 8 bits, the AVX2
        kernel's int16 pair sums saturate on this model's layer inputs (GELU outputs are one-sided), and
        the logits' relative error of the real-size small model went from 3.5-4% to 9-11%
        (scripts/fast_quality.py), at the same speed.
    bf16_attention: with fast mode's bf16 linears, self-attention reads q/k/v in bf16 (SDPA's CPU kernel
        keeps its scores, softmax and sums in float32): 2.4x faster than float32 attention here, for a
        logit error of the same size as the linears' own (scripts/fast_quality.py).
    """
    prune_on_cpu: bool = True
    cuda_graphs: bool = True
    graph_min_steps: int = 4
    verify_graphs: bool = True
    static_steps_on_cpu: bool = False
    int8_reduce_range: bool = True
    bf16_attention: bool = True


DEFAULT_SETTINGS = FastPathSettings()


# -- oneDNN, bf16 and int8 linears; which one fast mode uses ---------------------------------------

@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """Whether oneDNN's inner product runs here (probed once). On x86 CPUs it is 15-30% faster than
    the default fp32 GEMM for this model's shapes, on the same dense weights (no packed copy)."""
    try:
        x, w = torch.ones(3, 8), torch.ones(4, 8)
        return bool(torch.backends.mkldnn.is_available()) and torch.equal(
            torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), F.linear(x, w))
    except Exception:       # an old torch, a build without oneDNN, an unsupported CPU
        return False


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, computed by oneDNN for fp32 on the CPU when nothing needs gradients (same numbers up to
    float rounding: the products are summed in another order)."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)) and onednn_available()):
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


def plain_linear(x, w, b):
    return F.linear(x, w, b)


@functools.lru_cache(maxsize=None)
def cpu_features() -> dict:
    """What this CPU offers fast mode: AMX (bf16 and int8 tiles), avx512_bf16, VNNI (int8 dot products),
    AVX2, Arm's BF16 / I8MM, from /proc/cpuinfo (Linux; elsewhere these read False), plus the widest
    vector code torch's own CPU kernels use here and the machine's architecture."""
    flags: set = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:                                  # torch < 2.1
        capability = "unknown"
    return {"amx_bf16": "amx_bf16" in flags and "amx_tile" in flags, "amx_int8": "amx_int8" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "vnni": bool(flags & {"avx512_vnni", "avx_vnni"}),
            "avx2": "avx2" in flags, "arm_bf16": "bf16" in flags, "arm_i8mm": "i8mm" in flags,
            "torch_capability": capability, "machine": platform.machine()}


def cpu_features_text(features: dict | None = None) -> str:
    """One line: the features fast mode cares about that this CPU has (and the torch kernels' level)."""
    f = cpu_features() if features is None else features
    names = [("amx_bf16", "AMX-BF16"), ("amx_int8", "AMX-INT8"), ("avx512_bf16", "avx512_bf16"), ("vnni", "VNNI"),
             ("avx2", "AVX2"), ("arm_bf16", "Arm BF16"), ("arm_i8mm", "Arm I8MM")]
    have = [label for key, label in names if f.get(key)]
    return (f"{' '.join(have) if have else 'none of AMX/avx512_bf16/VNNI/AVX2'} "
            f"({f.get('machine', '?')}, torch CPU kernels {f.get('torch_capability', '?')})")


class Int8Linear:
    """A linear layer with int8 weights (per output channel scales) and int8 activations quantized on
    the fly per call, per tensor (fbgemm's dynamic quantization on x86, qnnpack on Arm): about 1.7x the
    speed of oneDNN fp32 on an AVX2 CPU, at about 2% relative error per layer output. 1 byte per weight.
    `reduce_range`: see `FastPathSettings.int8_reduce_range`."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, reduce_range: bool = True):
        w = w.detach().float().cpu().contiguous()
        lo, hi = torch.aminmax(w, dim=1)                  # no full-size |w| temporary
        scale = (torch.maximum(-lo, hi).clamp_min(1e-12) / 127).double()
        with warnings.catch_warnings():       # the quantized tensor API is deprecated, the ops are not gone
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(q, None if b is None else b.detach().float().cpu())
        self.reduce_range = reduce_range
        self.nbytes = w.numel() + (0 if b is None else 4 * b.numel()) + 12 * w.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.contiguous(), self.packed, self.reduce_range)


class Bf16Linear:
    """A linear layer on bf16 weights and activations (oneDNN: AMX tiles or avx512_bf16 dot products, with
    float32 accumulation). The input is rounded to bf16; the output is bf16 (the caller adds it to the
    float32 residual stream, or converts it). 2 bytes per weight; about 0.4% relative error per output."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None):
        self.w = w.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
        self.b = None if b is None else b.detach().to(device="cpu", dtype=torch.bfloat16)
        self.nbytes = 2 * self.w.numel() + (0 if self.b is None else 2 * self.b.numel())
        self.fused_gelu = fused_gelu_available()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return bf16_rows(x, lambda rows: F.linear(rows, self.w, self.b))


ROW_BUCKET = 64
_rows = threading.local()          # .pruned: whether the layer being computed runs on pruned positions


def bf16_rows(x: torch.Tensor, f) -> torch.Tensor:
    """f applied to the rows of x [..., D] in bf16. On pruned positions, whose count changes from step to step,
    the rows are padded with zero rows to a multiple of ROW_BUCKET: oneDNN makes and keeps a kernel for every
    row count it meets, and pruned steps meet hundreds (each kept kernel costs memory: the process grew ~15 MB
    per step without the buckets); the padding rows are dropped. Unpruned layers keep one row count per
    generation and are not padded."""
    lead, d = x.shape[:-1], x.shape[-1]
    n = x.numel() // d if d else 0
    padded = -(-n // ROW_BUCKET) * ROW_BUCKET if getattr(_rows, "pruned", True) else n
    if padded == n:
        return f(x.reshape(n, d).to(torch.bfloat16)).view(*lead, -1)
    rows = x.new_empty((padded, d), dtype=torch.bfloat16)
    rows[:n].copy_(x.reshape(n, d))                    # the conversion to bf16, as .to() would do it
    rows[n:].zero_()
    return f(rows)[:n].view(*lead, -1)


@functools.lru_cache(maxsize=None)
def fused_gelu_available() -> bool:
    """Whether oneDNN computes a bf16 linear layer followed by the exact (erf) GELU in one call here, within
    bf16 rounding of the two steps (probed once)."""
    try:
        x, w = torch.linspace(-2, 2, 64).view(4, 16).bfloat16(), torch.linspace(1, -1, 128).view(8, 16).bfloat16()
        y = torch.ops.mkldnn._linear_pointwise(x, w, None, "gelu", [], "none").float()
        return bool(torch.allclose(y, F.gelu(F.linear(x.float(), w.float())), rtol=2e-2, atol=2e-2))
    except Exception:
        return False


def _runs(make) -> bool:
    """Whether a linear layer made by make(w, b) runs here and is within 3% of float32 on a small product."""
    try:
        x, w = torch.linspace(-1, 1, 64).view(4, 16), torch.linspace(1, -1, 128).view(8, 16)
        y = make(w, None)(x).float()
        return y.shape == (4, 8) and bool(torch.allclose(y, F.linear(x, w), rtol=3e-2, atol=3e-2))
    except Exception:       # a build without the kernels, an unsupported CPU
        return False


@functools.lru_cache(maxsize=None)
def int8_available() -> bool:
    """Whether dynamic int8 linear layers run on this CPU (fbgemm on x86, qnnpack on Arm); probed once."""
    return _runs(Int8Linear)


@functools.lru_cache(maxsize=None)
def bf16_available() -> bool:
    """Whether bf16 linear layers run on this CPU at all (probed once; without bf16 instructions torch
    emulates them, correctly and slowly: see `bf16_accelerated`)."""
    return _runs(Bf16Linear)


@functools.lru_cache(maxsize=None)
def bf16_accelerated() -> bool:
    """Whether torch's oneDNN runs bf16 products in hardware here (avx512_bf16 / AMX on x86, BF16 on Arm):
    only then is bf16 worth measuring as a fast-mode candidate."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        hardware = bool(probe()) if probe is not None else False
    except Exception:
        hardware = False
    return hardware and bf16_available()


LINEARS = ("bf16", "int8", "fp32")
LINEARS_ENV = "MAGNET_FAST_LINEARS"
# rows x in -> out of the measurement: a feed-forward pair of the small releases at 256 positions
MEASURE_SHAPES = ((256, 1024, 4096), (256, 4096, 1024))
# a low-precision path is chosen only when it beats float32 by this factor (its rounding is not free)
MIN_GAIN = 1.15


def _linear_for(path: str, w: torch.Tensor):
    if path == "bf16":
        return Bf16Linear(w, None)
    if path == "int8":
        return Int8Linear(w, None)
    return lambda x: linear(x, w)


def measure_linears(paths=LINEARS, rounds: int = 3) -> dict:
    """GFLOP/s of each path's linear layer on `MEASURE_SHAPES` (torch's current thread count; about 0.1 s per
    path): the quantization, conversion and packing overheads included. The paths take turns, round after
    round, and each keeps its best time per shape, so a passing load slows them alike."""
    g = torch.Generator().manual_seed(0)
    shapes = [(torch.randn(rows, n_in, generator=g), torch.randn(n_out, n_in, generator=g) * 0.02)
              for rows, n_in, n_out in MEASURE_SHAPES]
    best: dict = {}
    with torch.inference_mode():
        layers = {path: [_linear_for(path, w) for _, w in shapes] for path in paths}
        for _ in range(rounds + 1):                    # the first round warms up
            for path in paths:
                for i, (x, _) in enumerate(shapes):
                    t = time.perf_counter()
                    layers[path][i](x)
                    best[path, i] = min(best.get((path, i), math.inf), time.perf_counter() - t)
    flop = sum(2 * x.shape[0] * x.shape[1] * w.shape[0] for x, w in shapes)
    return {path: flop / max(sum(best[path, i] for i in range(len(shapes))), 1e-9) / 1e9 for path in paths}


def pick_linears(rates: dict) -> str:
    """The path with the highest measured rate, if it beats float32 by `MIN_GAIN`; else float32."""
    best = max(rates, key=rates.get)
    if best != "fp32" and rates[best] < MIN_GAIN * rates.get("fp32", 0.0):
        return "fp32"
    return best


@dataclass(frozen=True)
class LinearsChoice:
    """Which linear layers fast mode runs on the CPU: `path` ('bf16', 'int8' or 'fp32'), `how` it was chosen
    and the measured rates (GFLOP/s per candidate; empty when nothing was measured)."""
    path: str
    how: str
    rates: dict = field(default_factory=dict)

    def describe(self) -> str:
        rates = ", ".join(f"{p} {r:.0f}" for p, r in sorted(self.rates.items(), key=lambda kv: -kv[1]))
        return f"{self.path} linears ({self.how}{'; GFLOP/s ' + rates if rates else ''})"


def decide_linears(features: dict, bf16: bool, int8: bool, measure) -> LinearsChoice:
    """The fast-mode path for a CPU with `features` (`cpu_features`), where torch runs bf16 in hardware
    (`bf16`) and int8 kernels (`int8`); `measure(paths)` gives GFLOP/s per candidate. The features decide
    where they are clear: AMX's bf16 tiles beat the int8 kernels (which use VNNI, not AMX) by about 1.6x and
    float32 by about 5x; an x86 CPU without bf16 instructions runs int8 at about 1.7x float32. Elsewhere
    (avx512_bf16 without AMX, Arm, CPUs whose features cannot be read) a short measurement decides."""
    if bf16 and features.get("amx_bf16"):
        return LinearsChoice("bf16", "AMX-BF16 on this CPU")
    candidates = ["fp32"] + (["bf16"] if bf16 else []) + (["int8"] if int8 else [])
    if len(candidates) == 1:
        return LinearsChoice("fp32", "no bf16 or int8 kernels here")
    if candidates == ["fp32", "int8"] and (features.get("vnni") or features.get("avx2")):
        return LinearsChoice("int8", "no bf16 instructions; int8 on " + ("VNNI" if features.get("vnni") else "AVX2"))
    rates = measure(candidates)
    return LinearsChoice(pick_linears(rates), f"measured on {torch.get_num_threads()} threads", rates)


@functools.lru_cache(maxsize=None)
def _measured_choice(threads: int) -> LinearsChoice:
    choice = decide_linears(cpu_features(), bf16_accelerated(), int8_available(), measure_linears)
    log.info("MAGNeT fast mode: %s; CPU: %s", choice.describe(), cpu_features_text())
    return choice


def choose_linears(setting: str = "auto") -> LinearsChoice:
    """The linear layers of fast mode on this CPU. `setting` (`FastMode.linears`): 'auto' = the environment
    variable MAGNET_FAST_LINEARS if set, else the fastest path for this CPU (`decide_linears`: from its
    features, or a short measurement; once per thread count); 'bf16', 'int8' or 'fp32' force a path (a
    path this torch cannot run falls back to the automatic choice, with a warning)."""
    value = setting
    if value == "auto":
        value = os.environ.get(LINEARS_ENV, "").strip().lower() or "auto"
        if value not in ("auto",) + LINEARS:
            raise MagnetError(f"{LINEARS_ENV}={os.environ.get(LINEARS_ENV)!r} is not a fast-mode path: set it to "
                              f"auto, bf16, int8 or fp32, or unset it.")
    if value == "auto":
        return _measured_choice(torch.get_num_threads())
    if value not in LINEARS:
        raise MagnetError(f"FastMode.linears {setting!r} must be one of auto, {', '.join(LINEARS)}.")
    how = "forced" if setting != "auto" else f"forced by {LINEARS_ENV}"
    if (value == "int8" and not int8_available()) or (value == "bf16" and not bf16_available()):
        auto = _measured_choice(torch.get_num_threads())
        log.warning("MAGNeT fast mode: %s linears were asked for, but this torch cannot run them here; using %s",
                    value, auto.path)
        return LinearsChoice(auto.path, f"{value} unavailable here", auto.rates)
    return LinearsChoice(value, how)


def fast_linears(fast, device: torch.device, dtype: torch.dtype = torch.float32) -> str | None:
    """The low-precision linear layers of fast mode (`FastMode`, or None/False for exact mode) for an LM on
    `device` with weights of `dtype`: 'bf16' or 'int8' on the CPU with float32 weights, else None (float32
    linears; fp16/bf16 weights on the CPU run their own dtype, CUDA runs autocast)."""
    if not (fast and device.type == "cpu" and dtype == torch.float32):
        return None
    path = choose_linears(getattr(fast, "linears", "auto")).path
    return None if path == "fp32" else path


class ExactLinears:
    """One layer's linear maps on its own weights (fp32 on the CPU through oneDNN, see `linear`).

    `pruned_in` / `pruned_out`: the layer's input / output rows are a subset of the positions, whose
    count varies from step to step; the maps on those rows then use F.linear: oneDNN keeps a compiled
    kernel per shape in a cache of up to 1024, and hundreds of shapes would cost hundreds of MB (pruned
    rows are a small part of the work)."""
    __slots__ = ("sa", "ca", "l1", "l2", "dim", "f_in", "f")
    split = True             # q and k/v can be projected separately (slices of the packed weight)

    def __init__(self, layer, pruned_in: bool = False, pruned_out: bool = False):
        self.sa, self.ca, self.l1, self.l2 = layer.self_attn, layer.cross_attention, layer.linear1, layer.linear2
        self.dim = self.sa.in_proj_weight.shape[1]
        self.f_in = plain_linear if pruned_in else linear                 # on the input rows (q/k/v, k/v)
        self.f = plain_linear if pruned_in or pruned_out else linear      # on the output rows

    def qkv(self, x):
        return self.f_in(x, self.sa.in_proj_weight, self.sa.in_proj_bias)

    def q(self, x):
        b = self.sa.in_proj_bias
        return self.f(x, self.sa.in_proj_weight[:self.dim], None if b is None else b[:self.dim])

    def kv(self, x):
        b = self.sa.in_proj_bias
        return self.f_in(x, self.sa.in_proj_weight[self.dim:], None if b is None else b[self.dim:])

    def out(self, x):
        return self.f(x, self.sa.out_proj.weight, self.sa.out_proj.bias)

    def cq(self, x):
        b = self.ca.in_proj_bias
        return self.f(x, self.ca.in_proj_weight[:self.dim], None if b is None else b[:self.dim])

    def cout(self, x):
        return self.f(x, self.ca.out_proj.weight, self.ca.out_proj.bias)

    def fc1(self, x):
        return self.f(x, self.l1.weight, self.l1.bias)

    def fc2(self, x):
        return self.f(x, self.l2.weight, self.l2.bias)

    def fc1_gelu(self, x):
        return torch.ops.aten.gelu_(self.fc1(x))


def layer_sources(layer) -> tuple:
    """The weights (and biases) fast mode's copy of one layer is made from."""
    sa, ca = layer.self_attn, layer.cross_attention
    ws = (sa.in_proj_weight, sa.in_proj_bias, sa.out_proj.weight, sa.out_proj.bias, ca.in_proj_weight,
          ca.in_proj_bias, ca.out_proj.weight, ca.out_proj.bias, layer.linear1.weight, layer.linear1.bias,
          layer.linear2.weight, layer.linear2.bias)
    return tuple(w for w in ws if w is not None)


def replaced_weights(layer) -> tuple:
    """The weights the copy replaces, held as float16 records while it exists (`magnet.lowp`). The
    cross-attention's packed projection stays as it is (the copy holds its query rows): its key/value rows
    make each generation's text memory, which would otherwise need float32 temporaries of it every time."""
    sa = layer.self_attn
    return (sa.in_proj_weight, sa.out_proj.weight, layer.cross_attention.out_proj.weight, layer.linear1.weight,
            layer.linear2.weight)


class LowPrecisionLayer:
    """One layer's linear maps on a low-precision copy of its weights (`path` 'bf16' or 'int8'), made from
    the exact values (records included). The cross-attention's q comes back in float32 (the text memory is
    float32), and so does self-attention's q/k/v unless `bf16_attention` (bf16 path: SDPA then reads bf16 and
    keeps its softmax in float32); the other maps return what their kernel gives, which the float32 residual
    stream absorbs (bf16: the feed-forward's hidden layer and its GELU stay bf16)."""
    split = False            # one packed q/k/v copy only

    def __init__(self, layer, path: str, reduce_range: bool = True, bf16_attention: bool = True):
        sa, ca = layer.self_attn, layer.cross_attention
        d = sa.in_proj_weight.shape[1]
        ex = lowp.exact_value

        def make(w, b):
            return Int8Linear(w, b, reduce_range) if path == "int8" else Bf16Linear(w, b)
        cw, cb = ex(ca.in_proj_weight), ca.in_proj_bias
        self._maps = {"qkv": make(ex(sa.in_proj_weight), sa.in_proj_bias),
                      "out": make(ex(sa.out_proj.weight), sa.out_proj.bias),
                      "cq": make(cw[:d], None if cb is None else cb[:d]),
                      "cout": make(ex(ca.out_proj.weight), ca.out_proj.bias),
                      "fc1": make(ex(layer.linear1.weight), layer.linear1.bias),
                      "fc2": make(ex(layer.linear2.weight), layer.linear2.bias)}
        m = self._maps
        self.out, self.cout, self.fc1, self.fc2 = m["out"], m["cout"], m["fc1"], m["fc2"]
        if path == "bf16" and bf16_attention:
            self.qkv = m["qkv"]

    def qkv(self, x):
        return self._maps["qkv"](x).float()

    def fc1_gelu(self, x):
        fc1 = self._maps["fc1"]
        if isinstance(fc1, Bf16Linear) and fc1.fused_gelu:          # GELU as oneDNN's post-op: one pass less
            return bf16_rows(x, lambda rows: torch.ops.mkldnn._linear_pointwise(rows, fc1.w, fc1.b, "gelu", [], "none"))
        return torch.ops.aten.gelu_(fc1(x))

    def cq(self, x):
        return self._maps["cq"](x).float()

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self._maps.values())


class FastLinears:
    """Fast mode's one low-precision copy of every transformer layer's linear maps (CPU), `path` 'bf16' or
    'int8'. Embeddings, norms, the output heads and the text projection stay float32. Making it turns each
    weight it replaces into a float16 record where that is lossless (`magnet.lowp`; `recorded` bytes of
    float32 freed), so fast mode needs no more memory than exact mode; weights float16 cannot hold stay
    float32 beside the copy (`kept` bytes). Any exact use restores the records and drops the copy."""

    def __init__(self, lm, path: str = "int8", reduce_range: bool = True, bf16_attention: bool = True):
        if path not in ("bf16", "int8"):
            raise ValueError(f"no low-precision copy for path {path!r}")
        self.path, self.layers, self.recorded, self.kept = path, [], 0, 0
        for layer in lm.transformer.layers:
            self.layers.append(LowPrecisionLayer(layer, path, reduce_range, bf16_attention))
            for w in replaced_weights(layer):
                size = w.numel() * 4
                if lowp.record(w):
                    self.recorded += size
                elif w.dtype == torch.float32:
                    self.kept += size
        self._key = self._fingerprint(lm, path, reduce_range, bf16_attention)
        lowp.release_freed_memory()
        if self.kept:
            log.info("MAGNeT fast mode: %.1f MB of float32 weights are not float16 values (a merged LoRA, a "
                     "float32 fine-tune) and stay beside the %s copy, so that exact mode stays exact",
                     self.kept / 2 ** 20, path)

    @staticmethod
    def _fingerprint(lm, path: str, reduce_range: bool, bf16_attention: bool):
        """Every weight the copy was made from: a weight replaced (ComfyUI's LoRA patches swap the parameter
        of any one linear) or changed in place (its version counter), or a record restored, makes the copy
        stale. Weights made under inference_mode (ComfyUI runs nodes in it) have no version counter: their
        data pointer still counts."""
        def key(w):
            return (w.data_ptr(), w.dtype, None if w.is_inference() else w._version)
        w0 = lm.transformer.layers[0].linear2.bias
        weights = tuple(key(w) for layer in lm.transformer.layers for w in layer_sources(layer))
        return (None if w0 is None else w0.device, weights, path, reduce_range, bf16_attention)

    def matches(self, lm, path: str = "int8", reduce_range: bool = True, bf16_attention: bool = True) -> bool:
        return self._key == self._fingerprint(lm, path, reduce_range, bf16_attention)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

_fast_copies: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def fast_copy(lm, path: str = "int8", reduce_range: bool = True, bf16_attention: bool = True) -> FastLinears:
    """Fast mode's low-precision copy of `lm`'s transformer linear layers, made on first use and kept for as
    long as the LM lives and its weights do not change (`FastLinears`): 14 * dim^2 weights per layer, 1 byte
    each in int8 (0.34 GiB for the small releases), 2 in bf16, while the float32 weights it replaces are held
    in float16 (`magnet.lowp`). Remade when the weights or the path change (the old copy goes first)."""
    copy = _fast_copies.get(lm)
    if copy is None or not copy.matches(lm, path, reduce_range, bf16_attention):
        _fast_copies.pop(lm, None)
        copy = _fast_copies[lm] = FastLinears(lm, path, reduce_range, bf16_attention)
    return copy


def drop_fast_copy(lm) -> None:
    """Free the low-precision copy of `lm` and restore its exact weights (the copy is remade on the next fast
    generation)."""
    _fast_copies.pop(lm, None)
    lowp.restore(lm)


lowp.on_restore(lambda module: _fast_copies.pop(module, None))


# -- position pruning and the band ------------------------------------------------------------------

def dilate(positions: torch.Tensor, width: int) -> torch.Tensor:
    """bool [T] -> bool [T]: True within `width` positions of a True."""
    if width <= 0:
        return positions
    x = positions.to(torch.float32).view(1, 1, -1)
    return F.max_pool1d(x, 2 * width + 1, stride=1, padding=width).view(-1) > 0


def active_positions(wanted: torch.Tensor | None, num_layers: int, band: int | None) -> list:
    """Which positions each layer must compute so that the last layer's outputs are right at `wanted`
    (bool [T]; None = all): `act[l]` = sorted positions (LongTensor) or None for all, for l = -1..L-1
    (index l + 1 in the returned list; act[-1] = the inputs of layer 0).

    The last layer needs its outputs only at `wanted`. A layer with full attention needs every position
    of its input; with a band of half-width `band` (MAGNeT's codebooks >= 1) only positions within
    `band` of a wanted output. So with the band the set grows by `band` per layer going down."""
    acts: list = [None] * (num_layers + 1)
    cur = wanted
    for i in range(num_layers, -1, -1):
        if cur is None or bool(cur.all()):
            break
        acts[i] = cur.nonzero().view(-1)
        cur = dilate(cur, band) if band is not None else None
    return acts


_BAND_BLOCK = 20
_band_blocks_cache: dict = {}


def band_blocks(n: int, pos: torch.Tensor | None, width: int, device, dtype):
    """Blocks of the band attention over n rows at sorted positions `pos` (None: 0..n-1).

    Queries go in blocks of C consecutive rows; block b reads the L = C + 2*width keys around it (the
    window is moved inside [0, n) at the ends, so it never repeats a key), and an additive mask [nb, C, L]
    keeps exactly the keys within `width` positions. Any key of a query at row j lies in rows
    [j - width, j + width] (positions are increasing), so it is in the window. Cached per length when
    the rows are 0..n-1."""
    key = (n, width, str(device), dtype) if pos is None else None
    if key is not None and key in _band_blocks_cache:
        return _band_blocks_cache[key]
    C = n if n <= _BAND_BLOCK + 2 * width else _BAND_BLOCK
    L = min(C + 2 * width, n)
    nb = -(-n // C)
    starts = (torch.arange(nb) * C - width).clamp(0, n - L)
    kidx = starts.view(-1, 1) + torch.arange(L).view(1, -1)                      # [nb, L]
    qidx = torch.arange(nb * C).clamp(max=n - 1).view(nb, C)                      # [nb, C]
    p = torch.arange(n) if pos is None else pos.cpu()
    ok = (p[qidx].unsqueeze(-1) - p[kidx].unsqueeze(1)).abs() <= width            # [nb, C, L]
    bias = torch.zeros(ok.shape, dtype=dtype).masked_fill_(~ok, float("-inf")).to(device)
    blocks = (kidx.view(-1).to(device), None if nb * C == n else qidx.view(-1).to(device), bias, nb, C, L)
    if key is not None:
        if len(_band_blocks_cache) > 8:
            _band_blocks_cache.clear()
        _band_blocks_cache[key] = blocks
    return blocks


def band_attention(q, k, v, width: int, pos: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q, k, v [R, H, n, D] where a row attends only the rows within `width` positions
    (`pos`: the rows' sorted positions, None = 0..n-1): the same numbers as SDPA with the boolean band
    mask, at about (C + 2 * width) / n of its cost: no [n, n] matrix is formed."""
    R, H, n, D = q.shape
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):           # scores and softmax in float32, as SDPA's kernels do
        q, k, v = q.float(), k.float(), v.float()
    kidx, qidx, bias, nb, C, L = band_blocks(n, pos, width, q.device, q.dtype)
    q = q * (1.0 / math.sqrt(D))
    if qidx is not None:
        q = q.index_select(2, qidx)
    kw = k.index_select(2, kidx).view(R, H, nb, L, D)
    vw = v.index_select(2, kidx).view(R, H, nb, L, D)
    scores = torch.matmul(q.view(R, H, nb, C, D), kw.transpose(-1, -2)).add_(bias)
    out = torch.matmul(torch.softmax(scores, dim=-1), vw).view(R, H, nb * C, D)
    return (out[:, :, :n] if qidx is not None else out).to(dtype)


# -- the forward ------------------------------------------------------------------------------------

def parallel_forward(lm, codes, mem, stage: int, heads=None, wanted: torch.Tensor | None = None,
                     copy: FastLinears | None = None) -> torch.Tensor:
    """MAGNeT's forward (pre-norm, non-causal): the same function as `LM.forward`, without the work that
    cannot change its result (see the module docstring). codes [b, K, T] -> logits [B, len(heads), T, card];
    with `wanted` (bool [T]) the logits of those positions only, [B, len(heads), wanted.sum(), card].
    `copy`: the layers' linear maps run on this low-precision copy (fast mode) instead of the weights."""
    cfg, layers = lm.cfg, lm.transformer.layers
    R, H = mem.batch, cfg.num_heads
    band = cfg.subcodes_context if stage > 0 and cfg.subcodes_context >= 0 else None
    x = lm.embed(codes)                                                        # [b, T, D]
    T = x.shape[1]
    if x.shape[0] != R and R % x.shape[0]:
        raise ValueError(f"codes batch {x.shape[0]} does not divide the memory's {R} rows")
    acts = active_positions(None if wanted is None else wanted.to(torch.bool).cpu(), len(layers), band)
    n_heads = cfg.n_q if heads is None else len(heads)
    if acts[-1] is not None and acts[-1].numel() == 0:             # nothing wanted
        return x.new_zeros((R, n_heads, 0, cfg.card))
    if acts[0] is not None:
        x = x[:, acts[0].to(x.device)]
    band_mask = None
    if band is not None and x.device.type != "cpu" and acts[0] is None:
        band_mask = lm.attn_mask(stage, T, x.device, activation_dtype(x.device, lm.linears[0].weight.dtype))
        hold(band_mask)                                              # a captured graph reads it
    for i, layer in enumerate(layers):
        pos_in, pos_out = acts[i], acts[i + 1]
        out_rows = None                    # rows of this layer's input that it must output (None: all)
        if pos_out is not None:
            out_rows = pos_out if pos_in is None else torch.searchsorted(pos_in, pos_out)
            out_rows = out_rows.to(x.device)
        lin = copy.layers[i] if copy is not None else ExactLinears(layer, pos_in is not None, out_rows is not None)
        _rows.pruned = pos_in is not None or out_rows is not None        # bf16_rows pads only pruned rows
        # self-attention (rows that share their codes share it in the first layer)
        h = layer.norm1(x)
        if band is None and out_rows is not None and lin.split:   # full attention: keys everywhere, queries where wanted
            kv = lin.kv(h)
            q = lin.q(h.index_select(1, out_rows))
            k, v = kv.view(*kv.shape[:2], 2, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
            a = F.scaled_dot_product_attention(q.view(*q.shape[:2], H, -1).transpose(1, 2), k, v)
        else:
            qkv = lin.qkv(h)
            q, k, v = qkv.view(*qkv.shape[:2], 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
            if band is None:
                a = F.scaled_dot_product_attention(q, k, v)
            elif band_mask is not None and pos_in is None:
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask)
            else:
                a = band_attention(q, k, v, band, pos_in)
            if out_rows is not None:
                a = a.index_select(2, out_rows)
        res = x if out_rows is None else x.index_select(1, out_rows)
        x = res + lin.out(a.transpose(1, 2).reshape(res.shape))
        if x.shape[0] != R:
            x = x.repeat(R // x.shape[0], 1, 1)
        # cross-attention to the text (rows with a memory only: the others add exactly zero)
        x_text = x if mem.rows == R else x[:mem.rows]
        h = layer.norm_cross(x_text)
        mk, mv = mem.kv[i]
        q = lin.cq(h)
        a = F.scaled_dot_product_attention(q.view(*q.shape[:2], H, -1).transpose(1, 2), mk, mv)
        x_text += lin.cout(a.transpose(1, 2).reshape(x_text.shape))
        # feed-forward
        h = layer.norm2(x)
        x += lin.fc2(lin.fc1_gelu(h))
    x = lm.out_norm(x)
    heads = range(cfg.n_q) if heads is None else heads
    head = plain_linear if acts[-1] is not None else linear
    return torch.stack([head(x, lm.linears[k].weight, lm.linears[k].bias) for k in heads], dim=1)


@dataclass(frozen=True)
class StepPlan:
    """What `LM.forward(..., fastpath=plan)` hands to `parallel_forward`: the positions whose logits are
    wanted (bool [T], None = all) and fast mode's low-precision linears ('bf16', 'int8'; None = the
    weights themselves, exactly)."""
    wanted: torch.Tensor | None = None
    linears: str | None = None
    int8_reduce_range: bool = True
    bf16_attention: bool = True

    def run(self, lm, codes, mem, stage: int, heads) -> torch.Tensor:
        copy = fast_copy(lm, self.linears, self.int8_reduce_range, self.bf16_attention) if self.linears else None
        return parallel_forward(lm, codes, mem, stage, heads, self.wanted, copy)


# -- static buffers and CUDA graphs -----------------------------------------------------------------

DOCTOR_HINT = "python -m magnet doctor --device cuda"

_held = threading.local()


def hold(t: torch.Tensor) -> None:
    """Record a tensor the forward reads but does not own (the cached band mask) while a `StaticStep` is
    being made: the step keeps it alive, since a captured graph reads it by address."""
    held = getattr(_held, "tensors", None)
    if held is not None:
        held.append(t)


class StaticStep:
    """One stage's forward on static buffers: `step(codes)` copies the codes (and, when the step is reused
    for a new text memory, the memory's keys and values) into its input buffers, replays the forward and
    returns its output buffer (valid until the next call).

    On CUDA (`graph=True`) the forward is captured once in a CUDA graph and replayed: within a stage every
    step has the same shapes and the same text memory, so only the codes change, and one replay replaces
    hundreds of kernel launches. `first` is the first step's codes: that step runs eagerly and doubles as
    the warm-up capture needs. Capture and replay run under the device's own context and streams (the
    model may be on another GPU than the current one), with `capture_begin`/`capture_end` on a side
    stream (no synchronize / garbage collection / cache flush per capture, as `torch.cuda.graph` does)
    and errors from other threads' CUDA calls left to them (`capture_error_mode="thread_local"`).

    With `graph=False` the forward is re-run eagerly into the same output buffer, which exercises the same
    bookkeeping on any device (the tests run it on the CPU)."""

    def __init__(self, forward: Callable[[torch.Tensor, object], torch.Tensor], first: torch.Tensor, mem,
                 graph: bool):
        self.forward, self.graph, self.mem = forward, None, mem
        self.codes = first.clone()
        self.error: Exception | None = None      # why the capture failed (`first` is still the first step's result)
        self.held: list = []
        _held.tensors = self.held
        try:
            if graph:
                dev = first.device
                with torch.cuda.device(dev):
                    side = torch.cuda.Stream(device=dev)
                    side.wait_stream(torch.cuda.current_stream(dev))
                    with torch.cuda.stream(side):
                        self.first = forward(self.codes, self.mem)     # warm-up = the first step's result
                    torch.cuda.current_stream(dev).wait_stream(side)
                    try:
                        self.out = self._capture(side)
                    except Exception as exc:     # out of memory, a CUDA call that cannot be captured, ...
                        self.error = exc
            else:
                self.first = forward(self.codes, self.mem)
                self.out = torch.empty_like(self.first)
        finally:
            _held.tensors = None

    def _capture(self, side) -> torch.Tensor:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side), _no_autocast_cache():
            try:
                g.capture_begin(capture_error_mode="thread_local")
            except TypeError:                                   # torch < 2.1
                g.capture_begin()
            try:
                out = self.forward(self.codes, self.mem)
            finally:
                g.capture_end()
        torch.cuda.current_stream(self.codes.device).wait_stream(side)
        self.graph = g
        return out

    def load(self, codes: torch.Tensor, mem=None) -> None:
        """Copy the inputs of the next replay into the static buffers (`mem`: a new memory of the same shapes)."""
        self.codes.copy_(codes)
        if mem is not None and mem is not self.mem:
            for (k, v), (nk, nv) in zip(self.mem.kv, mem.kv):
                k.copy_(nk)
                v.copy_(nv)

    def replay(self) -> torch.Tensor:
        if self.graph is not None:
            with torch.cuda.device(self.codes.device):
                self.graph.replay()
        else:
            self.out.copy_(self.forward(self.codes, self.mem))
        return self.out

    def __call__(self, codes: torch.Tensor, mem=None) -> torch.Tensor:
        self.load(codes, mem)
        return self.replay()


def _no_autocast_cache():
    """Autocast must not cache weight casts inside a graph capture (the cache dies with the context)."""
    try:
        enabled, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    except (TypeError, AttributeError):          # torch < 2.4
        enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
    return torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False)


class GraphState:
    """A model's CUDA graphs: whether they are on (`off`: why not), which shapes passed their check, and
    the last captured step of each stage, reused by the next window or generation of the same shapes
    while the model's weights have not moved (at most `keep` steps, the oldest dropped first; all of them,
    with the memory their graphs hold, at the first use after the weights moved)."""

    def __init__(self, keep: int = 8):
        self.off: str | None = None
        self.verified: set = set()
        self.steps: OrderedDict = OrderedDict()
        self.keep = keep

    def turn_off(self, why: str) -> None:
        if self.off is None:
            self.off = why
            self.steps.clear()
            log.warning("MAGNeT: CUDA graphs are now off for this model (%s); it runs eagerly, with the same "
                        "result. Run `%s` and include its output in a bug report; set %s=0 to skip graphs "
                        "from the start.", why, DOCTOR_HINT, GRAPHS_ENV)

    def get(self, key):
        weights = key[-1]
        if self.steps and next(reversed(self.steps))[-1] != weights:   # the model moved: every kept step is stale
            self.steps.clear()
        step = self.steps.get(key)
        if step is not None:
            self.steps.move_to_end(key)
        return step

    def put(self, key, step: StaticStep) -> None:
        self.steps[key] = step
        while len(self.steps) > self.keep:
            self.steps.popitem(last=False)


_graph_states: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def graph_state(model) -> GraphState:
    """The `GraphState` of a model (an LM module; for a wrapper such as the one that adds given codebooks,
    of the LM it wraps, `.lm`)."""
    owner = model if isinstance(model, torch.nn.Module) else getattr(model, "lm", model)
    state = _graph_states.get(owner)
    if state is None:
        state = _graph_states[owner] = GraphState()
    return state


def drop_graphs(model) -> None:
    """Free a model's kept CUDA graphs (they are captured again when needed)."""
    graph_state(model).steps.clear()


def _same(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether a replay's logits equal the eager forward's, up to the rounding of the dtype."""
    tol = 1e-4 if out.dtype == torch.float32 else 2e-2
    scale = max(1.0, float(ref.abs().amax())) if ref.numel() else 1.0
    return bool(out.shape == ref.shape and torch.isfinite(out).all() and (out - ref).abs().amax() <= tol * scale)


# -- one stage's forward ----------------------------------------------------------------------------

class StageForward:
    """The forward of one decoding stage: `logits(codes, used, coef)` -> (logits [rows, T, card] float32,
    guided), `guided` telling whether the rows are [conditional; null] to be mixed by guidance.

    `lm` is the LM (or anything called like it, e.g. a wrapper that adds codebooks); `mem` its text memory
    for the conditional and null rows when `guided`; `fast` the `FastMode` or None (exact mode). On the
    CPU, the logits at positions outside `used` (bool [B, T]: the positions the step samples and scores)
    are not computed and come back as zeros (`settings.prune_on_cpu`); they never reach the result, and
    keep the random stream of sampling the same as computing every position.

    On CUDA a stage of at least `settings.graph_min_steps` steps runs from a `StaticStep` (a CUDA graph),
    taken from the model's `GraphState` when one of the same shapes was captured before (the previous
    window of a long generation); its first replay of each shape is checked against the eager forward,
    and a failed capture or check turns the model's graphs off: the step's result is then the eager one."""

    def __init__(self, lm, mem, *, guided: bool, batch: int, stage: int, n_steps: int, fast=None,
                 settings: FastPathSettings = DEFAULT_SETTINGS):
        param = next(lm.parameters())
        device = param.device
        self.lm, self.mem, self.guided, self.stage = lm, mem, guided, stage
        self.settings = settings
        parallel = lm.cfg.norm_first and not lm.cfg.causal         # the forward that can prune and run int8
        self.linears = fast_linears(fast, device, param.dtype) if parallel else None
        self.reduce_range = settings.int8_reduce_range
        self.graph = device.type == "cuda"
        self.graphs = graph_state(lm)
        self.static = (parallel and n_steps > 1 and n_steps >= settings.graph_min_steps and self.graphs.off is None
                       and ((self.graph and settings.cuda_graphs and graphs_allowed_by_env())
                            or (device.type == "cpu" and settings.static_steps_on_cpu)))
        self.prune = parallel and settings.prune_on_cpu and device.type == "cpu" and not self.static   # fixed shapes
        self.parallel = parallel
        self.mem_cond = mem.cond_only(batch) if guided and fast and fast.skip_unit_cfg else None
        self._static_step: StaticStep | None = None

    def _forward(self, codes, mem, wanted=None):
        plan = (StepPlan(wanted, self.linears, self.reduce_range, self.settings.bf16_attention) if self.parallel
                else None)
        kw = {} if plan is None else {"fastpath": plan}
        return self.lm(codes, mem, stage=self.stage, heads=[self.stage], **kw)

    def _keys(self, codes: torch.Tensor) -> tuple[tuple, tuple]:
        """(shape key: what a replay's check covers, step key: what a kept step may be reused for). A kept
        step reads the weights, the band mask and the wrapper it was captured with by address: it is reused
        only by the same forward while every weight is where it was."""
        k0 = self.mem.kv[0][0] if self.mem.kv else None
        shape = (self.stage, tuple(codes.shape), self.mem.rows, self.mem.batch, self.linears,
                 None if k0 is None else (tuple(k0.shape), k0.dtype, str(k0.device)))
        weights = tuple(p.data_ptr() for p in self.lm.parameters())
        return shape, (shape, id(self.lm), weights)      # `weights` last: GraphState.get reads it

    def _static(self, codes: torch.Tensor) -> torch.Tensor | None:
        """The step's logits [rows, 1, T, card] from static buffers (a CUDA graph on CUDA), or None when the
        static path is off for this model (the caller then runs the step eagerly)."""
        step, first = self._static_step, None
        if step is None:
            shape_key, step_key = self._keys(codes)
            step = self.graphs.get(step_key)
            if step is None:
                step = StaticStep(lambda c, m: self._forward(c, m), codes, self.mem, graph=self.graph)
                if step.error is not None:
                    self.graphs.turn_off(f"capturing a CUDA graph failed: {first_line(step.error)}")
                    self.static = False
                    return step.first
                self.graphs.put(step_key, step)
                first = step.first
            self._static_step, self._shape_key = step, shape_key
            if first is not None:
                return first
            out = step(codes, self.mem)
        else:
            out = step(codes)
        if self.settings.verify_graphs and self._shape_key not in self.graphs.verified:
            ref = self._forward(codes, self.mem)
            if not _same(out, ref):
                self.graphs.turn_off("a graph replay differed from the eager forward")
                self.static = False
                return ref
            self.graphs.verified.add(self._shape_key)
        return out

    def logits(self, codes: torch.Tensor, used: torch.Tensor, coef: float) -> tuple[torch.Tensor, bool]:
        mem, guided = self.mem, self.guided
        if self.mem_cond is not None and abs(coef - 1.0) <= UNIT_CFG_TOLERANCE:    # fast mode: no null pass
            mem, guided = self.mem_cond, False
        if self.static and mem is self.mem and self.graphs.off is None:
            out = self._static(codes)
            if out is not None:
                return out[:, 0].float(), guided
        wanted = None
        if self.prune:
            wanted = used.any(dim=0)
            if bool(wanted.all()):
                wanted = None
        logits = self._forward(codes, mem, wanted)[:, 0].float()
        if wanted is not None:                                          # [rows, n, card] -> [rows, T, card]
            full = logits.new_zeros((logits.shape[0], codes.shape[-1], logits.shape[-1]))
            full[:, wanted] = logits
            logits = full
        return logits, guided
