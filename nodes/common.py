"""What the node modules share: socket payloads, AUDIO conversion, user-facing errors, and the widgets of
every node that samples MAGNeT (the seed and the sampling settings) with their translation to the engine."""
from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..magnet.defaults import DEFAULT_STEPS, fallback, per_release
from ..magnet.errors import MagnetError, first_line
from ..magnet.sampling import SPAN_ARRANGEMENTS, SPAN_SCORINGS, FastMode, SamplingParams, check_seed
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
        """Load onto the compute device (ComfyUI's memory manager may have offloaded it) and return it.
        A node that runs several models readies them together with `ready(...)`."""
        return ready(self)[0]


def ready(*handles) -> list:
    """The objects of `handles` (None stays None), every model behind them loaded onto its compute device
    in one go: one ComfyUI load call for all of a node's models, so that loading one cannot evict part of
    another (see `comfy.load`)."""
    comfy.load(*(p for h in handles if h is not None for p in h.patchers))
    return [None if h is None else h.obj for h in handles]


@contextlib.contextmanager
def user_errors(node: str):
    """The one place that names the node: engine errors show as `Node name: problem + fix` (ComfyUI displays
    str(exception) in its error dialog). Idempotent: a message already starting with `node:` is kept.
    Interrupts (Cancel) and anything that is not the user's mistake pass through untouched."""
    try:
        yield
    except MagnetError as e:
        raise MagnetError(prefixed(node, str(e))) from None


# Engine wording meant for scripts -> the nodes and inputs a ComfyUI user sees (error dialogs name nodes and
# widgets, never Python calls). A pattern that no longer matches is simply a no-op.
NODE_WORDING = [
    (re.compile(r"load it with MusicGenModel \(or the MusicGen loader node\)\."),
     "load it with the MAGNeT MusicGen Loader node."),
    (re.compile(r"load it with MagnetModel\.from_pretrained, and give MusicGenModel a MusicGen release such as "
                r"facebook/musicgen-small\."),
     "load it with the MAGNeT Model Loader node, and pick a MusicGen release (e.g. musicgen-small) here."),
    (re.compile(r"load it with MagnetModel\.from_pretrained\."), "load it with the MAGNeT Model Loader node."),
    (re.compile(r"\(?from model\.generate or model\.encode\)?"), "from the MAGNeT Sampler or Encode Audio"),
    (re.compile(r"\(?from model\.encode\)?"), "from MAGNeT Encode Audio"),
    (re.compile(r"^Codec\.decode got codes"), "input `tokens` has codes"),
    (re.compile(r"^Codec\.decode got code values"), "input `tokens` has code values"),
    (re.compile(r"^Codec\.decode needs integer codes"), "input `tokens` must hold integer codes"),
    (re.compile(r"^codes (must|have)"), r"input `tokens`: codes \1"),
    (re.compile(r"^prompt codes have"), "input `prompt_tokens` has codes of"),
    (re.compile(r"^prompt must be integer codes"), "input `prompt_tokens` must be integer codes"),
    (re.compile(r"^start (\S+ s) is at or beyond"), r"input `start` (\1) is at or beyond"),
    (re.compile(r"^ar_seconds (\S+)"), r"input `seconds` \1"),
    (re.compile(r"^rescorer weight"), "input `weight`"),
    (re.compile(r"^repeats "), "input `repeats` "),
]


def node_wording(message: str) -> str:
    for pattern, replacement in NODE_WORDING:
        message = pattern.sub(replacement, message)
    return message


def prefixed(node: str, message: str) -> str:
    """`node: message`, exactly once, in node wording."""
    message = node_wording(message.strip())
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


def seed_arg(seed) -> int:
    """The seed widget's value (or a linked INT/FLOAT) as the engine's seed; NaN, infinite or fractional values
    are refused naming the input (negative values wrap, as the engine's and ComfyUI's do)."""
    if isinstance(seed, float) and not (math.isfinite(seed) and seed.is_integer()):
        raise MagnetError(f"input `seed` is {seed}: use a whole number (0 to 18446744073709551615).")
    try:
        return check_seed(seed)
    except MagnetError:
        raise MagnetError(f"input `seed` {seed!r} must be a whole number (0 to 18446744073709551615).") from None


# -- the widgets of every node that samples MAGNeT ---------------------------------------------------------

SEED_TOOLTIP = ("random seed; the same seed and settings give the same audio. control_after_generate picks the "
                "next one (randomize / increment / fixed); the seed used is the value shown in the widget")


def seed_input(tooltip: str = SEED_TOOLTIP) -> tuple:
    """The seed widget: 0 to 2**64 - 1 (what `seed_arg` takes), with ComfyUI's control_after_generate."""
    return ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                    "tooltip": tooltip})


# "The release's own" setting (what its xp.cfg `generate.lm` stores): -1 in a number widget, the first choice
# `release` in a choice widget, `auto` in decoding_steps. `sampling_params` passes it to the engine as None.
OWN, RELEASE = -1, "release"


def _own(*names: str) -> str:
    """'-1 = the release's own: ' and what the releases use (`magnet.defaults.KINDS`, so it cannot drift)."""
    return f"{OWN} = the release's own: {per_release(*names)}"


