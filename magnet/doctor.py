"""`python -m magnet doctor`: what this machine runs, and whether it runs it right.

Three parts, each line printed as it is known:

1. The environment: Python, torch and transformers, the device (name, memory), the dtype a model takes
   there by default and the autocast policy, and which kernels run (oneDNN linears, the CPU's features and
   the linear layers fast mode chose here (bf16, int8 or fp32, with the measured rates), the SDPA kernels
   that accept the model's attention, CUDA graphs).
2. Checks on the device against the specification. A tiny random-weight MAGNeT (built here, seeded, no
   download) is written as a converted release and loaded on the device as any release is
   (`MagnetModel.from_pretrained`); what the decoding loop runs there is compared with `LM.forward` in
   float32 on the CPU: each stage's logits over several steps (`fastpath.StageForward`, so static buffers
   and CUDA-graph replays run), greedy decoding in both span arrangements, a long-form join, the codec both
   ways, and the largest activation (the fp16 overflow question). With a release, the same on its real LM.
3. The time of one decoding step of the small release's architecture (random weights), its real-time
   factor and peak memory.

A check that raises is recorded as failed with the exception's first line, and the doctor goes on.
`run(...)` returns the report as a dict (what `--json` prints).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import devices, fastpath
from .errors import MagnetError, first_line

# Largest |error| of the logits the device computes, as a share of the logit scale (the largest |logit| of the
# specification over the compared positions). Measured on the tiny model on the development CPU (x86, oneDNN):
# the fast path in float32 within 6e-7 of the scale; LM weights in bfloat16 within 8e-3, in float16 within 1e-3.
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
SPEED_STEPS = (20, 10, 10, 10)  # the 10 s releases' steps, for the real-time factor
SMALL_MODEL_PARAMS = 20_000_000  # below this, the CPU side runs on one thread (microsecond ops: hand-offs cost more)
STAGE_STEPS = 10               # the stage length the logits checks' forwards are built for (as a release's)


@dataclass(frozen=True)
class Tiny:
    """The tiny MAGNeT the checks run: a few layers, 4 codebooks, a band of 5 frames, a 120-frame window."""
    dim: int = 64
    num_heads: int = 4
    num_layers: int = 3
    ffn_dim: int = 256
    n_q: int = 4
    card: int = 128
    text_dim: int = 32
    subcodes_context: int = 5
    window_s: float = 2.4       # 120 frames at 50 Hz
    frames: int = 120
    long_frames: int = 300      # 2.5 windows: four windows with the default overlap
    batch: int = 2
    text_len: int = 7
    sample_rate: int = 8000     # the tiny codec: hop 8 * 5 * 4 = 160 samples, 50 frames per second
    seed: int = 0


SMALL = dict(dim=1024, num_heads=16, num_layers=24, ffn_dim=4096, n_q=4, card=2048, text_dim=768)


# -- the report -------------------------------------------------------------------------------------

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


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _e(x) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2e}"


# -- the environment --------------------------------------------------------------------------------

def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _ram() -> tuple[float | None, float | None]:
    """(total, available) GiB, where the OS says."""
    total = avail = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (AttributeError, ValueError, OSError):
        pass
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) / 2 ** 20
    except (OSError, ValueError, IndexError):
        pass
    return total, avail


def _autocast(model):
    """The engine's mixed-precision context for a model's LM (the one every generation runs under)."""
    policy = getattr(devices, "autocast_for", None)
    return policy(model.device, model.dtype) if policy is not None else model._autocast()


def _autocast_text(model) -> str:
    ac = _autocast(model)
    if not getattr(ac, "_enabled", False):
        return "off (the weights' dtype)"
    return f"{getattr(ac, 'device', '?')} {str(getattr(ac, 'fast_dtype', '?')).replace('torch.', '')}"


def _sdpa_kernels(device: torch.device, dtype: torch.dtype, head_dim: int, band: int) -> dict | None:
    """Which SDPA kernels accept the model's full attention and its band mask here (a probe on a small input;
    torch picks among them)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:                  # torch < 2.3
        return None
    from .transformer import band_mask
    q = torch.randn(1, 2, 24, head_dim, device=device).to(dtype)
    out = {}
    for label, mask in (("full", None), ("band", band_mask(24, band, device))):
        usable = []
        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            backend = getattr(SDPBackend, name, None)
            if backend is None:
                continue
            try:
                with warnings.catch_warnings(), sdpa_kernel([backend]):
                    warnings.simplefilter("ignore")
                    F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
                usable.append(name.split("_")[0].lower())
            except RuntimeError:
                pass
        out[label] = usable
    return out


