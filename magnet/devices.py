"""Devices and dtypes a user may name: what exists on this machine, the spellings we accept, clear refusals.

    parse_device("gpu")      -> cuda (where CUDA exists)     parse_device("cuda:1") -> cuda:1 (if it exists)
    parse_dtype("half")      -> torch.float16                parse_dtype("auto", dev) -> default for dev
"""
from __future__ import annotations

import torch

from .errors import MagnetError

DEVICE_ALIASES = {"gpu": "cuda", "nvidia": "cuda", "cuda": "cuda", "cpu": "cpu", "mps": "mps", "metal": "mps",
                  "apple": "mps", "xpu": "xpu"}
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
    """CUDA where present, else the CPU (MPS is used when asked for by name, or by ComfyUI)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(device, what: str = "device") -> torch.device:
    """A device from a torch.device or a name ('auto', 'cpu', 'cuda', 'cuda:1', 'gpu', 'gpu1', 'mps'),
    checked to exist here."""
    if device is None or (isinstance(device, str) and device.strip().lower() in ("", "auto")):
        return default_device()
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        name = device.strip().lower()
        base, _, index = name.partition(":")
        if not index:   # gpu0, cuda1
            digits = base.lstrip("abcdefghijklmnopqrstuvwxyz")
            base, index = base[: len(base) - len(digits)], digits
        if base not in DEVICE_ALIASES or (index and not index.isdigit()):
            raise MagnetError(f"{what} {device!r} is not a device name: use auto, "
                              f"{', '.join(available_devices())}.")
        dev = torch.device(DEVICE_ALIASES[base] + (f":{int(index)}" if index else ""))
    else:
        raise MagnetError(f"{what} {device!r} must be a device name such as 'cpu' or 'cuda' (or 'auto').")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MagnetError(f"{what} {device!r}: this machine (or this torch build, {torch.__version__}) "
                              f"has no CUDA. Use auto or one of: {', '.join(available_devices())}.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MagnetError(f"{what} {device!r}: there are only {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1}).")
    elif dev.type == "mps" and not mps_available():
        raise MagnetError(f"{what} {device!r}: Apple's MPS is not available here. Use auto or one of: "
                          f"{', '.join(available_devices())}.")
    elif dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise MagnetError(f"{what} {device!r}: no Intel XPU here. Use auto or one of: "
                          f"{', '.join(available_devices())}.")
    elif dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise MagnetError(f"{what} {device!r} is not supported: use auto, {', '.join(available_devices())}.")
    return dev


def default_dtype(device) -> torch.dtype:
    """fp16 on CUDA (the weights are released in fp16), fp32 elsewhere."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


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
    return dt
