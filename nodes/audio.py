"""EnCodec encode/decode between ComfyUI AUDIO and MAGNET_TOKENS, and loudness normalisation."""
from __future__ import annotations

from ..magnet.audio import convert_audio, normalize_loudness
from ..magnet.errors import MagnetError
from .common import CATEGORY, CODEC, TOKENS, audio_in, audio_out, check_tokens, tokens_payload, user_errors


class MagnetEncodeAudio:
    """AUDIO (any rate, mono or stereo) -> MAGNET_TOKENS, e.g. to continue a clip with the sampler."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "codec": (CODEC,),
            "audio": ("AUDIO",),
            "start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 36000.0, "step": 0.1,
                                "tooltip": "seconds to skip at the start of the audio"}),
            "length": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 36000.0, "step": 0.1,
                                 "tooltip": "seconds to keep after `start`; 0 = all"}),
        }}

    RETURN_TYPES = (TOKENS,)
    RETURN_NAMES = ("tokens",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, codec, audio, start=0.0, length=0.0):
        node = "MAGNeT Encode Audio"
        with user_errors(node):
            wav, sr = audio_in(audio, node)
            a = int(round(start * sr))
            b = wav.shape[-1] if length <= 0 else min(wav.shape[-1], a + int(round(length * sr)))
            if a >= b:
                raise MagnetError(f"input `start` ({start:g} s) is at or beyond the end of the audio "
                                  f"({wav.shape[-1] / sr:.2f} s): lower it.")
            c = codec.ready()
            wav = convert_audio(wav[..., a:b], sr, c.sample_rate, c.channels)
            return (tokens_payload(c.encode(wav.to(next(c.parameters()).device)), c),)


class MagnetDecodeAudio:
    """MAGNET_TOKENS -> AUDIO at the codec's rate (32 kHz music, 16 kHz sound effects)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"codec": (CODEC,), "tokens": (TOKENS,)}}

    RETURN_TYPES = ("AUDIO",)
    RETURN_NAMES = ("audio",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    def decode(self, codec, tokens):
        node = "MAGNeT Decode Audio"
        with user_errors(node):
            c = codec.ready()
            codes = check_tokens(tokens, c, node)
            return (audio_out(c.decode(codes), c.sample_rate),)


class MagnetLoudness:
    """Normalise AUDIO to a loudness target in LUFS (pyloudnorm), never clipping above full scale."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "audio": ("AUDIO",),
            "target_lufs": ("FLOAT", {"default": -14.0, "min": -70.0, "max": 0.0, "step": 0.5,
                                      "tooltip": "-14 LUFS: streaming platforms; -23: broadcast"}),
        }}

    RETURN_TYPES = ("AUDIO",)
    RETURN_NAMES = ("audio",)
    FUNCTION = "normalize"
    CATEGORY = CATEGORY

    def normalize(self, audio, target_lufs=-14.0):
        node = "MAGNeT Loudness"
        with user_errors(node):
            wav, sr = audio_in(audio, node)
            return (audio_out(normalize_loudness(wav, sr, target_lufs), sr),)