def _graphs_wanted(settings) -> bool:
    """CUDA graphs are on in these settings and not switched off by $MAGNET_CUDA_GRAPHS."""
    allowed = getattr(fastpath, "graphs_allowed_by_env", None)
    return bool(getattr(settings, "cuda_graphs", False)) and (allowed is None or bool(allowed()))


def environment(device: torch.device, model=None) -> dict:
    """Versions, the device, the default dtype and autocast, and which kernels run (see the module doc)."""
    import transformers

    from . import __version__
    env: dict = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
                 "transformers": transformers.__version__, "magnet": __version__, "device": str(device)}
    cpu_total, cpu_avail = _ram()
    env["cpu"] = {"name": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                  "ram_gib": cpu_total, "ram_available_gib": cpu_avail}
    with contextlib.suppress(Exception):
        env["cpu"]["capability"] = torch.backends.cpu.get_cpu_capability()
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(idx)
        cc = torch.cuda.get_device_capability(idx)
        env["cuda"] = {"name": torch.cuda.get_device_name(idx), "capability": f"{cc[0]}.{cc[1]}",
                       "memory_gib": total / 2 ** 30, "free_gib": free / 2 ** 30, "cuda": torch.version.cuda,
                       "cudnn": torch.backends.cudnn.version(), "bf16": torch.cuda.is_bf16_supported(),
                       "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                       "tf32_cudnn": torch.backends.cudnn.allow_tf32, "devices": torch.cuda.device_count()}
    elif device.type == "mps":
        env["mps"] = {"macos": platform.mac_ver()[0]}
        with contextlib.suppress(Exception):
            env["mps"]["recommended_max_gib"] = torch.mps.recommended_max_memory() / 2 ** 30
    env["default_dtype"] = _name(devices.default_dtype(device))
    if model is not None:
        env["dtype"] = _name(model.dtype)
        env["autocast"] = _autocast_text(model)
        env["codec_device"] = str(next(model.codec.parameters()).device)
    settings = model.fastpath if model is not None else fastpath.DEFAULT_SETTINGS
    env["kernels"] = {
        "onednn_linears": device.type == "cpu" and fastpath.onednn_available(),
        "int8_fast_mode": device.type == "cpu" and fastpath.int8_available(),
        "bf16_fast_mode": device.type == "cpu" and fastpath.bf16_accelerated(),
        "prune_positions": device.type == "cpu" and bool(getattr(settings, "prune_on_cpu", False)),
        "cuda_graphs": device.type == "cuda" and _graphs_wanted(settings),
        "MAGNET_CUDA_GRAPHS": os.environ.get("MAGNET_CUDA_GRAPHS"),
    }
    if device.type == "cpu":
        env["cpu"]["features"] = fastpath.cpu_features()
        choice = fastpath.choose_linears()
        rates = choice.rates or fastpath.measure_linears(
            ["fp32"] + (["bf16"] if fastpath.bf16_available() else []) + (["int8"] if fastpath.int8_available() else []))
        env["kernels"]["fast_linears"] = {"path": choice.path, "how": choice.how, "gflops": rates,
                                          "env": os.environ.get(fastpath.LINEARS_ENV)}
    with contextlib.suppress(Exception):
        dt = model.dtype if model is not None else devices.default_dtype(device)
        if device.type == "cuda" and model is not None and getattr(_autocast(model), "_enabled", False):
            dt = _autocast(model).fast_dtype
        env["kernels"]["sdpa"] = _sdpa_kernels(device, dt, 64, 5)
    return env


def _environment_lines(env: dict) -> list[str]:
    k = env["kernels"]
    cpu = env["cpu"]
    ram = f", {cpu['ram_gib']:.1f} GiB RAM" if cpu.get("ram_gib") else ""
    if cpu.get("ram_available_gib"):
        ram += f" ({cpu['ram_available_gib']:.1f} free)"
    lines = [f"python   {env['python']} ({env['platform']})",
             f"torch    {env['torch']}   transformers {env['transformers']}   magnet {env['magnet']}",
             f"cpu      {cpu['name']}, {cpu['cores']} cores (torch uses {cpu['torch_threads']} threads){ram}"
             + (f", {cpu['capability']}" if cpu.get("capability") else "")]
    if "cuda" in env:
        c = env["cuda"]
        lines.append(f"cuda     {c['name']}, compute capability {c['capability']}, {c['memory_gib']:.1f} GiB "
                     f"({c['free_gib']:.1f} free); CUDA {c['cuda']}, cuDNN {c['cudnn']}, bf16 "
                     f"{'yes' if c['bf16'] else 'no'}, TF32 matmul {'on' if c['tf32_matmul'] else 'off'} / "
                     f"cuDNN {'on' if c['tf32_cudnn'] else 'off'}")
    if "mps" in env:
        m = env["mps"]
        mem = f", recommended max {m['recommended_max_gib']:.1f} GiB" if m.get("recommended_max_gib") else ""
        lines.append(f"mps      macOS {m['macos'] or '?'}{mem}")
    dtype = env.get("dtype", env["default_dtype"])
    lines.append(f"device   {env['device']}: weights {dtype} (auto here: {env['default_dtype']}), autocast "
                 f"{env.get('autocast', '?')}, codec on {env.get('codec_device', '?')}")
    yn = {True: "yes", False: "no"}
    graphs = yn[k["cuda_graphs"]] if env["device"].startswith("cuda") else "n/a (not CUDA)"
    if k.get("MAGNET_CUDA_GRAPHS") is not None:
        graphs += f" (MAGNET_CUDA_GRAPHS={k['MAGNET_CUDA_GRAPHS']})"
    lines.append(f"kernels  oneDNN linears {yn[k['onednn_linears']]}, int8 {yn[k['int8_fast_mode']]}, bf16 in "
                 f"hardware {yn[k.get('bf16_fast_mode', False)]}, position pruning {yn[k['prune_positions']]}, "
                 f"CUDA graphs {graphs}")
    if "features" in cpu:
        lines.append(f"cpu has  {fastpath.cpu_features_text(cpu['features'])}")
    if k.get("fast_linears"):
        f = k["fast_linears"]
        lines.append(f"fast     {fastpath.LinearsChoice(f['path'], f['how'], f['gflops']).describe()}"
                     + (f" ({fastpath.LINEARS_ENV}={f['env']})" if f.get("env") else ""))
    if k.get("sdpa"):
        lines.append(f"sdpa     kernels that run full attention: {', '.join(k['sdpa']['full']) or 'none'}; "
                     f"the band mask: {', '.join(k['sdpa']['band']) or 'none'}")
    return lines


# -- the tiny model ---------------------------------------------------------------------------------

def _fill_lm(lm, seed: int) -> None:
    """Seeded weights of the right scale: matrices ~ N(0, 1/fan_in), norms 1 + N(0, 0.1^2) and their biases
    N(0, 0.1^2) (so that a path that mishandles a norm shows), other vectors 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            elif "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.zero_()


def _tiny_lm(t: Tiny):
    from .transformer import LM, LMConfig
    cfg = LMConfig(kind="magnet", dim=t.dim, num_heads=t.num_heads, num_layers=t.num_layers, ffn_dim=t.ffn_dim,
                   n_q=t.n_q, card=t.card, text_dim=t.text_dim, subcodes_context=t.subcodes_context,
                   segment_duration=t.window_s)
    with torch.device("meta"):
        lm = LM(cfg)
    lm = lm.to_empty(device="cpu")
    _fill_lm(lm, t.seed)
    return lm


def _quantizer_bandwidth(n_q: int, card: int, frame_rate: float, config) -> None:
    """Set target_bandwidths so that this transformers builds `n_q` quantizers (versions count bits per code
    differently: ceil(log2(card)) or 10)."""
    for bits in (math.ceil(math.log2(card)), 10):
        per_q = frame_rate * bits
        bw = n_q * per_q / 1000
        while int(1000 * bw // per_q) < n_q:
            bw = math.nextafter(bw, math.inf)
        config.target_bandwidths = [bw]
        if config.num_quantizers == n_q:
            return
    raise RuntimeError(f"this transformers builds {config.num_quantizers} quantizers, not {n_q}")


def _tiny_codec(t: Tiny):
    """A tiny transformers EnCodec (SEANet + RVQ, one LSTM layer) with seeded weights: every conv weight is
    its weight-norm direction `v` ~ N(0, 1/fan_in) with `g` = |v|, codebooks ~ N(0, 1)."""
    import transformers

    from . import compat
    from .codec import Codec
    config = transformers.EncodecConfig(sampling_rate=t.sample_rate, audio_channels=1, normalize=False,
                                        chunk_length_s=None, overlap=None, hidden_size=16, codebook_dim=16,
                                        num_filters=4, num_residual_layers=1, upsampling_ratios=[8, 5, 4],
                                        num_lstm_layers=1, codebook_size=t.card)
    _quantizer_bandwidth(t.n_q, t.card, config.frame_rate, config)
    with torch.random.fork_rng(devices=[]), compat.no_init_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.EncodecModel(config)
    g = torch.Generator().manual_seed(t.seed + 1)
    with torch.no_grad():
        tensors = dict(model.named_parameters())
        tensors.update((n, b) for n, b in model.named_buffers() if n.endswith("codebook.embed"))
        for name, p in tensors.items():
            if name.endswith("codebook.embed"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() >= 2 and not name.endswith(("original0", "weight_g")):
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif p.dim() == 1:
                p.copy_(0.01 * torch.randn(p.shape, generator=g))
        for name, p in tensors.items():            # weight norm: g = |v|, so that the weight is v
            for g_name, v_name in ((".original0", ".original1"), (".weight_g", ".weight_v")):
                if name.endswith(g_name):
                    v = tensors[name[: -len(g_name)] + v_name]
                    p.copy_(torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True))
    return Codec(model.eval())


def _write_tiny_release(t: Tiny, folder: Path) -> Path:
    """The tiny LM and codec as a converted release (`python -m magnet convert`'s format)."""
    from safetensors.torch import save_file

    from .checkpoints import FORMAT, FORMAT_VERSION
    lm = _tiny_lm(t)
    codec_cfg, codec_state = _tiny_codec(t).export()
    tensors = {"lm." + k: v.contiguous() for k, v in lm.state_dict().items()}
    tensors.update({"codec." + k: v.contiguous() for k, v in codec_state.items()})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "lm_config": json.dumps(lm.cfg.to_dict()),
            "codec_config": json.dumps(codec_cfg), "generation": "{}", "source": "doctor-tiny"}
    path = folder / "doctor-tiny.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


class _Spec(torch.nn.Module):
    """An LM run as its specification: `LM.forward` with no fast path (the decoding loop's plan is dropped).
    Everything else (cfg, memory, mask_id, parameters) is the wrapped LM's."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["lm"], name)

    def forward(self, codes, mem, stage=-1, heads=None, cache=None, *, fastpath=None):
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


def _reference(model):
    """The reference of a loaded model: its weights in float32 on the CPU, decoded through `LM.forward` (no
    pruning, no static buffers, no CUDA graphs), and its codec in float32 on the CPU."""
    from .model import MagnetModel
    from .transformer import LM

    def empty_lm():
        with torch.device("meta"):
            return LM(model.lm.cfg)
    lm = _cpu_float32(model.lm, empty_lm)
    codec = _cpu_float32(model.codec, lambda: copy.deepcopy(model.codec))
    ref = MagnetModel(_Spec(lm), codec)
    ref.fastpath = dataclasses.replace(model.fastpath, prune_on_cpu=False, cuda_graphs=False,
                                       static_steps_on_cpu=False)
    return ref


def _condition(batch: int, length: int, text_dim: int, seed: int):
    """Random 'T5 states' for `batch` prompts and their null rows (mask all zero), one prompt padded."""
    from .text import TextCondition
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * batch, length, text_dim, generator=g)
    mask = torch.ones(2 * batch, length, dtype=torch.long)
    mask[batch:] = 0
    if batch > 1:
        mask[1, length // 2:] = 0
    return TextCondition([f"doctor {i}" for i in range(batch)], hidden, mask,
                         torch.zeros(2 * batch, length, dtype=torch.long), "random states")


# -- the checks -------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _precision(model) -> torch.dtype:
    """The precision the LM's matmuls run at: the autocast dtype, else the weights'; float32 matmuls that
    may use TF32 on CUDA count as float16 (10-bit mantissa)."""
    ac = _autocast(model)
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
    tol_rel = RELATIVE_TOLERANCE[_precision(dev)]
    g = torch.Generator().manual_seed(seed + 100 * stage)
    worst = scale = spec_dev = 0.0
    path = ""
    with torch.inference_mode():
        mem_ref = ref.lm.memory(cond.hidden, cond.mask, null_rows=B)
        with _autocast(dev):
            c = cond.to(d)
            mem = dev.lm.memory(c.hidden, c.mask, null_rows=B)
            forward = fastpath.StageForward(dev.lm, mem, guided=True, batch=B, stage=stage, n_steps=STAGE_STEPS,
                                            fast=None, settings=dev.fastpath)
        shares = [1.0] + [0.6 * (1 - i / calls) + 0.05 for i in range(1, calls)]
        for share in shares:
            codes, used = _step_codes(g, B, cfg.n_q, frames, cfg.card, dev.lm.mask_id, cfg.span_len, stage, share)
            with _autocast(dev):
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
    if not _graphs_wanted(dev.fastpath):
        why = "MAGNET_CUDA_GRAPHS=" + os.environ.get("MAGNET_CUDA_GRAPHS", "") \
            if getattr(dev.fastpath, "cuda_graphs", False) else "off in the model's settings"
        return True, {"graphs": "off", "why": why}, f"off ({why}): every step runs eagerly"
    state = fastpath.graph_state(dev.lm)
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
    from .sampling import SamplingParams
    params = SamplingParams(use_sampling=False, decoding_steps=steps, span_arrangement=arrangement)
    out = dev.generate_from_condition(cond, frames=frames, params=params, seed=0).codes
    want = ref.generate_from_condition(cond, frames=frames, params=params, seed=0).codes
    exact = _precision(dev) == torch.float32
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
        next(dev.codec.parameters()).device), codec_dtype=_name(next(dev.codec.parameters()).dtype))
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
    over = [(kind, _name(dt), v) for kind, dt, v in peaks if not math.isfinite(v) or v >= torch.finfo(dt).max]
    dtypes = sorted({f"{kind} {_name(dt)}" for kind, dt, _ in peaks})
    fp16 = FP16_MAX / linear if linear and math.isfinite(linear) else None
    ok = not over
    text = (f"largest |linear output| {linear:.4g}, |residual| {residual:.4g} ({', '.join(dtypes)}); linear "
            f"outputs at {1 / fp16:.2g} of fp16's limit {FP16_MAX:g}" if fp16 else
            f"largest |linear output| {linear}, |residual| {residual}")
    if over:
        text += f"; OVERFLOW: {over[0][0]} output {over[0][2]} in {over[0][1]}"
    return ok, {"max_abs_linear_output": linear, "max_abs_residual": residual, "dtypes": dtypes,
                "fp16_limit": FP16_MAX, "fp16_headroom": fp16, "overflowed": [f"{k} {d}" for k, d, _ in over]}, text


# -- speed ------------------------------------------------------------------------------------------

def _fast_fill(lm, seed: int = 0) -> None:
    """Weights of the right scale, cheaply: one random tile of uniform values copied over every tensor and
    scaled to N(0, 1/fan_in)'s variance and rounded to float16 (the values repeat: this model is only timed).
    Norms 1, biases 0."""
    device = next(lm.parameters()).device
    g = torch.Generator().manual_seed(seed)
    tile = (torch.rand(1 << 20, generator=g) * 2 - 1).to(device)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if p.dim() >= 2:
                flat = p.view(-1)
                bound = math.sqrt(3.0 / p.shape[-1])
                scaled = (tile * bound).half()       # float16 values, as the releases are published
                for i in range(0, flat.numel(), tile.numel()):
                    n = min(tile.numel(), flat.numel() - i)
                    flat[i:i + n].copy_(scaled[:n])
            else:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)


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
    layers it chooses here (`fastpath.choose_linears`: bf16 or int8; none when float32 is fastest). The
    real-time factor assumes every step costs a full step (an upper bound where the CPU prunes positions)."""
    from .model import MagnetModel
    from .sampling import FastMode
    from .transformer import LM, LMConfig
    arch = dict(SMALL if arch is None else arch)
    dtype = devices.parse_dtype(dtype, device)
    t0 = time.perf_counter()
    cfg = LMConfig(kind="magnet", segment_duration=frames / 50, **arch)
    with torch.device("meta"):
        lm = LM(cfg).to(dtype)
    lm = lm.to_empty(device=device)
    _fast_fill(lm)
    lm.eval().requires_grad_(False)
    holder = MagnetModel(lm, _tiny_codec(Tiny()))   # the engine's autocast policy and settings for this LM
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
                     "dtype": _name(dtype), "build_seconds": built, "timed_steps": repeats}
    times = {}

    def timed(stage: int, fast=None) -> float:
        with torch.inference_mode(), _autocast(holder):
            mem = lm.memory(hidden.to(device), mask.to(device), null_rows=1)
            forward = fastpath.StageForward(lm, mem, guided=True, batch=1, stage=stage, n_steps=10, fast=fast,
                                            settings=holder.fastpath)
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
    linears = fastpath.fast_linears(FastMode(), device, dtype)
    if linears is not None:
        t = time.perf_counter()
        fastpath.fast_copy(lm, linears)
        numbers["fast_copy_seconds"] = time.perf_counter() - t
        numbers["fast_linears"] = linears
        per_fast = timed(0, FastMode())
        fast_steps = FastMode().steps(steps)
        numbers["seconds_per_step_fast"] = per_fast
        numbers["rtf_fast"] = sum(fast_steps) * per_fast / seconds
        text += (f"; fast ({linears}) {per_fast:.3g} s/step, RTF {numbers['rtf_fast']:.3g} at "
                 f"{','.join(map(str, fast_steps))} ({linears} copy made once in {numbers['fast_copy_seconds']:.1f} s)")
        fastpath.drop_fast_copy(lm)
    peak, how = _peak_memory(device)
    numbers["peak_memory_gib"], numbers["peak_memory_kind"] = peak, how
    numbers["weights_gib"] = sum(p.numel() * p.element_size() for p in lm.parameters()) / 2 ** 30
    if peak is not None:
        text += f"; peak memory {peak:.2f} GiB ({how}; weights {numbers['weights_gib']:.2f} GiB)"
    del lm, holder
    gc.collect()
    return True, numbers, text


