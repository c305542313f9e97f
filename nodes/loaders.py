"""Loader nodes: a MAGNeT release (-> model + codec) and a T5 text encoder, through the shared cache."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..magnet.cache import CACHE, file_key
from ..magnet.errors import MagnetError
from ..magnet.model import MagnetModel
from ..magnet.text import TextEncoder
from . import comfy
from .common import CATEGORY, CODEC, MODEL, TEXT_ENCODER, Handle, user_errors

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICES = ["auto", "cpu", "cuda"]


def list_releases() -> list[str]:
    """Release folders (holding state_dict.bin) and converted .safetensors files under models/magnet."""
    names = []
    for root in comfy.model_dirs("magnet"):
        if not root.is_dir():
            continue
        for p in sorted(root.iterdir()):
            if (p.is_dir() and (p / "state_dict.bin").is_file()) or (p.is_file() and p.suffix == ".safetensors"):
                names.append(p.name)
    return sorted(set(names))


def list_text_encoders() -> list[str]:
    """T5 folders (config.json with model_type t5) under models/text_encoders."""
    names = []
    for root in comfy.model_dirs("text_encoders"):
        if not root.is_dir():
            continue
        for p in sorted(root.iterdir()):
            cfg = p / "config.json"
            if p.is_dir() and cfg.is_file():
                try:
                    if "t5" in str(json.loads(cfg.read_text()).get("model_type", "")):
                        names.append(p.name)
                except (OSError, ValueError):
                    continue
    return sorted(set(names))


def resolve(kind: str, name: str, node: str, what: str) -> Path:
    roots = comfy.model_dirs(kind)
    for root in roots:
        if (root / name).exists():
            return root / name
    where = ", ".join(str(r) for r in roots) or f"models/{kind}"
    raise MagnetError(f"{node}: `{what}` {name!r} was not found in {where}. Put the files there and refresh "
                      f"the page (R) so the list updates.")


def pick_device(device: str) -> torch.device:
    return comfy.torch_device() if device == "auto" else torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def load_cached(owner, kind: str, folder: str, name: str, node: str, what: str, device: str, build, dtype=None):
    """Resolve `name` under models/<folder>, pick devices, and return the shared cache's object for it.
    build(path, home, dev, dtype) makes it on a miss; in ComfyUI the weights wait on the offload device
    ("home") and the memory manager moves them to `dev` when they are used."""
    path = resolve(folder, name, node, what)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev) if dtype is not None else None
    home = comfy.offload_device() if comfy.IN_COMFY and device == "auto" else dev
    key = (kind, file_key(path), str(dev), str(dt))
    return CACHE.get(key, lambda: build(path, home, dev, dt), owner=(kind, id(owner)))


class MagnetModelLoader:
    """Loads a MAGNeT release from models/magnet: the LM (MAGNET_MODEL) and its EnCodec (MAGNET_CODEC)."""

    DESCRIPTION = "Load a MAGNeT release (a folder with state_dict.bin + compression_state_dict.bin, or a " \
                  "converted .safetensors) from models/magnet."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "release": (list_releases(), {"tooltip": "a folder under models/magnet holding state_dict.bin and "
                                                     "compression_state_dict.bin, or a converted .safetensors"}),
            "device": (DEVICES, {"default": "auto"}),
            "dtype": (["auto", *DTYPES], {"default": "auto", "tooltip": "auto: fp16 on CUDA, fp32 on CPU"}),
        }}

    RETURN_TYPES = (MODEL, CODEC)
    RETURN_NAMES = ("model", "codec")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, release, device="auto", dtype="auto"):
        node = "MAGNeT Model Loader"

        def build(path, home, dev, dt):
            m = MagnetModel.from_pretrained(path, text_encoder=False, device=home, dtype=dt,
                                            search_dirs=comfy.model_dirs("magnet"))
            return (Handle(m, path.name, [comfy.manage(m.lm, dev)]),
                    Handle(m.codec, path.name, [comfy.manage(m.codec, dev)]))
        with user_errors(node):
            return load_cached(self, "magnet", "magnet", release, node, "release", device, build, dtype)


class MagnetTextEncoderLoader:
    """Loads a T5 encoder folder from models/text_encoders (t5-base for music, t5-large for audio-magnet)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": (list_text_encoders(), {"tooltip": "a transformers T5 folder under "
                                                               "models/text_encoders: t5-base (music) or t5-large "
                                                               "(sound effects)"}),
            "device": (DEVICES, {"default": "auto"}),
        }}

    RETURN_TYPES = (TEXT_ENCODER,)
    RETURN_NAMES = ("text_encoder",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, text_encoder, device="auto"):
        node = "MAGNeT Text Encoder Loader"

        def build(path, home, dev, _):
            te = TextEncoder(path, device=home)       # always float32: fp16 T5 overflows
            return Handle(te, path.name, [comfy.manage(te.model, dev)])
        with user_errors(node):
            return (load_cached(self, "t5", "text_encoders", text_encoder, node, "text_encoder", device, build),)
