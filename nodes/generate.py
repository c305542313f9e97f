"""Text conditioning and the non-autoregressive sampler."""
from __future__ import annotations

from ..magnet.sampling import SPAN_ARRANGEMENTS, SPAN_SCORINGS, SamplingParams, parse_steps
from . import comfy
from .common import (CATEGORY, CONDITIONING, MODEL, RESCORER, TEXT_ENCODER, TOKENS, check_tokens, tokens_payload,
                     user_errors)


def split_prompts(text: str, variations: int) -> list[str]:
    """One prompt per non-empty line (no line at all: one unconditional prompt), each repeated `variations` times."""
    prompts = [line.strip() for line in str(text).splitlines() if line.strip()] or [""]
    return [p for p in prompts for _ in range(max(1, int(variations)))]


class MagnetTextEncode:
    """Prompts -> MAGNET_CONDITIONING (T5 states of the prompts and of their null prompts)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": (TEXT_ENCODER,),
            "text": ("STRING", {"multiline": True, "default": "80s thrash metal intro riff",
                                "tooltip": "one prompt per line; several lines make a batch. Empty: unconditional"}),
            "variations": ("INT", {"default": 1, "min": 1, "max": 64,
                                   "tooltip": "how many times each prompt is repeated in the batch"}),
        }}

    RETURN_TYPES = (CONDITIONING,)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, text_encoder, text, variations=1):
        with user_errors("MAGNeT Text Encode"):
            te = text_encoder.ready()
            return (te.encode(split_prompts(text, variations)),)


class MagnetSampler:
    """MAGNeT's masked non-autoregressive decoding: model + conditioning (+ optional prompt tokens,
    optional rescorer) -> MAGNET_TOKENS. Advances the progress bar every decoding step; Cancel stops it
    within one step."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL,),
                "conditioning": (CONDITIONING,),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
                "duration": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 3600.0, "step": 0.1,
                                       "tooltip": "seconds of audio; 0 = the model's window (10 or 30 s). Longer "
                                                  "durations slide the window, each part continuing the last"}),
                "overlap": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 60.0, "step": 0.1,
                                      "tooltip": "beyond the window: seconds each new part continues from; "
                                                 "0 = half the window"}),
                "decoding_steps": ("STRING", {"default": "20,10,10,10",
                                              "tooltip": "decoding steps per codebook (the 30 s releases: 60,10,10,10)"}),
                "temperature": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 20.0, "step": 0.05,
                                          "tooltip": "initial temperature, annealed to 0 within each codebook"}),
                "top_k": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "0 = off; used when top_p is 0"}),
                "top_p": ("FLOAT", {"default": 0.9, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "0 = off"}),
                "max_cfg_coef": ("FLOAT", {"default": 10.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                           "tooltip": "guidance at the start of each codebook (audio-magnet: 20)"}),
                "min_cfg_coef": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                           "tooltip": "guidance at the end of each codebook"}),
                "span_arrangement": (list(SPAN_ARRANGEMENTS), {"default": "nonoverlap"}),
                "span_scoring": (list(SPAN_SCORINGS), {"default": "max"}),
            },
            "optional": {
                "fast": ("BOOLEAN", {"default": False, "label_on": "fast", "label_off": "exact",
                                     "tooltip": "fast mode: at most 5 steps for codebooks 1-3, int8 layers on "
                                                "the CPU, no null pass where guidance is 1 (see README)"}),
                "prompt_tokens": (TOKENS, {"tooltip": "audio to continue: kept unchanged at the start"}),
                "rescorer": (RESCORER, {"tooltip": "an autoregressive model that rescores the spans"}),
            },
        }

    RETURN_TYPES = (TOKENS,)
    RETURN_NAMES = ("tokens",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    def sample(self, model, conditioning, seed, duration, overlap, decoding_steps, temperature, top_k, top_p,
               max_cfg_coef, min_cfg_coef, span_arrangement, span_scoring, fast=False, prompt_tokens=None,
               rescorer=None):
        node = "MAGNeT Sampler"
        with user_errors(node):
            m = model.ready()
            params = sampling_params(m, decoding_steps, temperature, top_k, top_p, max_cfg_coef, min_cfg_coef,
                                     span_arrangement, span_scoring)
            frames = m.frames_for(duration if duration > 0 else None)
            prompt = None if prompt_tokens is None else check_tokens(prompt_tokens, m.codec, node, "prompt_tokens")
            resc = ready_rescorer(rescorer, m)
            progress = comfy.Progress()
            codes = m.generate_from_condition(conditioning, frames=frames, params=params, seed=seed, prompt=prompt,
                                              progress=progress, rescorer=resc, overlap=overlap or None,
                                              fast=bool(fast))
            return (tokens_payload(codes, m.codec),)


def ready_rescorer(rescorer, m):
    """The rescorer's model on its device, checked against the MAGNeT model (same codec and T5)."""
    if rescorer is None:
        return None
    r = rescorer.ready()
    if hasattr(r, "check_compatible"):
        r.check_compatible(m)
    return r


def sampling_params(m, decoding_steps, temperature, top_k, top_p, max_cfg_coef, min_cfg_coef, span_arrangement,
                    span_scoring) -> SamplingParams:
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_cfg_coef=max_cfg_coef,
                          min_cfg_coef=min_cfg_coef, decoding_steps=parse_steps(decoding_steps),
                          span_arrangement=span_arrangement, span_scoring=span_scoring).check(m.cfg.n_q)


SAMPLING_INPUTS = {k: v for k, v in MagnetSampler.INPUT_TYPES()["required"].items()
                   if k in ("decoding_steps", "temperature", "top_k", "top_p", "max_cfg_coef", "min_cfg_coef",
                            "span_arrangement", "span_scoring")}


class MagnetRegenerateRegion:
    """Redo seconds [start, end) of MAGNET_TOKENS, conditioned on the audio on both sides; everything
    outside the range stays bit-identical."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL,),
                "conditioning": (CONDITIONING, {"tooltip": "one prompt for all rows, or one per row"}),
                "tokens": (TOKENS,),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
                "start": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 36000.0, "step": 0.05,
                                    "tooltip": "seconds; widened outwards to whole 20 ms frames"}),
                "end": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 36000.0, "step": 0.05}),
                **SAMPLING_INPUTS,
            },
            "optional": {"rescorer": (RESCORER,)},
        }

    RETURN_TYPES = (TOKENS,)
    RETURN_NAMES = ("tokens",)
    FUNCTION = "regenerate"
    CATEGORY = CATEGORY

    def regenerate(self, model, conditioning, tokens, seed, start, end, decoding_steps, temperature, top_k, top_p,
                   max_cfg_coef, min_cfg_coef, span_arrangement, span_scoring, rescorer=None):
        node = "MAGNeT Regenerate Region"
        with user_errors(node):
            m = model.ready()
            params = sampling_params(m, decoding_steps, temperature, top_k, top_p, max_cfg_coef, min_cfg_coef,
                                     span_arrangement, span_scoring)
            codes = check_tokens(tokens, m.codec, node)
            resc = ready_rescorer(rescorer, m)
            out = m.regenerate_from_condition(conditioning, codes, start, end, params=params, seed=seed,
                                              progress=comfy.Progress(), rescorer=resc)
            return (tokens_payload(out, m.codec),)
