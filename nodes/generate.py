"""Text conditioning and the non-autoregressive sampler."""
from __future__ import annotations

from .common import (CATEGORY, CONDITIONING, MODEL, MODEL_INPUT, RESCORER_INPUT, TEXT_ENCODER, TOKENS, check_tokens,
                     finite, ready_to_sample, sampled_tokens, sampling_inputs, seed_input, user_errors)


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


class MagnetSampler:
    """MAGNeT's masked non-autoregressive decoding: model + conditioning (+ optional prompt tokens,
    optional rescorer) -> MAGNET_TOKENS. Advances the progress bar every decoding step; Cancel stops it
    within one step."""

    DISPLAY_NAME = "MAGNeT Sampler"
    DESCRIPTION = ("Generates audio tokens with MAGNeT's masked parallel decoding from a model and prompts; "
                   "durations beyond the model's window slide it. Decode the tokens with MAGNeT Decode Audio.")

    @classmethod
    def INPUT_TYPES(cls):
        return sampling_inputs({
            "model": MODEL_INPUT,
            "conditioning": (CONDITIONING, {"tooltip": "the prompts, from MAGNeT Text Encode (its T5 must "
                                                       "match the release: t5-base music, t5-large sound)"}),
            "seed": seed_input(),
            "duration": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 3600.0, "step": 0.1,
                                   "tooltip": "seconds of audio; 0 = the model's window (10 or 30 s). Longer "
                                              "durations slide the window, each part continuing the last"}),
            "overlap": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 60.0, "step": 0.1,
                                  "tooltip": "beyond the window: seconds each new part continues from; "
                                             "0 = half the window"}),
        }, {
            "prompt_tokens": (TOKENS, {"tooltip": "audio to continue (from Encode Audio or AR Prompt): kept "
                                                  "unchanged at the start"}),
            "rescorer": RESCORER_INPUT,
        })

    RETURN_TYPES = (TOKENS,)
    RETURN_NAMES = ("tokens",)
    OUTPUT_TOOLTIPS = ("the generated audio tokens: connect to MAGNeT Decode Audio (or Regenerate Region)",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    def sample(self, model, conditioning, seed, duration, overlap, *, prompt_tokens=None, rescorer=None,
               **sampling):
        with user_errors(self.DISPLAY_NAME):
            duration = finite(duration, "duration", minimum=0.0)
            overlap = finite(overlap, "overlap", minimum=0.0)
            m, run = ready_to_sample(model, rescorer, seed, sampling)
            frames = m.frames_for(duration if duration > 0 else None)
            prompt = None if prompt_tokens is None else check_tokens(prompt_tokens, m.codec, "prompt_tokens")
            out = m.generate_from_condition(conditioning, frames=frames, prompt=prompt, overlap=overlap or None,
                                            **run)
            return (sampled_tokens(out, m.codec),)


class MagnetRegenerateRegion:
    """Redo seconds [start, end) of MAGNET_TOKENS, conditioned on the audio on both sides; everything
    outside the range stays bit-identical."""

    DISPLAY_NAME = "MAGNeT Regenerate Region"
    DESCRIPTION = ("Generates seconds start..end of existing tokens again, conditioned on the audio on both "
                   "sides; everything outside the region stays bit-identical. Works on encoded recordings too.")

    @classmethod
    def INPUT_TYPES(cls):
        return sampling_inputs({
            "model": (MODEL, {"tooltip": "the MAGNeT release the tokens were made with (same codec)"}),
            "conditioning": (CONDITIONING, {"tooltip": "one prompt for all rows, or one per row"}),
            "tokens": (TOKENS, {"tooltip": "the audio tokens to edit (from the Sampler or Encode Audio)"}),
            "seed": seed_input(),
            "start": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 36000.0, "step": 0.05,
                                "tooltip": "seconds; widened outwards to whole 20 ms frames"}),
            "end": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 36000.0, "step": 0.05,
                              "tooltip": "seconds, after start; the region can be at most the window less "
                                         "one span (9.9 s for a 10 s release)"}),
        }, {"rescorer": RESCORER_INPUT})

    RETURN_TYPES = (TOKENS,)
    RETURN_NAMES = ("tokens",)
    OUTPUT_TOOLTIPS = ("the tokens with the region regenerated (same length): connect to MAGNeT Decode Audio",)
    FUNCTION = "regenerate"
    CATEGORY = CATEGORY

    def regenerate(self, model, conditioning, tokens, seed, start, end, *, rescorer=None, **sampling):
        with user_errors(self.DISPLAY_NAME):
            start, end = finite(start, "start"), finite(end, "end")
            m, run = ready_to_sample(model, rescorer, seed, sampling)
            out = m.regenerate_from_condition(conditioning, check_tokens(tokens, m.codec), start, end, **run)
            return (sampled_tokens(out, m.codec),)
