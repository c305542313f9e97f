"""What the node modules share: socket payloads, AUDIO conversion, user-facing errors."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..magnet.errors import MagnetError
from . import comfy

CATEGORY = "audio/MAGNeT"

# socket types (few, all MAGNET_*)
MODEL, CODEC, TEXT_ENCODER, CONDITIONING, TOKENS = ("MAGNET_MODEL", "MAGNET_CODEC", "MAGNET_TEXT_ENCODER",
                                                    "MAGNET_CONDITIONING", "MAGNET_TOKENS")
AR_MODEL, RESCORER, CLAP = "MAGNET_AR_MODEL", "MAGNET_RESCORER", "MAGNET_CLAP"


@dataclass
class Handle:
    """A cached engine object travelling between nodes, with the ModelPatchers that move it to the GPU."""
    obj: Any
    name: str
    patchers: list = field(default_factory=list)

    def ready(self):
        """Load onto the compute device (ComfyUI's memory manager may have offloaded it) and return it."""
        comfy.load(*self.patchers)
        return self.obj


@contextlib.contextmanager
def user_errors(node: str):
    """The one place that names the node: engine errors show as `Node name: problem + fix` (ComfyUI displays
    str(exception) in its error dialog). Idempotent: a message already starting with `node:` is kept.
    Interrupts (Cancel) and anything that is not the user's mistake pass through untouched."""
    try:
        yield
    except MagnetError as e:
        raise MagnetError(prefixed(node, str(e))) from None


def prefixed(node: str, message: str) -> str:
    """`node: message`, exactly once."""
    message = message.strip()
    return message if message.startswith(node + ":") else f"{node}: {message}"


def finite(value, what: str, *, minimum: float | None = None) -> float:
    """A FLOAT input checked at the node boundary: a linked FLOAT may be NaN or infinite."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise MagnetError(f"input `{what}` must be a number (got {value!r}).") from None
    if not math.isfinite(v):
        raise MagnetError(f"input `{what}` is {v}: connect or type a finite number.")
    if minimum is not None and v < minimum:
        raise MagnetError(f"input `{what}` is {v:g}; it must be at least {minimum:g}.")
    return v


SEED_MAX = 0xFFFFFFFFFFFFFFFF


def seed_arg(seed) -> int:
    """The seed widget's value (or a linked INT) as an int in ComfyUI's seed range."""
    if isinstance(seed, bool) or seed is None:
        raise MagnetError(f"input `seed` must be a whole number (got {seed!r}).")
    if isinstance(seed, float):
        if not math.isfinite(seed) or seed != int(seed):
            raise MagnetError(f"input `seed` is {seed}: use a whole number between 0 and {SEED_MAX}.")
        seed = int(seed)
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise MagnetError(f"input `seed` must be a whole number (got {seed!r}).") from None
    if not 0 <= seed <= SEED_MAX:
        raise MagnetError(f"input `seed` {seed} is outside 0..{SEED_MAX}: use a seed in that range.")
    return seed


def tokens_payload(codes: torch.Tensor, codec) -> dict:
    """MAGNET_TOKENS: codes [B, K, T] on the CPU plus what identifies their codec."""
    return {"codes": codes.detach().to("cpu", torch.long), "sample_rate": int(codec.sample_rate),
            "frame_rate": float(codec.frame_rate), "n_q": int(codec.n_q), "card": int(codec.card)}


def check_tokens(tokens: Mapping, codec, what: str = "tokens") -> torch.Tensor:
    """The codes of a MAGNET_TOKENS input, checked against the codec they will be used with (the caller runs
    inside user_errors, which names the node)."""
    if not isinstance(tokens, Mapping) or not isinstance(tokens.get("codes"), torch.Tensor):
        raise MagnetError(f"input `{what}` is not MAGNET_TOKENS: connect a MAGNeT Sampler, Encode Audio or "
                          f"AR Prompt output.")
    codes = tokens["codes"]
    if (tokens.get("n_q"), tokens.get("card"), tokens.get("sample_rate")) != (codec.n_q, codec.card, codec.sample_rate):
        raise MagnetError(f"input `{what}` comes from a codec with {tokens.get('n_q')} codebooks of "
                          f"{tokens.get('card')} entries at {tokens.get('sample_rate')} Hz, but this model's codec "
                          f"has {codec.n_q} of {codec.card} at {codec.sample_rate} Hz. Encode the audio with the "
                          f"codec of the model you sample with.")
    return codes


def audio_in(audio: Mapping, what: str = "audio") -> tuple[torch.Tensor, int]:
    """ComfyUI AUDIO (any Mapping: VideoHelperSuite hands a lazy one) -> (waveform [B, C, S] float32, rate)."""
    if not isinstance(audio, Mapping):
        raise MagnetError(f"input `{what}` is not AUDIO (got {type(audio).__name__}). Connect a LoadAudio "
                          f"or video loader's audio output.")
    try:
        wav, sr = audio["waveform"], audio["sample_rate"]
    except Exception as e:  # VHS's lazy audio runs ffmpeg on first access and raises when there is no track
        if comfy.is_interrupt(e):
            raise
        raise MagnetError(f"input `{what}` could not be read ({str(e).splitlines()[0][:200] if str(e) else e!r}). "
                          f"If it comes from a video, the video may have no audio track.") from None
    raw_sr = sr
    try:
        sr = int(sr)
    except (TypeError, ValueError, OverflowError):
        sr = 0
    if sr <= 0:
        raise MagnetError(f"input `{what}` has sample rate {raw_sr!r}; it must be a positive "
                          f"whole number of Hz. Check the node that produced the audio.")
    if not isinstance(wav, torch.Tensor):
        wav = torch.as_tensor(wav)
    if wav.dim() == 2:
        wav = wav[None]
    if wav.dim() != 3 or wav.shape[-1] == 0:
        raise MagnetError(f"input `{what}` has a waveform of shape {tuple(wav.shape)}; expected "
                          f"[batch, channels, samples] with at least one sample.")
    if not wav.is_floating_point():   # PCM from some video decoders
        scale = float(torch.iinfo(wav.dtype).max) if wav.dtype != torch.bool else 1.0
        wav = wav.float() / scale
    return wav.float().cpu(), sr


def audio_out(wav: torch.Tensor, sample_rate: int) -> dict:
    """A plain AUDIO dict: float32 [B, C, S] on ComfyUI's intermediate device (the CPU)."""
    return {"waveform": wav.detach().float().to(comfy.intermediate_device()).contiguous(),
            "sample_rate": int(sample_rate)}
