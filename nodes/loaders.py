"""Loader nodes: a MAGNeT release (-> model + codec) and a T5 text encoder, through the shared cache."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..magnet import hub
from ..magnet.cache import CACHE, file_key
from ..magnet.checkpoints import release_kind, release_label
from ..magnet.compat import model_type_of
from ..magnet.devices import available_devices, codec_device, parse_device, parse_dtype
from ..magnet.errors import MagnetError
from ..magnet.model import MagnetModel
from ..magnet.text import TextEncoder
from . import comfy
from .common import CATEGORY, CODEC, MODEL, TEXT_ENCODER, Handle, user_errors

log = logging.getLogger(__name__)
DTYPES = ["auto", "fp32", "fp16", "bf16"]
DEVICE_TOOLTIP = ("auto: ComfyUI's device (its memory manager moves the model there when it runs and may "
                  "offload it). Only devices this machine has are listed.")
DTYPE_TOOLTIP = ("weight type; auto: ComfyUI's choice for the device (fp16 where this GPU runs it fast and "
                 "safely, else fp32; --force-fp32 and --fp16-unet apply). bf16 needs a GPU that supports it.")


def devices() -> list[str]:
    """The device choices: auto plus what exists here (no cuda on a CPU-only machine)."""
    return ["auto", *available_devices()]


DOWNLOAD_TOOLTIP = ("if missing: an official model that is not on disk is downloaded from its Hugging Face "
                    "repository into the models folder first (the size is logged, progress shows on the node); "
                    "never: stop with the command that fetches it instead")


def download_input() -> tuple:
    """The loaders' last widget (optional, so workflows saved before it load with its default)."""
    return (hub.DOWNLOAD_CHOICES, {"default": hub.DOWNLOAD_CHOICES[0], "tooltip": DOWNLOAD_TOOLTIP})


def with_official(names: list[str], folder: str, release_kind: str | None = None) -> list[str]:
    """What is on disk, then the official models not on disk (fetched when chosen, see `download`), so a
    template naming an official model validates on a fresh install."""
    return names + [n for n in hub.official_names(folder, release_kind) if n not in names]


def device_input() -> tuple:
    return (devices(), {"default": "auto", "tooltip": DEVICE_TOOLTIP})


def dtype_input() -> tuple:
    return (DTYPES, {"default": "auto", "tooltip": DTYPE_TOOLTIP})


def list_releases(kind: str = "magnet") -> list[str]:
    """Releases (any of checkpoints.RELEASE_FORMATS: folders, converted .safetensors) under models/magnet whose
    LM is of `kind` ('magnet' or 'musicgen'). Reads configs only (release_kind memory-maps and caches), never
    the weights."""
    names = []
    for root in comfy.model_dirs("magnet"):
        if not root.is_dir():
            continue
        for p in sorted(root.iterdir()):
            if not p.name.startswith(".") and release_kind(p) == kind:     # .<name>.partial: a download under way
                names.append(p.name)
    return sorted(set(names))


def list_folders(kind: str, model_type: str) -> list[str]:
    """Folders under models/<kind> whose transformers config.json has this model_type."""
    names = []
    for root in comfy.model_dirs(kind):
        if not root.is_dir():
            continue
        for p in sorted(root.iterdir()):
            if p.is_dir() and not p.name.startswith(".") and model_type_of(p) == model_type:
                names.append(p.name)
    return sorted(set(names))


def list_text_encoders() -> list[str]:
    """T5 folders (config.json with model_type t5) under models/text_encoders."""
    return list_folders("text_encoders", "t5")


def wants_download(download) -> bool:
    choice = str(download if download is not None else hub.DOWNLOAD_CHOICES[0]).strip().lower()
    if choice not in hub.DOWNLOAD_CHOICES:
        raise MagnetError(f"`download` {download!r} is not one of {', '.join(hub.DOWNLOAD_CHOICES)}: pick one.")
    return choice == hub.DOWNLOAD_CHOICES[0]


