"""Audio to audio, seamless loops and prompt timelines (thin nodes over `magnet.edit`)."""
from __future__ import annotations

from ..magnet import edit
from .common import (CATEGORY, CODEC, CONDITIONING, MODEL, MODEL_INPUT, RESCORER_INPUT, SEED_TOOLTIP, TEXT_ENCODER,
                     TOKENS, audio_out, check_tokens, finite, ready_to_sample, sampled_tokens, sampling_inputs,
                     seed_input, user_errors)

LOOP_KEY = "loop_duration"    # MAGNET_TOKENS of a loop carry its exact length in seconds


class MagnetAudioToAudio:
    """Redraw a fraction of existing tokens with a prompt (audio to audio); optionally keep the first
    codebooks (rhythm/melody) everywhere."""

    DISPLAY_NAME = "MAGNeT Audio to Audio"
    DESCRIPTION = ("Redraws a share (strength) of a clip's tokens with the prompt, the rest kept as context: a "
                   "variation of a recording or generation, same length. keep_codebooks 1 keeps rhythm and melody.")

    @classmethod
    def INPUT_TYPES(cls):
        return sampling_inputs({
            "model": (MODEL, {"tooltip": "the MAGNeT release whose codec made the tokens"}),
            "conditioning": (CONDITIONING, {"tooltip": "the prompt to steer the redrawn parts, from MAGNeT "
                                                       "Text Encode (one for all rows, or one per row)"}),
            "tokens": (TOKENS, {"tooltip": "the audio to vary: from Encode Audio (a recording) or the Sampler"}),
            "seed": seed_input(SEED_TOOLTIP + "; it also picks which spans are redrawn"),
            "strength": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05,
                                   "tooltip": "share of the clip redrawn: 0 = unchanged, 1 = only the length "
                                              "(and kept codebooks) remain; 0.3-0.6 = a variation"}),
            "keep_codebooks": ("INT", {"default": 0, "min": 0, "max": 31,
                                       "tooltip": "codebooks kept everywhere: 0 = none, 1 = codebook 0 (rhythm, "
                                                  "melody: redraw timbre and detail); at most the model's "
                                                  "codebooks less one"}),
        }, {"rescorer": RESCORER_INPUT})

    RETURN_TYPES = (TOKENS,)
    RETURN_NAMES = ("tokens",)
    OUTPUT_TOOLTIPS = ("the varied tokens (same length): connect to MAGNeT Decode Audio",)
    FUNCTION = "vary"
    CATEGORY = CATEGORY

    def vary(self, model, conditioning, tokens, seed, strength, keep_codebooks, *, rescorer=None, **sampling):
        with user_errors(self.DISPLAY_NAME):
            strength = finite(strength, "strength")
            m, run = ready_to_sample(model, rescorer, seed, sampling)
            out = edit.vary_from_condition(m, conditioning, check_tokens(tokens, m.codec), strength=strength,
                                           keep_codebooks=keep_codebooks, **run)
            return (sampled_tokens(out, m.codec),)


class MagnetSeamlessLoop:
    """Generate a loop whose end flows into its start: length in seconds or in bars at a tempo."""

    DISPLAY_NAME = "MAGNeT Seamless Loop"
    DESCRIPTION = ("Generates a loop whose end flows into its start, the join generated with both sides as "
                   "context; length in seconds or bars at a bpm. Decode it with MAGNeT Decode Loop.")

    @classmethod
    def INPUT_TYPES(cls):
        return sampling_inputs({
            "model": MODEL_INPUT,
            "conditioning": (CONDITIONING, {"tooltip": "the prompts, from MAGNeT Text Encode (several lines = "
                                                       "several loops)"}),
            "seed": seed_input(),
            "duration": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 3600.0, "step": 0.01,
                                   "tooltip": "the loop's seconds; 0 = bars x beats_per_bar at bpm"}),
            "bars": ("INT", {"default": 4, "min": 1, "max": 1000,
                             "tooltip": "bars in the loop (used when duration is 0)"}),
            "bpm": ("FLOAT", {"default": 120.0, "min": 1.0, "max": 1000.0, "step": 0.5,
                              "tooltip": "tempo in beats per minute (used when duration is 0); say it in the "
                                         "prompt too, e.g. '120 bpm'"}),
            "beats_per_bar": ("INT", {"default": 4, "min": 1, "max": 32,
                                      "tooltip": "beats in a bar: 4 for 4/4, 3 for 3/4 (used when duration is 0)"}),
        }, {"rescorer": RESCORER_INPUT,
            "tokens": (TOKENS, {"tooltip": "optional: make these tokens (e.g. Encode Audio of a recording) loop "
                                           "instead of generating; their length is kept and duration/bars/bpm "
                                           "are not used"})})

    RETURN_TYPES = (TOKENS,)
    RETURN_NAMES = ("tokens",)
    OUTPUT_TOOLTIPS = ("the loop's tokens (they remember its exact length): connect to MAGNeT Decode Loop",)
    FUNCTION = "loop"
    CATEGORY = CATEGORY

    def loop(self, model, conditioning, seed, duration, bars, bpm, beats_per_bar, *, rescorer=None, tokens=None,
             **sampling):
        with user_errors(self.DISPLAY_NAME):
            if tokens is None:      # a length to generate (given tokens keep theirs)
                duration = finite(duration, "duration", minimum=0.0)
                bpm = finite(bpm, "bpm")
                seconds = edit.loop_seconds(duration=duration) if duration > 0 else \
                    edit.loop_seconds(bars=bars, bpm=bpm, beats_per_bar=beats_per_bar)
            m, run = ready_to_sample(model, rescorer, seed, sampling)
            if tokens is not None:
                out = edit.loopify_from_condition(m, conditioning, check_tokens(tokens, m.codec), **run)
                return (sampled_tokens(out, m.codec),)
            out = edit.generate_loop_from_condition(m, conditioning, frames=edit.loop_frames(m, seconds), **run)
            return (sampled_tokens(out, m.codec, **{LOOP_KEY: float(seconds)}),)


