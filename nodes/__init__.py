"""The ComfyUI layer: thin node classes over the `magnet` engine (category audio/MAGNeT)."""
from . import comfy
from .ar import MagnetARPrompt, MagnetMusicGenLoader, MagnetRescorer
from .audio import MagnetDecodeAudio, MagnetEncodeAudio, MagnetLoudness
from .clap import MagnetClapLoader, MagnetClapRank
from .generate import MagnetRegenerateRegion, MagnetSampler, MagnetTextEncode
from .loaders import MagnetModelLoader, MagnetTextEncoderLoader
from .video import MagnetFitAudioLength, MagnetVideoDuration

comfy.register_folders()

NODES = {
    "MagnetModelLoader": (MagnetModelLoader, "MAGNeT Model Loader"),
    "MagnetTextEncoderLoader": (MagnetTextEncoderLoader, "MAGNeT Text Encoder Loader"),
    "MagnetTextEncode": (MagnetTextEncode, "MAGNeT Text Encode"),
    "MagnetSampler": (MagnetSampler, "MAGNeT Sampler"),
    "MagnetRegenerateRegion": (MagnetRegenerateRegion, "MAGNeT Regenerate Region"),
    "MagnetEncodeAudio": (MagnetEncodeAudio, "MAGNeT Encode Audio (EnCodec)"),
    "MagnetDecodeAudio": (MagnetDecodeAudio, "MAGNeT Decode Audio (EnCodec)"),
    "MagnetLoudness": (MagnetLoudness, "MAGNeT Loudness Normalize"),
    "MagnetVideoDuration": (MagnetVideoDuration, "MAGNeT Video Duration"),
    "MagnetFitAudioLength": (MagnetFitAudioLength, "MAGNeT Fit Audio Length"),
    "MagnetMusicGenLoader": (MagnetMusicGenLoader, "MAGNeT MusicGen Loader"),
    "MagnetARPrompt": (MagnetARPrompt, "MAGNeT AR Prompt (MusicGen)"),
    "MagnetRescorer": (MagnetRescorer, "MAGNeT Rescorer (MusicGen)"),
    "MagnetClapLoader": (MagnetClapLoader, "MAGNeT CLAP Loader"),
    "MagnetClapRank": (MagnetClapRank, "MAGNeT CLAP Rank (best of N)"),
}

NODE_CLASS_MAPPINGS = {k: cls for k, (cls, _) in NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {k: name for k, (_, name) in NODES.items()}
