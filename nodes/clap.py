"""Best of N: a CLAP scorer and a node that ranks a batch of AUDIO against the prompt."""
from __future__ import annotations

import logging

from ..magnet.clap import ClapScorer
from ..magnet.errors import MagnetError
from . import comfy
from .common import CATEGORY, CLAP, Handle, audio_in, audio_out, user_errors
from .loaders import device_input, download_input, list_folders, load_cached, with_official

log = logging.getLogger(__name__)


def list_clap_models() -> list[str]:
    """CLAP folders (config.json with model_type clap) under models/clap."""
    return list_folders("clap", "clap")


class MagnetClapLoader:
    """Loads a transformers CLAP folder from models/clap (laion/larger_clap_music for music,
    laion/larger_clap_general for sound effects)."""

    DISPLAY_NAME = "MAGNeT CLAP Loader"
    DESCRIPTION = ("Loads a CLAP text-audio model from models/clap (laion/larger_clap_music for music, "
                   "laion/larger_clap_general for sound effects), to rank generated clips against the prompt.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clap": (with_official(list_clap_models(), "clap"), {
                                 "tooltip": "a transformers CLAP folder under models/clap (e.g. larger_clap_music, "
                                            "listed even when not on disk: see download)"}),
                             "device": device_input()},
                "optional": {"download": download_input()}}

    RETURN_TYPES = (CLAP,)
    RETURN_NAMES = ("clap",)
    OUTPUT_TOOLTIPS = ("the CLAP scorer: connect to MAGNeT CLAP Rank",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, clap, device="auto", download="if missing"):
        def build(path, home, dev, _):
            scorer = ClapScorer.from_pretrained(path, device=home)
            return Handle(scorer, path.name, [comfy.manage(scorer.model, dev, f"CLAP ({path.name})")])
        with user_errors(self.DISPLAY_NAME):
            return (load_cached(self, "clap", "clap", clap, "clap", device, build, download=download),)


class MagnetClapRank:
    """Scores every clip of an AUDIO batch against the prompt (CLAP cosine similarity, as in the MAGNeT
    paper) and keeps the best `keep`, best first; `scores` lists every clip's score."""

    DISPLAY_NAME = "MAGNeT CLAP Rank (best of N)"
    DESCRIPTION = ("Scores every clip of an audio batch against the prompt with CLAP (as in the MAGNeT paper) and "
                   "keeps the best `keep`, best first. Wire `scores` into Preview Any to read them on the canvas.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clap": (CLAP, {"tooltip": "CLAP, from the MAGNeT CLAP Loader"}),
            "audio": ("AUDIO", {"tooltip": "a batch of clips to rank, e.g. Decode Audio after a Text Encode with "
                                           "variations 4"}),
            "text": ("STRING", {"multiline": True, "default": "",
                                "tooltip": "the prompt the clips were generated from (convert it to an input and "
                                           "share one text node with Text Encode)"}),
            "keep": ("INT", {"default": 1, "min": 1, "max": 64,
                             "tooltip": "how many of the best clips to output (1 = the single best)"}),
        }}

    RETURN_TYPES = ("AUDIO", "STRING")
    RETURN_NAMES = ("best", "scores")
    OUTPUT_TOOLTIPS = ("the best `keep` clips, best first (batch of `keep`)",
                       "every clip's CLAP score, best first, as text: connect to Preview Any to see it")
    FUNCTION = "rank"
    CATEGORY = CATEGORY

    def rank(self, clap, audio, text, keep=1):
        with user_errors(self.DISPLAY_NAME):
            if not str(text).strip():
                raise MagnetError("input `text` is empty: type the prompt the clips were generated from.")
            wav, sr = audio_in(audio)
            ranking = clap.ready().rank(wav, sr, text.strip())
            order = ranking.order[: max(1, int(keep))]
            lines = [f"#{r + 1}: clip {i + 1} of {wav.shape[0]}, CLAP {float(ranking.scores[i]):.4f}"
                     + ("  (kept)" if r < len(order) else "") for r, i in enumerate(ranking.order)]
            report = "\n".join(lines)
            log.info("MAGNeT CLAP Rank for %r:\n%s", text.strip(), report)
            return {"ui": {"text": [report]}, "result": (audio_out(wav[order], sr), report)}
