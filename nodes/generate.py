"""Text conditioning and the non-autoregressive sampler."""
from __future__ import annotations

from ..magnet.sampling import SPAN_ARRANGEMENTS, SPAN_SCORINGS, FastMode, SamplingParams, parse_steps
from . import comfy
from .common import (CATEGORY, CONDITIONING, MODEL, RESCORER, TEXT_ENCODER, TOKENS, check_tokens, finite, ready,
                     seed_arg, tokens_payload, user_errors)


def split_prompts(text: str, variations: int) -> list[str]:
    """One prompt per non-empty line (no line at all: one unconditional prompt), each repeated `variations` times."""
    prompts = [line.strip() for line in str(text).splitlines() if line.strip()] or [""]
    return [p for p in prompts for _ in range(max(1, int(variations)))]


class MagnetTextEncode:
    """Prompts -> MAGNET_CONDITIONING (T5 states of the prompts and of their null prompts)."""

    DISPLAY_NAME = "MAGNeT Text Encode"
    DESCRIPTION = ("Encodes prompts with T5 for the Sampler: one prompt per line (several lines make a batch), "
                   "each repeated `variations` times. An empty text generates unconditionally.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": (TEXT_ENCODER, {"tooltip": "T5, from the MAGNeT Text Encoder Loader (t5-base for "
                                                       "music, t5-large for audio-magnet)"}),
            "text": ("STRING", {"multiline": True, "default": "80s thrash metal intro riff",
                                "tooltip": "one prompt per line; several lines make a batch. Empty: unconditional"}),
            "variations": ("INT", {"default": 1, "min": 1, "max": 64,
                                   "tooltip": "how many times each prompt is repeated in the batch (4 + CLAP "
                                              "Rank = best of four)"}),
        }}

    RETURN_TYPES = (CONDITIONING,)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("the encoded prompts (batch = lines x variations): connect to the Sampler",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, text_encoder, text, variations=1):
        with user_errors(self.DISPLAY_NAME):
            te = text_encoder.ready()
            return (te.encode(split_prompts(text, variations)),)


FAST_INPUT = {"fast": ("BOOLEAN", {"default": False, "label_on": "fast", "label_off": "exact",
                                  "tooltip": FastMode().summary()})}

SEED_TOOLTIP = ("random seed; the same seed and settings give the same audio. control_after_generate picks the "
                "next one (randomize / increment / fixed); the seed used is the value shown in the widget")


class MagnetSampler:
    """MAGNeT's masked non-autoregressive decoding: model + conditioning (+ optional prompt tokens,
    optional rescorer) -> MAGNET_TOKENS. Advances the progress bar every decoding step; Cancel stops it
    within one step."""

    DISPLAY_NAME = "MAGNeT Sampler"
    DESCRIPTION = ("Generates audio tokens with MAGNeT's masked parallel decoding from a model and prompts; "
                   "durations beyond the model's window slide it. Decode the tokens with MAGNeT Decode Audio.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "the MAGNeT release, from the MAGNeT Model Loader"}),
                "conditioning": (CONDITIONING, {"tooltip": "the prompts, from MAGNeT Text Encode (its T5 must "
                                                           "match the release: t5-base music, t5-large sound)"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": SEED_TOOLTIP}),
                "duration": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 3600.0, "step": 0.1,
                                       "tooltip": "seconds of audio; 0 = the model's window (10 or 30 s). Longer "
                                                  "durations slide the window, each part continuing the last"}),
                "overlap": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 60.0, "step": 0.1,
                                      "tooltip": "beyond the window: seconds each new part continues from; "
                                                 "0 = half the window"}),
                "decoding_steps": ("STRING", {"default": "auto",
                                              "tooltip": "decoding steps per codebook, e.g. 20,10,10,10. auto = the "
                                                         "release's own: 60,10,10,10 in the 30 s music releases, "
                                                         "20,10,10,10 in the 10 s ones and audio-magnet (else "
                                                         "20,10,10,10). Numbers you type win"}),
                "temperature": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 20.0, "step": 0.05,
                                          "tooltip": "initial temperature, annealed to 0 within each codebook. "
                                                     "The releases use: music 3.0, audio-magnet 3.5"}),
                "top_k": ("INT", {"default": 0, "min": 0, "max": 100000,
                                  "tooltip": "sample among the k most likely tokens; 0 = off (used when top_p "
                                             "is 0). The releases use top_p instead"}),
                "top_p": ("FLOAT", {"default": 0.9, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "nucleus sampling; 0 = off. The releases use: music 0.9, "
                                               "audio-magnet 0.8"}),
                "max_cfg_coef": ("FLOAT", {"default": 10.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                           "tooltip": "classifier-free guidance at the start of each codebook, "
                                                      "annealed to min_cfg_coef. The releases use: music 10, "
                                                      "audio-magnet 20"}),
                "min_cfg_coef": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                           "tooltip": "guidance at the end of each codebook. The releases use 1 "
                                                      "(music 10 -> 1, audio-magnet 20 -> 1)"}),
                "span_arrangement": (list(SPAN_ARRANGEMENTS), {
                    "default": "nonoverlap",
                    "tooltip": "nonoverlap: re-mask whole 3-frame spans (the releases' setting; the length is "
                               "trimmed to a multiple of 3 frames); stride1: overlapping spans"}),
                "span_scoring": (list(SPAN_SCORINGS), {
                    "default": "max",
                    "tooltip": "how a span's confidence is scored: max (the releases' setting) or prod"}),
            },
            "optional": {
                **FAST_INPUT,
                "prompt_tokens": (TOKENS, {"tooltip": "audio to continue (from Encode Audio or AR Prompt): kept "
                                                      "unchanged at the start"}),
                "rescorer": (RESCORER, {"tooltip": "an autoregressive model that rescores the spans (from "
                                                   "Rescorer (MusicGen)); slower, better"}),
            },
        }

    RETURN_TYPES = (TOKENS,)
    RETURN_NAMES = ("tokens",)
    OUTPUT_TOOLTIPS = ("the generated audio tokens: connect to MAGNeT Decode Audio (or Regenerate Region)",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    def sample(self, model, conditioning, seed, duration, overlap, decoding_steps, temperature, top_k, top_p,
               max_cfg_coef, min_cfg_coef, span_arrangement, span_scoring, fast=False, prompt_tokens=None,
               rescorer=None):
        with user_errors(self.DISPLAY_NAME):
            seed = seed_arg(seed)
            duration = finite(duration, "duration", minimum=0.0)
            overlap = finite(overlap, "overlap", minimum=0.0)
            m, r = ready(model, rescorer)
            params = sampling_params(m, decoding_steps, temperature, top_k, top_p, max_cfg_coef, min_cfg_coef,
                                     span_arrangement, span_scoring, fast)
            frames = m.frames_for(duration if duration > 0 else None)
            prompt = None if prompt_tokens is None else check_tokens(prompt_tokens, m.codec, "prompt_tokens")
            resc = check_rescorer(r, m)
            progress = comfy.Progress()
            codes = m.generate_from_condition(conditioning, frames=frames, params=params, seed=seed, prompt=prompt,
                                              progress=progress, rescorer=resc, overlap=overlap or None)
            return (tokens_payload(codes, m.codec),)


def check_rescorer(r, m):
    """The (readied) rescorer, checked against the MAGNeT model (same codec and T5); None stays None."""
    if r is not None and hasattr(r, "check_compatible"):
        r.check_compatible(m)
    return r


def sampling_params(m, decoding_steps, temperature, top_k, top_p, max_cfg_coef, min_cfg_coef, span_arrangement,
                    span_scoring, fast=False) -> SamplingParams:
    """The widgets as SamplingParams, checked early (before any model work); decoding_steps 'auto' resolves to
    the release's own steps; `fast` (the switch) becomes `SamplingParams.fast`."""
    for name, value in (("temperature", temperature), ("top_p", top_p), ("max_cfg_coef", max_cfg_coef),
                        ("min_cfg_coef", min_cfg_coef)):
        finite(value, name)
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_cfg_coef=max_cfg_coef,
                          min_cfg_coef=min_cfg_coef, decoding_steps=parse_steps(decoding_steps),
                          span_arrangement=span_arrangement, span_scoring=span_scoring,
                          fast=bool(fast)).check(m.cfg.n_q, getattr(m, "generation_defaults", None))