# -- a release --------------------------------------------------------------------------------------

def release_checks(report: Report, release, text_encoder, device, dtype, codec=None) -> None:
    """The logits, greedy decoding, activations, text encoder and codec checks on a release's real LM, for a
    handful of steps of one second."""
    from .model import MagnetModel
    state: dict = {}

    def load():
        t = time.perf_counter()
        dev = MagnetModel.from_pretrained(release, text_encoder=text_encoder, device=device, dtype=dtype,
                                          codec=codec)
        state.update(dev=dev, ref=_reference(dev))
        te = dev.text_encoder
        return True, {"release": str(release), "dtype": _name(dev.dtype),
                      "text_encoder": str(te.folder) if te is not None else None,
                      "load_seconds": time.perf_counter() - t}, \
            f"{dev.cfg.dim}-dim, {dev.cfg.num_layers} layers, {_name(dev.dtype)} on {dev.device}, text encoder " \
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


def _release_steps(report: Report, dev, ref) -> None:
    from .text import TextEncoder
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
        cond = _condition(len(prompts), 12, dev.cfg.text_dim, 0)
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


# -- the doctor -------------------------------------------------------------------------------------

def run(device=None, dtype=None, *, release=None, text_encoder=None, codec=None, speed: bool = True,
        speed_arch: dict | None = None, speed_frames: int = 500, echo: Callable[[str], None] = print,
        tiny: Tiny = Tiny()) -> dict:
    """Run every check (see the module doc) and return the report: ok, verdict, device, dtype, torch,
    transformers, python, environment, checks (each: name, ok, its numbers, seconds, summary), seconds.
    `echo` gets each human-readable line as it is known."""
    from .model import MagnetModel
    t_start = time.perf_counter()
    device = devices.parse_device(device, "--device")
    dtype_arg = None if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() in ("", "auto")) \
        else devices.parse_dtype(dtype, device, "--dtype")
    if text_encoder is not None and release is None:
        raise MagnetError("--text-encoder needs --release: give the release folder whose LM to check, e.g. "
                          "--release models/magnet/magnet-small-10secs --text-encoder models/text_encoders/t5-base.")
    if release is not None:
        from .checkpoints import resolve_release
        resolve_release(release)              # a wrong path is a user error, before any work
    report = Report(echo)
    state: dict = {}
    folder = Path(tempfile.mkdtemp(prefix="magnet-doctor-"))

    def load():
        path = _write_tiny_release(tiny, folder)
        dev = MagnetModel.from_pretrained(path, text_encoder=False, device=device, dtype=dtype_arg)
        state.update(dev=dev, ref=_reference(dev))
        return True, {"dtype": _name(dev.dtype), "device": str(dev.device)}, \
            f"tiny random MAGNeT ({tiny.dim}-dim, {tiny.num_layers} layers, {tiny.n_q} codebooks of {tiny.card}, " \
            f"band {tiny.subcodes_context}, {tiny.frames}-frame window) as {_name(dev.dtype)} on {dev.device}"

    threads = torch.get_num_threads()
    try:
        echo("MAGNeT doctor")
        loaded = Report(lambda line: None).run("load", load)
        try:
            env = environment(device, state.get("dev"))
            lines = _environment_lines(env)
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
            precision = _precision(state["dev"])
        echo(f"checks   on {device} against LM.forward in float32 on the CPU (tolerances relative to the logit "
             f"scale: fp32 {RELATIVE_TOLERANCE[torch.float32]:g}, fp16 {RELATIVE_TOLERANCE[torch.float16]:g}, "
             f"bf16 {RELATIVE_TOLERANCE[torch.bfloat16]:g}"
             + (f"; here {_name(precision)}" if precision is not None else "") + ")")
        report.checks.append(loaded)
        echo(f"  {'ok  ' if loaded['ok'] else 'FAIL'}  {'load':<24} {loaded['summary']}")
        if loaded["ok"]:
            dev, ref = state["dev"], state["ref"]
            torch.set_num_threads(1)        # see SMALL_MODEL_PARAMS
            cond = _condition(tiny.batch, tiny.text_len, tiny.text_dim, tiny.seed)
            peaks: list = []
            for stage in range(tiny.n_q):
                report.run(f"logits stage {stage}",
                           lambda s=stage: check_logits(dev, ref, s, cond, tiny.frames, 4, tiny.seed, peaks))
            report.run("activations", lambda: check_activations(peaks))
            if device.type == "cuda":
                report.run("cuda graphs", lambda: check_graphs(dev))
            for arrangement in ("nonoverlap", "stride1"):
                report.run(f"greedy {arrangement}", lambda a=arrangement: check_greedy(dev, ref, cond, tiny.frames,
                                                                                     a)[:3])
            report.run("long-form", lambda: check_longform(dev, ref, cond, tiny.long_frames))
            report.run("codec", lambda: check_codec(dev, ref))
            state.clear()
            torch.set_num_threads(threads)
        if release is not None:
            echo(f"release  {release}")
            release_checks(report, release, text_encoder, device, dtype_arg, codec)
        if speed:
            a = SMALL if speed_arch is None else speed_arch
            echo(f"speed    {a['dim']}-dim, {a['num_layers']} layers, {a['n_q']} codebooks of {a['card']} (the small "
                 f"releases' shape, random weights), {speed_frames} frames, 1 prompt + guidance = 2 rows")
            report.run("speed", lambda: check_speed(device, dtype_arg, speed_arch, speed_frames))
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
