"""Dependencies imported when first needed, with one message for a missing one.

ComfyUI-Manager, the Registry and comfy-cli install `requirements.txt` into ComfyUI's Python; a
package missing there (or an optional one never installed) raises a MagnetError naming the package
and the command, never a bare `No module named ...`.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MagnetError

# import name -> the name pip installs it by
PIP_NAMES = {"yaml": "pyyaml", "soundfile": "soundfile", "pyloudnorm": "pyloudnorm", "julius": "julius",
             "sentencepiece": "sentencepiece", "safetensors": "safetensors", "transformers": "transformers",
             "tqdm": "tqdm", "huggingface_hub": "huggingface_hub", "numpy": "numpy"}

INSTALL_HINT = "run `pip install -r requirements.txt` (in ComfyUI: with ComfyUI's own Python)"


def missing_message(pip_name: str, hint: str = INSTALL_HINT) -> str:
    return f"{pip_name} is not installed: {hint}."


def require(module: str, *, optional: bool = False) -> ModuleType:
    """Import `module` or raise MagnetError('<package> is not installed: run pip install ...')."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        if e.name is not None and e.name.split(".")[0] != top:
            raise   # the package is there but one of its own imports failed: not ours to rename
        pip_name = PIP_NAMES.get(top, top)
        hint = f"run `pip install {pip_name}` (in ComfyUI: with ComfyUI's own Python)" if optional else INSTALL_HINT
        raise MagnetError(missing_message(pip_name, hint)) from None