SAMPLING_INPUTS = {k: v for k, v in MagnetSampler.INPUT_TYPES()["required"].items()
                   if k in ("decoding_steps", "temperature", "top_k", "top_p", "max_cfg_coef", "min_cfg_coef",
                            "span_arrangement", "span_scoring")}


class MagnetRegenerateRegion:
    """Redo seconds [start, end) of MAGNET_TOKENS, conditioned on the audio on both sides; everything
    outside the range stays bit-identical."""

    DISPLAY_NAME = "MAGNeT Regenerate Region"
    DESCRIPTION = ("Generates seconds start..end of existing tokens again, conditioned on the audio on both "
                   "sides; everything outside the region stays bit-identical. Works on encoded recordings too.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "the MAGNeT release the tokens were made with (same codec)"}),
                "conditioning": (CONDITIONING, {"tooltip": "one prompt for all rows, or one per row"}),
                "tokens": (TOKENS, {"tooltip": "the audio tokens to edit (from the Sampler or Encode Audio)"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": SEED_TOOLTIP}),
                "start": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 36000.0, "step": 0.05,
                                    "tooltip": "seconds; widened outwards to whole 20 ms frames"}),
                "end": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 36000.0, "step": 0.05,
                                  "tooltip": "seconds, after start; the region can be at most the window less "
                                             "one span (9.9 s for a 10 s release)"}),
                **SAMPLING_INPUTS,
            },
            "optional": {
                **FAST_INPUT,
                "rescorer": (RESCORER, {"tooltip": "an autoregressive model that rescores the spans (from "
                                                   "Rescorer (MusicGen)); optional"}),
            },
        }

    RETURN_TYPES = (TOKENS,)
    RETURN_NAMES = ("tokens",)
    OUTPUT_TOOLTIPS = ("the tokens with the region regenerated (same length): connect to MAGNeT Decode Audio",)
    FUNCTION = "regenerate"
    CATEGORY = CATEGORY

    def regenerate(self, model, conditioning, tokens, seed, start, end, decoding_steps, temperature, top_k, top_p,
                   max_cfg_coef, min_cfg_coef, span_arrangement, span_scoring, fast=False, rescorer=None):
        with user_errors(self.DISPLAY_NAME):
            seed = seed_arg(seed)
            start, end = finite(start, "start"), finite(end, "end")
            m, r = ready(model, rescorer)
            params = sampling_params(m, decoding_steps, temperature, top_k, top_p, max_cfg_coef, min_cfg_coef,
                                     span_arrangement, span_scoring, fast)
            codes = check_tokens(tokens, m.codec)
            resc = check_rescorer(r, m)
            out = m.regenerate_from_condition(conditioning, codes, start, end, params=params, seed=seed,
                                              progress=comfy.Progress(), rescorer=resc)
            return (tokens_payload(out, m.codec),)
