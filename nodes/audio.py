"""EnCodec encode/decode between ComfyUI AUDIO and MAGNET_TOKENS, and loudness normalisation."""
from __future__ import annotations

from ..magnet.audio import normalize_loudness
from .common import (CATEGORY, CODEC, TOKENS, audio_in, audio_out, check_tokens, finite, tokens_payload,
                     user_errors)


class MagnetEncodeAudio:
    """AUDIO (any rate, mono or stereo) -> MAGNET_TOKENS, e.g. to continue a clip with the sampler."""

    DISPLAY_NAME = "MAGNeT Encode Audio (EnCodec)"
    DESCRIPTION = ("Turns audio (any sample rate, mono or stereo) into MAGNeT tokens with the release's EnCodec, "
                   "e.g. to continue a clip (Sampler prompt_tokens) or to edit a recording (Regenerate Region).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "codec": (CODEC, {"tooltip": "EnCodec, from the MAGNeT Model Loader (the release you will sample "
                                         "with)"}),
            "audio": ("AUDIO", {"tooltip": "any ComfyUI AUDIO: LoadAudio, a video loader's audio, ...; it is "
                                           "resampled and mixed to the codec's rate and channels"}),
            "start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 36000.0, "step": 0.1,
                                "tooltip": "seconds to skip at the start of the audio"}),
            "length": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 36000.0, "step": 0.1,
                                 "tooltip": "seconds to keep after `start`; 0 = all (3 s is a typical prompt)"}),
        }}

    RETURN_TYPES = (TOKENS,)
    RETURN_NAMES = ("tokens",)
    OUTPUT_TOOLTIPS = ("the audio as tokens (50 per second): connect to the Sampler's prompt_tokens or to "
                       "Regenerate Region",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, codec, audio, start=0.0, length=0.0):
        with user_errors(self.DISPLAY_NAME):
            start = finite(start, "start", minimum=0.0)
            length = finite(length, "length", minimum=0.0)
            wav, sr = audio_in(audio)
            c = codec.ready()
            return (tokens_payload(c.encode_audio(wav, sr, start=start, length=length), c),)


class MagnetDecodeAudio:
    """MAGNET_TOKENS -> AUDIO at the codec's rate (32 kHz music, 16 kHz sound effects)."""

    DISPLAY_NAME = "MAGNeT Decode Audio (EnCodec)"
    DESCRIPTION = ("Turns MAGNeT tokens into ComfyUI AUDIO with the release's EnCodec: 32 kHz mono for music, "
                   "16 kHz for sound effects. Feeds SaveAudio, PreviewAudio, CreateVideo and Video Combine.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "codec": (CODEC, {"tooltip": "EnCodec, from the MAGNeT Model Loader (the release that made the "
                                         "tokens)"}),
            "tokens": (TOKENS, {"tooltip": "audio tokens from the Sampler, Regenerate Region or Encode Audio"}),
        }}

    RETURN_TYPES = ("AUDIO",)
    RETURN_NAMES = ("audio",)
    OUTPUT_TOOLTIPS = ("ComfyUI AUDIO (a batch: one clip per prompt x variation)",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    def decode(self, codec, tokens):
        with user_errors(self.DISPLAY_NAME):
            c = codec.ready()
            codes = check_tokens(tokens, c)
            return (audio_out(c.decode(codes), c.sample_rate),)


class MagnetLoudness:
    """Normalise AUDIO to a loudness target in LUFS (pyloudnorm), never clipping above full scale."""

    DISPLAY_NAME = "MAGNeT Loudness Normalize"
    DESCRIPTION = ("Normalises each clip to a loudness target in LUFS (pyloudnorm); the gain is limited so the "
                   "audio never clips.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "audio": ("AUDIO", {"tooltip": "any ComfyUI AUDIO (e.g. from MAGNeT Decode Audio)"}),
            "target_lufs": ("FLOAT", {"default": -14.0, "min": -70.0, "max": 0.0, "step": 0.5,
                                      "tooltip": "-14 LUFS: streaming platforms; -23: broadcast"}),
        }}

    RETURN_TYPES = ("AUDIO",)
    RETURN_NAMES = ("audio",)
    OUTPUT_TOOLTIPS = ("the normalised AUDIO (same rate, channels and length)",)
    FUNCTION = "normalize"
    CATEGORY = CATEGORY

    def normalize(self, audio, target_lufs=-14.0):
        with user_errors(self.DISPLAY_NAME):
            target_lufs = finite(target_lufs, "target_lufs")
            wav, sr = audio_in(audio)
            return (audio_out(normalize_loudness(wav, sr, target_lufs), sr),)