class _NodeBar:
    """The node's progress bar for a download, made only when bytes arrive (a load from disk makes none)."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int):
        if self.bar is None:
            self.bar = comfy.Progress(total)
        self.bar(done, total)


def resolve(kind: str, name: str, what: str, download="never") -> Path:
    """`name` under models/<kind>; an official model that is missing is downloaded there first when
    `download` is `if missing` (progress on the node's bar), else the error names the command."""
    roots = comfy.model_dirs(kind)
    found = hub.ensure(name, roots, download_missing=wants_download(download), progress=_NodeBar(),
                       echo=log.info)
    if found is not None:
        return found
    where = ", ".join(str(r) for r in roots) or f"models/{kind}"
    raise MagnetError(f"`{what}` {name!r} was not found in {where}. Put the files there and refresh "
                      f"the page (R) so the list updates.")


def pick_device(device: str) -> torch.device:
    """auto: ComfyUI's device inside ComfyUI (else CUDA if present); a name is checked to exist here."""
    if device is None or str(device).strip().lower() in ("", "auto"):
        return comfy.torch_device()
    return parse_device(device, "device")


def load_cached(owner, kind: str, folder: str, name: str, what: str, device: str, build, dtype=None,
                download="never"):
    """Resolve `name` under models/<folder>, pick devices, and return the shared cache's object for it.
    build(path, home, dev, dtype) makes it on a miss; in ComfyUI the weights wait on the offload device
    ("home") and the memory manager moves them to `dev` when they are used."""
    dev = pick_device(device)
    dt = None
    if dtype is not None:
        auto = str(dtype).strip().lower() in ("", "auto")
        dt = comfy.weight_dtype(dev) if auto else parse_dtype(dtype, dev, "dtype")
    path = resolve(folder, name, what, download)
    if folder == "magnet" and path.is_dir():       # a release whose codec file points to encodec_32khz
        hub.ensure_codec(path, comfy.model_dirs("magnet"), download_missing=wants_download(download),
                         progress=_NodeBar(), echo=log.info)
    home = comfy.offload_device() if comfy.IN_COMFY and str(device).strip().lower() == "auto" else dev
    key = (kind, file_key(path), str(dev), str(dt))
    return CACHE.get(key, lambda: build(path, home, dev, dt), owner=(kind, id(owner)))


label = release_label     # a release's name for logs (the folder's, or the converted file's without its suffix)


class MagnetModelLoader:
    """Loads a MAGNeT release from models/magnet: the LM (MAGNET_MODEL) and its EnCodec (MAGNET_CODEC)."""

    DISPLAY_NAME = "MAGNeT Model Loader"
    DESCRIPTION = ("Loads a MAGNeT release (a folder with state_dict.bin + compression_state_dict.bin, or a "
                   "converted .safetensors) from models/magnet: the generator and its EnCodec audio codec.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "release": (with_official(list_releases("magnet"), "magnet", "magnet"), {
                "tooltip": "a MAGNeT release under models/magnet: a folder holding state_dict.bin and "
                           "compression_state_dict.bin, or a converted .safetensors. magnet-*: music (t5-base); "
                           "audio-magnet-*: sound effects (t5-large). MusicGen releases are in the MusicGen Loader. The "
                           "official releases are listed even when not on disk (see download)."}),
            "device": device_input(),
            "dtype": dtype_input(),
        }, "optional": {"download": download_input()}}

    RETURN_TYPES = (MODEL, CODEC)
    RETURN_NAMES = ("model", "codec")
    OUTPUT_TOOLTIPS = ("the MAGNeT generator: connect to the Sampler (and Regenerate Region, AR Prompt)",
                       "the release's EnCodec: connect to Decode Audio (tokens -> audio) and Encode Audio")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, release, device="auto", dtype="auto", download="if missing"):
        def build(path, home, dev, dt):
            m = MagnetModel.from_pretrained(path, text_encoder=False, device=home, dtype=dt,
                                            search_dirs=comfy.model_dirs("magnet"))
            return (Handle(m, path.name, [comfy.manage(m.lm, dev, f"MAGNeT LM ({label(path)})")]),
                    Handle(m.codec, path.name, [comfy.manage(m.codec, codec_device(dev),    # the CPU for MPS
                                                             f"EnCodec ({label(path)})")]))
        with user_errors(self.DISPLAY_NAME):
            return load_cached(self, "magnet", "magnet", release, "release", device, build, dtype, download)


class MagnetTextEncoderLoader:
    """Loads a T5 encoder folder from models/text_encoders (t5-base for music, t5-large for audio-magnet)."""

    DISPLAY_NAME = "MAGNeT Text Encoder Loader"
    DESCRIPTION = ("Loads the T5 text encoder MAGNeT is conditioned on, from models/text_encoders: t5-base "
                   "for the music releases, t5-large for audio-magnet. It always runs in fp32.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": (with_official(list_text_encoders(), "text_encoders"), {
                "tooltip": "a transformers T5 folder under models/text_encoders: t5-base (music) or t5-large "
                           "(sound effects); both are listed even when not on disk (see download)"}),
            "device": device_input(),
        }, "optional": {"download": download_input()}}

    RETURN_TYPES = (TEXT_ENCODER,)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("the T5 encoder: connect to MAGNeT Text Encode",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, text_encoder, device="auto", download="if missing"):
        def build(path, home, dev, _):
            te = TextEncoder(path, device=home)       # always float32: fp16 T5 overflows
            return Handle(te, path.name, [comfy.manage(te.model, dev, f"T5 ({path.name})")])
        with user_errors(self.DISPLAY_NAME):
            return (load_cached(self, "t5", "text_encoders", text_encoder, "text_encoder", device, build,
                                download=download),)
