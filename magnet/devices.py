"""Devices and dtypes a user may name: what exists on this machine, the spellings we accept, clear refusals;
and the per-device policies every part of the engine shares.

    parse_device("gpu")      -> cuda (where CUDA exists)     parse_device("cuda:1") -> cuda:1 (if it exists)
    parse_dtype("half")      -> torch.float16                parse_dtype("auto", dev) -> default for dev
    autocast_for(dev, dtype) -> the mixed-precision context for running fp16/bf16 weights on dev
    codec_device(dev)        -> where EnCodec runs when the LM runs on dev (the CPU for MPS)
    leaf_parameters(module)  -> every parameter moved to a module that holds only its own
"""
from __future__ import annotations

import contextlib
import re

import torch

from .errors import MagnetError

DEVICE_ALIASES = {"gpu": "cuda", "nvidia": "cuda", "cuda": "cuda", "cpu": "cpu", "mps": "mps", "metal": "mps",
                  "apple": "mps", "xpu": "xpu"}
DEVICE_NAME = re.compile(r"([a-z]+)(?::?([0-9]+))?", re.ASCII)
"""The whole grammar of a device name: an alias, then optionally an index in plain ASCII digits, with or
without a colon (cuda, cuda:1, gpu1, cpu, mps, xpu:0). Anything else is refused."""
DTYPE_ALIASES = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32, "32": torch.float32,
                 "fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "16": torch.float16,
                 "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """The devices this machine has, in the order a user would pick them: cpu, cuda, cuda:N, mps."""
    out = ["cpu"]
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        out += ["cuda"] + ([f"cuda:{i}" for i in range(n)] if n > 1 else [])
    if mps_available():
        out.append("mps")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        out.append("xpu")
    return out


def default_device() -> torch.device:
    """CUDA where present, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_count(kind: str) -> int:
    """How many devices of this type ('cpu', 'cuda', 'mps', 'xpu') this machine (and torch build) has."""
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "xpu":
        xpu = getattr(torch, "xpu", None)
        return xpu.device_count() if xpu is not None and xpu.is_available() else 0
    if kind == "mps":
        return int(mps_available())
    return 1 if kind == "cpu" else 0


_MISSING = {"cuda": "this machine (or this torch build, {version}) has no CUDA",
            "mps": "Apple's MPS is not available here", "xpu": "no Intel XPU here"}


def parse_device(device, what: str = "device") -> torch.device:
    """A device from a torch.device or a name ('auto', 'cpu', 'cuda', 'cuda:1', 'gpu', 'gpu1', 'mps'),
    checked to exist here: anything that is not a device this machine has (a name outside `DEVICE_NAME`'s
    grammar, an index it does not have, a type this engine does not run on) is a MagnetError naming the value
    and the devices to choose from."""
    if device is None or (isinstance(device, str) and device.strip().lower() in ("", "auto")):
        return default_device()
    choose = f"Use auto or one of: {', '.join(available_devices())}."
    if isinstance(device, torch.device):
        kind, index = device.type, device.index
    elif isinstance(device, str):
        name = device.strip()
        m = DEVICE_NAME.fullmatch(name.lower()) if name.isascii() else None     # lower() maps some non-ASCII to ASCII
        if m is None or m.group(1) not in DEVICE_ALIASES:
            raise MagnetError(f"{what} {device!r} is not a device name (a device is cpu, cuda, cuda:N, mps or xpu, "
                              f"N a whole number). {choose}")
        kind, digits = DEVICE_ALIASES[m.group(1)], m.group(2)
        index = int(digits) if digits is not None and len(digits) <= 9 else (None if digits is None else -1)
    else:
        raise MagnetError(f"{what} {device!r} must be a device name such as 'cpu' or 'cuda' (or 'auto'), not a "
                          f"{type(device).__name__}.")
    if kind not in ("cpu", "cuda", "mps", "xpu"):
        raise MagnetError(f"{what} {device!r} is not supported (the engine runs on cpu, cuda, mps and xpu). {choose}")
    count = device_count(kind)
    if count == 0:
        raise MagnetError(f"{what} {device!r}: {_MISSING[kind].format(version=torch.__version__)}. {choose}")
    if index is not None and not 0 <= index < count:
        have = f"{kind}:0 .. {kind}:{count - 1}" if count > 1 else f"only {kind}:0 ({kind})"
        raise MagnetError(f"{what} {device!r}: there is no such {kind} device here ({count} {kind} device(s): "
                          f"{have}). {choose}")
    return torch.device(kind if index is None else f"{kind}:{index}")


FP16_BROKEN_GPUS = ("GTX 16", "1660", "1650", "1630", "T500", "T550", "T600", "MX550", "MX450", "CMP 30HX",
                    "T2000", "T1000", "T1200")