# The sampling widgets, in widget order (ComfyUI saves widget values by position: add a new one at the end and
# give the workflows its value). Each name is a `SamplingParams` field. They are optional inputs, first among a
# node's optional ones: an API prompt that leaves one out gets the release's own.
SAMPLING_WIDGETS = {
    "decoding_steps": ("STRING", {"default": "auto",
                                  "tooltip": f"decoding steps per codebook, e.g. {','.join(map(str, DEFAULT_STEPS))}. "
                                             f"auto = the release's own: {per_release('decoding_steps')} (a release "
                                             f"that stores none: {fallback('decoding_steps')}). Numbers you type "
                                             f"win"}),
    "temperature": ("FLOAT", {"default": float(OWN), "min": float(OWN), "max": 20.0, "step": 0.05,
                              "tooltip": "initial temperature, annealed to 0 within each codebook. "
                                         + _own("temperature")}),
    "top_k": ("INT", {"default": OWN, "min": OWN, "max": 100000,
                      "tooltip": "sample among the k most likely tokens; 0 = off (used when top_p is 0). "
                                 + _own("top_k")}),
    "top_p": ("FLOAT", {"default": float(OWN), "min": float(OWN), "max": 1.0, "step": 0.01,
                        "tooltip": "nucleus sampling; 0 = off. " + _own("top_p")}),
    "max_cfg_coef": ("FLOAT", {"default": float(OWN), "min": float(OWN), "max": 100.0, "step": 0.1,
                               "tooltip": "classifier-free guidance at the start of each codebook, annealed to "
                                          "min_cfg_coef. " + _own("max_cfg_coef")}),
    "min_cfg_coef": ("FLOAT", {"default": float(OWN), "min": float(OWN), "max": 100.0, "step": 0.1,
                               "tooltip": "guidance at the end of each codebook. " + _own("min_cfg_coef")
                                          + f" (guidance {per_release('max_cfg_coef', 'min_cfg_coef', join=' -> ')})"}),
    "span_arrangement": ([RELEASE, *SPAN_ARRANGEMENTS], {
        "default": RELEASE,
        "tooltip": f"{RELEASE} = the release's own ({per_release('span_arrangement')}). nonoverlap: re-mask whole "
                   f"3-frame spans (the length is trimmed to a multiple of 3 frames); stride1: overlapping spans"}),
    "span_scoring": ([RELEASE, *SPAN_SCORINGS], {
        "default": RELEASE,
        "tooltip": f"how a span's confidence is scored: max or prod. {RELEASE} = the release's own "
                   f"({per_release('span_scoring')})"}),
    "fast": ("BOOLEAN", {"default": False, "label_on": "fast", "label_off": "exact", "tooltip": FastMode().summary()}),
}


def sampling_inputs(required: dict, optional: dict | None = None) -> dict:
    """INPUT_TYPES of a node that samples MAGNeT: its own `required` inputs, then the sampling widgets (first
    among the optional inputs), then its own `optional` ones."""
    return {"required": required, "optional": {**SAMPLING_WIDGETS, **(optional or {})}}


def sampling_params(m, **widgets) -> SamplingParams:
    """The sampling widgets (by name, any of SAMPLING_WIDGETS; one left out = the release's own) as the
    model's checked SamplingParams. -1 and `release` become None, the release's own (decoding_steps `auto`
    is resolved by the engine the same way); numbers are checked at the boundary (a link may carry NaN)."""
    fields = {}
    for name, value in widgets.items():
        kind = SAMPLING_WIDGETS[name][0]
        if isinstance(kind, list):
            value = None if value == RELEASE else value
        elif kind in ("INT", "FLOAT"):
            number = finite(value, name)
            if number == OWN:
                value = None
            elif number < 0:
                raise MagnetError(f"input `{name}` is {number:g}: use {OWN} for the release's own, or a value "
                                  f"of at least 0.")
        elif kind == "BOOLEAN":
            value = bool(value)
        fields[name] = value
    return m.sampling_params(**fields)


MODEL_INPUT = (MODEL, {"tooltip": "the MAGNeT release, from the MAGNeT Model Loader"})
RESCORER_INPUT = (RESCORER, {"tooltip": "optional: an autoregressive model that rescores the spans (from Rescorer "
                                        "(MusicGen)); slower, better"})


def check_rescorer(r, m):
    """The (readied) rescorer, checked against the MAGNeT model (same codec and T5); None stays None."""
    if r is not None and hasattr(r, "check_compatible"):
        r.check_compatible(m)
    return r


def ready_to_sample(model, rescorer, seed, widgets: dict) -> tuple[Any, dict]:
    """What every sampling node does before it calls the engine: the seed checked, the model and rescorer
    readied together, the sampling widgets made into checked SamplingParams (once). Returns the model and the
    keywords of its `*_from_condition` call (params, seed, progress, rescorer)."""
    seed = seed_arg(seed)
    m, r = ready(model, rescorer)
    params = sampling_params(m, **widgets)
    return m, dict(params=params, seed=seed, progress=comfy.Progress(), rescorer=check_rescorer(r, m))


def sampled_tokens(result, codec, **extra) -> dict:
    """MAGNET_TOKENS from the engine's `Generated` (codes, seed): the seed that made them travels along."""
    return {**tokens_payload(result.codes, codec), "seed": int(result.seed), **extra}


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
        raise MagnetError(f"input `{what}` could not be read ({first_line(e)}). "
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
