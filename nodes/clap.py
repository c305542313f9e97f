"""Best of N: a CLAP scorer and a node that ranks a batch of AUDIO against the prompt."""
from __future__ import annotations

import json
import logging

from ..magnet.clap import ClapScorer
from ..magnet.errors import MagnetError
from . import comfy
from .common import CATEGORY, CLAP, Handle, audio_in, audio_out, user_errors
from .loaders import DEVICES, load_cached

log = logging.getLogger(__name__)


def list_clap_models() -> list[str]:
    """CLAP folders (config.json with model_type clap) under models/clap."""
    names = []
    for root in comfy.model_dirs("clap"):
        if not root.is_dir():
            continue
        for p in sorted(root.iterdir()):
            try:
                if p.is_dir() and json.loads((p / "config.json").read_text()).get("model_type") == "clap":
                    names.append(p.name)
            except (OSError, ValueError):
                continue
    return sorted(set(names))


class MagnetClapLoader:
    """Loads a transformers CLAP folder from models/clap (laion/larger_clap_music for music,
    laion/larger_clap_general for sound effects)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clap": (list_clap_models(), {"tooltip": "a transformers CLAP folder under models/clap"}),
                             "device": (DEVICES, {"default": "auto"})}}

    RETURN_TYPES = (CLAP,)
    RETURN_NAMES = ("clap",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, clap, device="auto"):
        node = "MAGNeT CLAP Loader"

        def build(path, home, dev, _):
            scorer = ClapScorer.from_pretrained(path, device=home)
            return Handle(scorer, path.name, [comfy.manage(scorer.model, dev)])
        with user_errors(node):
            return (load_cached(self, "clap", "clap", clap, node, "clap", device, build),)


class MagnetClapRank:
    """Scores every clip of an AUDIO batch against the prompt (CLAP cosine similarity, as in the MAGNeT
    paper) and keeps the best `keep`, best first; `scores` lists every clip's score."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clap": (CLAP,),
            "audio": ("AUDIO",),
            "text": ("STRING", {"multiline": True, "default": "",
                                "tooltip": "the prompt the clips were generated from"}),
            "keep": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "how many of the best clips to output"}),
        }}

    RETURN_TYPES = ("AUDIO", "STRING")
    RETURN_NAMES = ("best", "scores")
    FUNCTION = "rank"
    CATEGORY = CATEGORY

    def rank(self, clap, audio, text, keep=1):
        node = "MAGNeT CLAP Rank"
        with user_errors(node):
            if not text.strip():
                raise MagnetError("input `text` is empty: type the prompt the clips were generated from.")
            wav, sr = audio_in(audio, node)
            ranking = clap.ready().rank(wav, sr, text.strip())
            order = ranking.order[: max(1, int(keep))]
            lines = [f"#{r + 1}: clip {i + 1} of {wav.shape[0]}, CLAP {float(ranking.scores[i]):.4f}"
                     + ("  (kept)" if r < len(order) else "") for r, i in enumerate(ranking.order)]
            report = "\n".join(lines)
            log.info("MAGNeT CLAP Rank for %r:\n%s", text.strip(), report)
            return {"ui": {"text": [report]}, "result": (audio_out(wav[order], sr), report)}
