"""MAGNeT (masked non-autoregressive audio generation) in plain PyTorch, on the official weights.

    from magnet import MagnetModel
    model = MagnetModel.from_pretrained("magnet-small-10secs", text_encoder="t5-base")
    wav = model.decode(model.generate(["lofi hip hop beat"], seed=1))

The parts on their own: `TextEncoder` (prompts -> TextCondition), `Codec` (EnCodec), `LM`
(the transformer) and `sampling.generate` (the decoding loop on a TextCondition).
`MusicGenModel` (autoregressive, same codec and T5) gives the AR prompt of hybrid generation
(`musicgen.generate_hybrid`) and the rescorer (`musicgen.MusicGenRescorer`).
"""
from .compat import check_transformers as _check_transformers

_check_transformers()  # a too-old transformers: one clear message now, not odd failures later

from .codec import Codec  # noqa: E402
from .errors import MagnetError  # noqa: E402
from .model import MagnetModel  # noqa: E402
from .musicgen import MusicGenModel  # noqa: E402
from .sampling import SamplingParams  # noqa: E402
from .text import TextCondition, TextEncoder  # noqa: E402
from .transformer import LM, LMConfig  # noqa: E402

__all__ = ["MagnetModel", "MusicGenModel", "MagnetError", "Codec", "TextEncoder", "TextCondition", "LM", "LMConfig",
           "SamplingParams"]
__version__ = "0.1.0"
