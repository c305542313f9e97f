"""Preparing a dataset folder in ComfyUI: captions from CLAP tags (plus tempo and key) and the manifest that
training reads first, by the engine's `prepare_folder`."""
from __future__ import annotations

import logging

from ..magnet.errors import MagnetError
from ..magnet.prepare import folder_state, prepare_folder
from . import comfy
from .common import CATEGORY, CLAP, user_errors
from .paths import list_datasets, resolve_dataset

log = logging.getLogger(__name__)


class MagnetPrepareDataset:
    """A dataset folder + CLAP -> a caption (<name>.txt) for every audio file that has none, and the folder's
    manifest magnet_dataset.jsonl (caption, length, tags, tempo, key per file) that Train LoRA reads first."""

    DISPLAY_NAME = "MAGNeT Prepare Dataset"
    DESCRIPTION = ("Captions a folder of audio for MAGNeT Train LoRA: CLAP tags (genre, mood, instruments, vocals, "
                   "tempo) plus BPM and key go into <name>.txt for files without a caption, and into an editable "
                   "manifest.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clap": (CLAP, {"tooltip": "CLAP from the MAGNeT CLAP Loader (larger_clap_music for music): "
                                           "hears each file and picks its tags"}),
                "dataset": (list_datasets(), {"tooltip": "a folder under ComfyUI's input folder holding the audio "
                                                         "(the same choice as in MAGNeT Train LoRA)"}),
                "path": ("STRING", {"default": "",
                                    "tooltip": "or a folder path (absolute, or relative to the input folder); "
                                               "when not empty it is used instead of `dataset`"}),
                "overwrite": ("BOOLEAN", {"default": False,
                                          "tooltip": "replace existing captions too (their .txt and manifest "
                                                     "lines); off: only files without a caption get one"}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("STRING", "INT")
    RETURN_NAMES = ("manifest", "written")
    OUTPUT_TOOLTIPS = ("the manifest magnet_dataset.jsonl as text: one JSON line per file (file, caption, seconds, "
                       "tags, bpm, key); connect to Preview Any to read it",
                       "how many caption files this run wrote")
    FUNCTION = "prepare"
    OUTPUT_NODE = True                 # it writes files: runs even with nothing connected
    CATEGORY = CATEGORY

    @classmethod
    def IS_CHANGED(cls, clap=None, dataset="", path="", overwrite=False, **_):
        """Runs again when a file of the folder is added, removed or changed."""
        try:
            return folder_state(resolve_dataset(dataset, path))
        except (MagnetError, OSError):
            return ""

    def prepare(self, clap, dataset, path, overwrite, unique_id=None):
        with user_errors(self.DISPLAY_NAME):
            if not isinstance(overwrite, bool):
                raise MagnetError(f"input `overwrite` {overwrite!r} must be true or false.")
            folder = resolve_dataset(dataset, path)
            scorer = clap.ready()
            bar = comfy.Progress()

            def progress(done, total):
                comfy.progress_text(f"file {done}/{total}", unique_id)
                bar(done, total)

            result = prepare_folder(folder, scorer, overwrite=overwrite, progress=progress,
                                    log=lambda msg: log.warning("MAGNeT Prepare Dataset: %s", msg))
            summary = result.summary()
            log.info("MAGNeT Prepare Dataset:\n%s", summary)
            return {"ui": {"text": [summary]}, "result": (result.manifest_text, len(result.written))}