class MagnetDecodeLoop:
    """Decode loop tokens circularly: the loop (exact length) and it repeated, both seamless."""

    DISPLAY_NAME = "MAGNeT Decode Loop"
    DESCRIPTION = ("Decodes loop tokens so that the audio repeats without a click (the codec decodes around the "
                   "wrap). Gives the loop at its exact length and the loop repeated.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "codec": (CODEC, {"tooltip": "EnCodec, from the MAGNeT Model Loader (the release that made the loop)"}),
            "tokens": (TOKENS, {"tooltip": "loop tokens from MAGNeT Seamless Loop (any tokens are decoded as a "
                                           "loop of their own length)"}),
            "repeats": ("INT", {"default": 3, "min": 1, "max": 1000,
                                "tooltip": "how many times the loop plays in the `repeated` output"}),
        }}

    RETURN_TYPES = ("AUDIO", "AUDIO")
    RETURN_NAMES = ("loop", "repeated")
    OUTPUT_TOOLTIPS = ("the loop once, exactly its length: set a player or sampler to loop it",
                       "the loop played `repeats` times in a row")
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    def decode(self, codec, tokens, repeats=3):
        with user_errors(self.DISPLAY_NAME):
            reps = finite(repeats, "repeats", minimum=1)
            c = codec.ready()
            codes = check_tokens(tokens, c)
            seconds = tokens.get(LOOP_KEY)
            frames = codes.shape[-1] if codes.dim() else None     # odd shapes: the engine names them
            if seconds is not None and round(finite(seconds, LOOP_KEY) * float(c.frame_rate)) != frames:
                seconds = None          # edited since (other length): its own length
            repeated = edit.decode_loop(c, codes, duration=seconds, repeats=reps)   # sized by the engine first
            loop = repeated[..., : repeated.shape[-1] // int(reps)]
            return (audio_out(loop, c.sample_rate), audio_out(repeated, c.sample_rate))


class MagnetPromptTimeline:
    """A timeline of prompts ('0:00 calm piano intro' lines) -> conditioning for the Sampler."""

    DISPLAY_NAME = "MAGNeT Prompt Timeline"
    DESCRIPTION = ("Encodes prompts that change over time, one '0:30 drums come in' line each, for the Sampler: "
                   "each part continues the music before it with its own prompt.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": (TEXT_ENCODER, {"tooltip": "T5, from the MAGNeT Text Encoder Loader (t5-base for "
                                                       "music, t5-large for audio-magnet)"}),
            "timeline": ("STRING", {"multiline": True,
                                    "default": "0:00 calm piano intro\n0:30 drums come in\n1:10 big orchestral finish",
                                    "tooltip": "one prompt per line, each after its start time (m:ss, h:mm:ss or "
                                               "seconds); the first at 0:00, times increasing, all before the "
                                               "Sampler's duration"}),
        }}

    RETURN_TYPES = (CONDITIONING,)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("the encoded timeline: connect to the Sampler's conditioning (its duration sets the "
                       "length; prompt_tokens, if any, are continued)",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, text_encoder, timeline):
        with user_errors(self.DISPLAY_NAME):
            entries = edit.parse_timeline(timeline)       # a bad line fails before T5 loads
            return (edit.encode_timeline(text_encoder.ready(), entries),)
