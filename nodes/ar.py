"""The autoregressive side: a MusicGen release as an AR prompt writer (hybrid MAGNeT) and as a rescorer."""
from __future__ import annotations

from ..magnet.musicgen import (ARParams, MusicGenModel, MusicGenRescorer, ar_prompt_from_condition,
                               ar_seconds_to_frames)
from . import comfy
from .common import (AR_MODEL, CATEGORY, CONDITIONING, MODEL, RESCORER, TOKENS, Handle, check_tokens, finite, ready,
                     seed_arg, seed_input, tokens_payload, user_errors)
from .loaders import device_input, download_input, dtype_input, label, list_releases, load_cached, with_official


class MagnetMusicGenLoader:
    """Loads an official MusicGen release (facebook/musicgen-small, -medium) from models/magnet: it shares the
    32 kHz codec and t5-base with the music MAGNeT releases."""

    DISPLAY_NAME = "MAGNeT MusicGen Loader"
    DESCRIPTION = ("Loads an official MusicGen release (facebook/musicgen-small, -medium) from models/magnet, "
                   "for hybrid generation (AR Prompt) and rescoring (Rescorer) with a music MAGNeT release.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "release": (with_official(list_releases("musicgen"), "magnet", "musicgen"), {
                "tooltip": "a MusicGen release under models/magnet (folder with state_dict.bin + "
                           "compression_state_dict.bin, or a converted .safetensors); MAGNeT releases are in "
                           "the MAGNeT Model Loader. musicgen-small/-medium are listed even when not on disk "
                           "(see download)"}),
            "device": device_input(),
            "dtype": dtype_input(),
        }, "optional": {"download": download_input()}}

    RETURN_TYPES = (AR_MODEL,)
    RETURN_NAMES = ("ar_model",)
    OUTPUT_TOOLTIPS = ("the MusicGen model: connect to AR Prompt (MusicGen) or Rescorer (MusicGen)",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, release, device="auto", dtype="auto", download="if missing"):
        def build(path, home, dev, dt):
            m = MusicGenModel.from_pretrained(path, text_encoder=False, device=home, dtype=dt,
                                              search_dirs=comfy.model_dirs("magnet"))
            return Handle(m, path.name, [comfy.manage(m.lm, dev, f"MusicGen LM ({label(path)})")])
        with user_errors(self.DISPLAY_NAME):
            return (load_cached(self, "musicgen", "magnet", release, "release", device, build, dtype, download),)


class MagnetARPrompt:
    """Hybrid MAGNeT, first half: MusicGen writes the first `seconds` autoregressively; connect the tokens to
    the MAGNeT Sampler's `prompt_tokens`, which keeps them and fills the rest in parallel."""

    DISPLAY_NAME = "MAGNeT AR Prompt (MusicGen)"
    DESCRIPTION = ("Hybrid MAGNeT: MusicGen writes the first seconds autoregressively; connect its tokens to the "
                   "MAGNeT Sampler's prompt_tokens, which keeps them and fills in the rest in parallel.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ar_model": (AR_MODEL, {"tooltip": "MusicGen, from the MAGNeT MusicGen Loader"}),
                "model": (MODEL, {"tooltip": "the MAGNeT model the tokens are for (codec and T5 must match: a "
                                             "music release with MusicGen)"}),
                "conditioning": (CONDITIONING, {"tooltip": "the prompts, from MAGNeT Text Encode (the same one "
                                                           "the Sampler uses)"}),
                "seed": seed_input("random seed of MusicGen's sampling; the same seed gives the same tokens"),
                "seconds": ("FLOAT", {"default": 3.0, "min": 0.1, "max": 30.0, "step": 0.1,
                                      "tooltip": "how much MusicGen writes before MAGNeT takes over (3 s typical)"}),
                "temperature": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                          "tooltip": "MusicGen's sampling temperature (its default: 1.0); "
                                                     "0 = greedy"}),
                "top_k": ("INT", {"default": 250, "min": 0, "max": 100000,
                                  "tooltip": "sample among the k most likely tokens (MusicGen's default: 250); "
                                             "0 = off"}),
                "top_p": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "nucleus sampling instead of top_k when > 0 (MusicGen's default: "
                                               "0 = off)"}),
                "cfg_coef": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                       "tooltip": "classifier-free guidance (MusicGen's default: 3.0); 1 = none"}),
            },
            "optional": {"prompt_tokens": (TOKENS, {"tooltip": "audio for MusicGen to continue (from Encode "
                                                               "Audio); optional"})},
        }

    RETURN_TYPES = (TOKENS,)
    RETURN_NAMES = ("tokens",)
    OUTPUT_TOOLTIPS = ("MusicGen's first seconds as tokens: connect to the MAGNeT Sampler's prompt_tokens",)
    FUNCTION = "generate"
    CATEGORY = CATEGORY

    def generate(self, ar_model, model, conditioning, seed, seconds, temperature, top_k, top_p, cfg_coef,
                 prompt_tokens=None):
        with user_errors(self.DISPLAY_NAME):
            seed = seed_arg(seed)
            seconds = finite(seconds, "seconds")
            m = model.obj               # MAGNeT is only consulted (codec, frame rate): not loaded onto the GPU
            ar, = ready(ar_model)
            prompt = None if prompt_tokens is None else check_tokens(prompt_tokens, m.codec, "prompt_tokens")
            params = ARParams(temperature=temperature, top_k=top_k, top_p=top_p, cfg_coef=cfg_coef)
            codes = ar_prompt_from_condition(m, ar, conditioning, ar_frames=ar_seconds_to_frames(m, seconds),
                                             ar_params=params, seed=seed, prompt=prompt, progress=comfy.Progress())
            return (tokens_payload(codes, m.codec),)


class MagnetRescorer:
    """Wraps a MusicGen model as a rescorer for the MAGNeT Sampler: after each decoding step MusicGen scores
    the sampled tokens and spans are re-masked by `weight * p_musicgen + (1 - weight) * p_magnet`.
    Better quality, about twice the time per step."""

    DISPLAY_NAME = "MAGNeT Rescorer (MusicGen)"
    DESCRIPTION = ("Makes MusicGen a rescorer for the MAGNeT Sampler: after each decoding step it rescores the "
                   "sampled spans (weight * p_musicgen + (1 - weight) * p_magnet). Better quality, about twice "
                   "the time per step.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ar_model": (AR_MODEL, {"tooltip": "MusicGen, from the MAGNeT MusicGen Loader (music releases only)"}),
            "weight": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05,
                                 "tooltip": "0 = MAGNeT alone (exactly), 1 = MusicGen alone"}),
            "cfg_coef": ("FLOAT", {"default": 3.0, "min": 1.0, "max": 100.0, "step": 0.1,
                                   "tooltip": "guidance of MusicGen's probabilities; 1 halves its cost"}),
        }}

    RETURN_TYPES = (RESCORER,)
    RETURN_NAMES = ("rescorer",)
    OUTPUT_TOOLTIPS = ("connect to the MAGNeT Sampler's (or Regenerate Region's) rescorer input",)
    FUNCTION = "build"
    CATEGORY = CATEGORY

    def build(self, ar_model, weight, cfg_coef):
        with user_errors(self.DISPLAY_NAME):
            cfg_coef = finite(cfg_coef, "cfg_coef")
            rescorer = MusicGenRescorer(ar_model.obj, weight=weight, cfg_coef=cfg_coef)
            return (Handle(rescorer, ar_model.name, ar_model.patchers),)