"""GPUs (Turing TU11x) whose fp16 gives NaN or garbage (the list ComfyUI keeps, plus any GTX 16xx)."""


def cuda_fp16_ok(device) -> bool:
    """fp16 weights are fast and safe on this CUDA GPU: compute capability 7.0 or newer (Volta on; Pascal's
    fp16 is slow) and not a GTX 16xx / TU117 part (its fp16 gives NaN)."""
    try:
        major, _ = torch.cuda.get_device_capability(device)
        name = str(torch.cuda.get_device_name(device))
    except (RuntimeError, AssertionError, ValueError):
        return False
    return major >= 7 and not any(part in name for part in FP16_BROKEN_GPUS)


def default_dtype(device) -> torch.dtype:
    """fp16 on CUDA GPUs where it is fast and safe (`cuda_fp16_ok`; the weights are released in fp16), fp32
    elsewhere (older or GTX 16xx GPUs, MPS, the CPU). Inside ComfyUI the nodes follow ComfyUI's choice."""
    dev = torch.device(device)
    if dev.type == "cuda" and cuda_fp16_ok(dev):
        return torch.float16
    return torch.float32


def bf16_supported(device) -> bool:
    """Whether bf16 weights can run on `device` (CUDA: what torch.autocast itself checks; MPS, XPU: whether a
    bf16 tensor can be made there; the CPU: yes)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return True
    if dev.type == "cuda":
        try:
            return bool(torch.cuda.is_bf16_supported())
        except (RuntimeError, AssertionError):
            return False
    try:
        torch.zeros(1, dtype=torch.bfloat16, device=dev)
        return True
    except (RuntimeError, TypeError):
        return False


def _device_label(dev: torch.device) -> str:
    if dev.type == "cuda":
        try:
            return f"{dev} ({torch.cuda.get_device_name(dev)})"
        except (RuntimeError, AssertionError):
            pass
    return str(dev)


def parse_dtype(dtype, device=None, what: str = "dtype") -> torch.dtype:
    """A floating dtype from a torch.dtype or a name ('auto', 'fp32', 'float16', 'half', 'bf16', ...)."""
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() in ("", "auto")):
        return default_dtype(device if device is not None else default_device())
    if isinstance(dtype, torch.dtype):
        dt = dtype
    elif isinstance(dtype, str) and dtype.strip().lower().removeprefix("torch.") in DTYPE_ALIASES:
        dt = DTYPE_ALIASES[dtype.strip().lower().removeprefix("torch.")]
    else:
        raise MagnetError(f"{what} {dtype!r} is not a weight type: use auto, fp32, fp16 or bf16.")
    if dt not in (torch.float32, torch.float16, torch.bfloat16):
        raise MagnetError(f"{what} {dtype!r}: weights must be fp32, fp16 or bf16.")
    if dt == torch.bfloat16 and device is not None and not bf16_supported(device):
        raise MagnetError(f"{what} bf16: {_device_label(torch.device(device))} does not support bfloat16 "
                          f"(with torch {torch.__version__}). Use fp16 or fp32 (or auto).")
    return dt


def autocast_for(device, dtype):
    """The context to run weights of `dtype` on `device` in: on CUDA, torch.autocast with fp16/bf16 weights
    (matmuls in that type, reductions in fp32) and autocast switched off for fp32 weights (so an enclosing
    autocast cannot lower an fp32 model); everywhere else (CPU, MPS, XPU) nothing at all, since
    torch.autocast refuses device types it does not know in some versions (`mps` before torch 2.5)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if dtype in (torch.float16, torch.bfloat16):
            return torch.autocast("cuda", dtype=dtype)
        return torch.autocast("cuda", enabled=False)
    return contextlib.nullcontext()


def codec_device(device) -> torch.device:
    """Where EnCodec runs when the LM runs on `device`: the same device, except the CPU for Apple's MPS
    (MPS refuses or garbles the codec's long convolutions: outputs over 65536 channels x samples, i.e.
    clips over about 2 s, on torch < 2.6 / macOS < 15.1)."""
    dev = torch.device(device)
    return torch.device("cpu") if dev.type == "mps" else dev


def leaf_parameters(module: torch.nn.Module) -> torch.nn.Module:
    """Turn the parameters of modules that also have children with parameters into (persistent) buffers,
    in place, and return `module`. Inference only. Memory managers that move a model piecewise
    (ComfyUI's ModelPatcher moves only modules whose parameters are all their own) then move every weight;
    the state dict keeps its keys and values."""
    for m in module.modules():
        own = dict(m.named_parameters(recurse=False))
        if own and len(own) != sum(1 for _ in m.parameters()):
            for name, p in own.items():
                del m._parameters[name]
                m.register_buffer(name, p.detach(), persistent=True)
    return module
