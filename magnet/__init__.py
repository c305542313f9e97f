"""MAGNeT (masked non-autoregressive audio generation) in plain PyTorch, on the official weights.

    from magnet import MagnetModel
    model = MagnetModel.from_pretrained("magnet-small-10secs", text_encoder="t5-base")
    wav = model.decode(model.generate(["lofi hip hop beat"], seed=1))

The parts on their own: `TextEncoder` (prompts -> TextCondition), `Codec` (EnCodec), `LM`
(the transformer) and `sampling.generate` (the decoding loop on a TextCondition).
`MusicGenModel` (autoregressive, same codec and T5) gives the AR prompt of hybrid generation
(`musicgen.generate_hybrid`) and the rescorer (`musicgen.MusicGenRescorer`).
"""
from .codec import Codec
from .errors import MagnetError
from .model import MagnetModel
from .musicgen import MusicGenModel
from .sampling import SamplingParams
from .text import TextCondition, TextEncoder
from .transformer import LM, LMConfig

__all__ = ["MagnetModel", "MusicGenModel", "MagnetError", "Codec", "TextEncoder", "TextCondition", "LM", "LMConfig",
           "SamplingParams"]
__version__ = "0.1.0"
