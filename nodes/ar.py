"""The autoregressive side: a MusicGen release as an AR prompt writer (hybrid MAGNeT) and as a rescorer."""
from __future__ import annotations

from ..magnet.errors import MagnetError
from ..magnet.musicgen import ARParams, MusicGenModel, MusicGenRescorer, ar_prompt_from_condition
from . import comfy
from .common import (AR_MODEL, CATEGORY, CONDITIONING, MODEL, RESCORER, TOKENS, Handle, check_tokens,
                     tokens_payload, user_errors)
from .loaders import DEVICES, DTYPES, list_releases, load_cached


class MagnetMusicGenLoader:
    """Loads an official MusicGen release (facebook/musicgen-small, -medium) from models/magnet: it shares the
    32 kHz codec and t5-base with the music MAGNeT releases."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "release": (list_releases(), {"tooltip": "a MusicGen release folder under models/magnet"}),
            "device": (DEVICES, {"default": "auto"}),
            "dtype": (["auto", *DTYPES], {"default": "auto"}),
        }}

    RETURN_TYPES = (AR_MODEL,)
    RETURN_NAMES = ("ar_model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, release, device="auto", dtype="auto"):
        node = "MAGNeT MusicGen Loader"

        def build(path, home, dev, dt):
            m = MusicGenModel.from_pretrained(path, text_encoder=False, device=home, dtype=dt,
                                              search_dirs=comfy.model_dirs("magnet"))
            return Handle(m, path.name, [comfy.manage(m.lm, dev)])
        with user_errors(node):
            return (load_cached(self, "musicgen", "magnet", release, node, "release", device, build, dtype),)


class MagnetARPrompt:
    """Hybrid MAGNeT, first half: MusicGen writes the first `seconds` autoregressively; connect the tokens to
    the MAGNeT Sampler's `prompt_tokens`, which keeps them and fills the rest in parallel."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ar_model": (AR_MODEL,),
                "model": (MODEL, {"tooltip": "the MAGNeT model the tokens are for (codec and T5 must match)"}),
                "conditioning": (CONDITIONING,),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
                "seconds": ("FLOAT", {"default": 3.0, "min": 0.1, "max": 30.0, "step": 0.1,
                                      "tooltip": "how much MusicGen writes before MAGNeT takes over"}),
                "temperature": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05}),
                "top_k": ("INT", {"default": 250, "min": 0, "max": 100000}),
                "top_p": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01}),
                "cfg_coef": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 100.0, "step": 0.1}),
            },
            "optional": {"prompt_tokens": (TOKENS, {"tooltip": "audio for MusicGen to continue"})},
        }

    RETURN_TYPES = (TOKENS,)
    RETURN_NAMES = ("tokens",)
    FUNCTION = "generate"
    CATEGORY = CATEGORY

    def generate(self, ar_model, model, conditioning, seed, seconds, temperature, top_k, top_p, cfg_coef,
                 prompt_tokens=None):
        node = "MAGNeT AR Prompt (MusicGen)"
        with user_errors(node):
            m, ar = model.ready(), ar_model.ready()
            prompt = None if prompt_tokens is None else check_tokens(prompt_tokens, m.codec, node, "prompt_tokens")
            params = ARParams(temperature=temperature, top_k=top_k, top_p=top_p, cfg_coef=cfg_coef)
            codes = ar_prompt_from_condition(m, ar, conditioning, ar_frames=int(round(seconds * m.frame_rate)),
                                             ar_params=params, seed=seed, prompt=prompt, progress=comfy.Progress())
            return (tokens_payload(codes, m.codec),)


class MagnetRescorer:
    """Wraps a MusicGen model as a rescorer for the MAGNeT Sampler: after each decoding step MusicGen scores
    the sampled tokens and spans are re-masked by `weight * p_musicgen + (1 - weight) * p_magnet`.
    Better quality, about twice the time per step."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ar_model": (AR_MODEL,),
            "weight": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05,
                                 "tooltip": "0 = MAGNeT alone (exactly), 1 = MusicGen alone"}),
            "cfg_coef": ("FLOAT", {"default": 3.0, "min": 1.0, "max": 100.0, "step": 0.1,
                                   "tooltip": "guidance of MusicGen's probabilities; 1 halves its cost"}),
        }}

    RETURN_TYPES = (RESCORER,)
    RETURN_NAMES = ("rescorer",)
    FUNCTION = "build"
    CATEGORY = CATEGORY

    def build(self, ar_model, weight, cfg_coef):
        with user_errors("MAGNeT Rescorer"):
            if not 0.0 <= weight <= 1.0:
                raise MagnetError(f"input `weight` {weight} must be between 0 and 1.")
            rescorer = MusicGenRescorer(ar_model.obj, weight=weight, cfg_coef=cfg_coef)
            return (Handle(rescorer, ar_model.name, ar_model.patchers),)
