"""The linear layers of MAGNeT's decoding on the CPU: exact (oneDNN float32) and fast mode's low precision.

- `linear`: F.linear, through oneDNN's inner product for float32 on the CPU (15-30% faster than the default
  GEMM for this model's shapes; the same numbers up to summation order). `ExactLinears` gives one layer's
  linear maps on its own weights that way.
- fast mode's low-precision layers: `Bf16Linear` (AMX / avx512_bf16) and `Int8Linear` (VNNI / AVX2, qnnpack
  on Arm); which one this CPU runs fastest (`choose_linears`: from its features (`cpu_features`), or measured
  once); and the one low-precision copy of an LM's transformer layers (`FastLinears`, `fast_copy`), whose
  float32 originals are held losslessly in float16 meanwhile (`magnet.lowp`), so that fast mode needs no more
  memory than exact mode.

The forward that uses them is `magnet.stage_forward.parallel_forward`.
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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import lowp
from .errors import MagnetError

log = logging.getLogger("magnet")

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
    `reduce_range`: see `magnet.stage_forward.DecodingSettings.int8_reduce_range`."""

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


def rows_pruned(pruned: bool) -> None:
    """Say whether the layer about to be computed (in this thread) runs on pruned positions, whose count
    changes from step to step (`bf16_rows` pads only those)."""
    _rows.pruned = pruned


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
