"""The ComfyUI layer: thin node classes over the `magnet` engine (category audio/MAGNeT)."""
from . import comfy
from .ar import MagnetARPrompt, MagnetMusicGenLoader, MagnetRescorer
from .audio import MagnetDecodeAudio, MagnetEncodeAudio, MagnetLoudness
from .clap import MagnetClapLoader, MagnetClapRank
from .generate import MagnetRegenerateRegion, MagnetSampler, MagnetTextEncode
from .loaders import MagnetModelLoader, MagnetTextEncoderLoader
from .video import MagnetFitAudioLength, MagnetVideoDuration

comfy.register_folders()

NODE_CLASSES = [MagnetModelLoader, MagnetTextEncoderLoader, MagnetTextEncode, MagnetSampler, MagnetRegenerateRegion,
                MagnetEncodeAudio, MagnetDecodeAudio, MagnetLoudness, MagnetVideoDuration, MagnetFitAudioLength,
                MagnetMusicGenLoader, MagnetARPrompt, MagnetRescorer, MagnetClapLoader, MagnetClapRank]

# class name (what workflows store) -> class; display name = the node's DISPLAY_NAME, also the name its
# error messages start with
NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in NODE_CLASSES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.__name__: cls.DISPLAY_NAME for cls in NODE_CLASSES}

from .edit import MagnetAudioToAudio, MagnetDecodeLoop, MagnetPromptTimeline, MagnetSeamlessLoop  # noqa: E402

for _cls in (MagnetAudioToAudio, MagnetSeamlessLoop, MagnetDecodeLoop, MagnetPromptTimeline):
    NODE_CLASSES.append(_cls)
    NODE_CLASS_MAPPINGS[_cls.__name__] = _cls
    NODE_DISPLAY_NAME_MAPPINGS[_cls.__name__] = _cls.DISPLAY_NAME

from .train import MagnetLoraLoader, MagnetTrainLora  # noqa: E402

for _cls in (MagnetTrainLora, MagnetLoraLoader):
    NODE_CLASSES.append(_cls)
    NODE_CLASS_MAPPINGS[_cls.__name__] = _cls
    NODE_DISPLAY_NAME_MAPPINGS[_cls.__name__] = _cls.DISPLAY_NAME

from .prepare import MagnetPrepareDataset  # noqa: E402

for _cls in (MagnetPrepareDataset,):
    NODE_CLASSES.append(_cls)
    NODE_CLASS_MAPPINGS[_cls.__name__] = _cls
    NODE_DISPLAY_NAME_MAPPINGS[_cls.__name__] = _cls.DISPLAY_NAME
