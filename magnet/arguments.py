"""What a user hands the engine's generation calls, checked (each a MagnetError naming the problem and the fix),
and what a generation returns (`Generated`). Below `model` and `edit`, which both use it."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .errors import MagnetError


MAX_SECONDS = 3600.0   # one call's generation: beyond an hour it cannot finish in a sitting (each window of
                       # 5-10 s costs tens of decoding steps), so longer pieces are made in parts


def finite_arg(value, what: str, kind: str = "number") -> float:
    """A number a user hands in: a finite float (a bool is not one), or a MagnetError naming `what`."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise MagnetError(f"{what} {value!r} must be a {kind}.") from None
    if not math.isfinite(v):
        raise MagnetError(f"{what} {value!r} must be a finite {kind}.")
    return v


def seconds_arg(duration) -> float:
    """A user's duration in seconds: a finite number > 0 and at most MAX_SECONDS, or a MagnetError."""
    try:
        if isinstance(duration, bool):
            raise TypeError
        duration = float(duration)
    except (TypeError, ValueError, OverflowError):
        raise MagnetError(f"duration {duration!r} must be a number of seconds.") from None
    if not duration > 0:
        raise MagnetError(f"duration {duration} must be more than 0 seconds.")
    if not math.isfinite(duration):
        raise MagnetError(f"duration {duration} must be a finite number of seconds.")
    if duration > MAX_SECONDS:
        raise MagnetError(f"duration {duration:g} s is more than one call can make (at most {MAX_SECONDS:g} s = "
                          f"one hour: every window of the model costs tens of decoding steps, so this could "
                          f"not finish in a sitting). Generate it in parts, each continuing the last.")
    return duration


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` (CUDA: the driver's count; CPU: MemAvailable), None where unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        pass
    return None


def check_fits(nbytes: int, what: str, device: torch.device) -> None:
    """Refuse to allocate what cannot fit: `nbytes` estimated from the shapes, against free memory."""
    free = available_bytes(device)
    if free is not None and nbytes > free:
        raise MagnetError(f"{what} needs about {nbytes / 2 ** 30:.1f} GiB on {device}, but only "
                          f"{free / 2 ** 30:.1f} GiB is free: ask for less (a shorter duration or a smaller batch).")


def codes_arg(codes, n_q: int, card: int, fix: str = "use fully generated codes of this model") -> torch.Tensor:
    """Finished codes a user hands in: integer [B, K, T] or [K, T] with K = n_q, B and T at least 1, every
    code in [0, card) -> long [B, K, T]; else a MagnetError ending with `fix`."""
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.dim() not in (2, 3):
        raise MagnetError("codes must be integer codes [batch, codebooks, frames] (from model.generate "
                          "or model.encode).")
    if codes.dim() == 2:
        codes = codes[None]
    if codes.shape[1] != n_q or codes.shape[-1] == 0 or codes.shape[0] == 0:
        raise MagnetError(f"codes have shape {tuple(codes.shape)}; expected [batch, {n_q}, frames] (batch and "
                          f"frames at least 1) from model.generate or model.encode (of this model's codec).")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= card:
        raise MagnetError(f"codes must lie in [0, {card}) (min {lo}, max {hi}): these are not codes of this codec "
                          f"(mask tokens, or codes of another codec?). {fix[:1].upper()}{fix[1:]}.")
    return codes.long()


class Generated(NamedTuple):
    """What a generation returns: codes [B, K, T] and the seed they were made with (given again as `seed=`,
    with the same inputs, it makes the same codes)."""
    codes: torch.Tensor
    seed: int
