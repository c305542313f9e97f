"""The only place that touches ComfyUI. Everything here falls back to plain PyTorch when ComfyUI is not
importable (tests, scripts), so the node classes run anywhere.

- model folders: `models/magnet/` (registered with folder_paths) and `models/text_encoders/`;
  outside ComfyUI, $MAGNET_MODELS_DIR and $MAGNET_TEXT_ENCODERS_DIR (os.pathsep-separated lists);
- devices and memory: `ModelPatcher` + `load_models_gpu`, so ComfyUI can offload our models; every model a
  node runs is readied in one call, loaded fully (ComfyUI's partial loads move only modules whose parameters
  are all their own, which would leave our weights split between GPU and CPU), then checked to be whole;
- weight types: `auto` follows ComfyUI's choice for the device (--force-fp32, --fp16-unet, ... included);
- progress and cancel: `comfy.utils.ProgressBar` and `throw_exception_if_processing_interrupted`.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
from pathlib import Path

import torch

from ..magnet.devices import bf16_supported, default_device, default_dtype

try:  # ComfyUI present?
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils
    import folder_paths
except ImportError:  # plain Python: tests, scripts
    mm = None
    folder_paths = None

IN_COMFY = mm is not None
log = logging.getLogger(__name__)
ENV_DIRS = {"magnet": "MAGNET_MODELS_DIR", "text_encoders": "MAGNET_TEXT_ENCODERS_DIR", "clap": "MAGNET_CLAP_DIR"}


def register_folders():
    """models/magnet (releases: folders and converted .safetensors) and models/clap. Keeps paths the user
    added in extra_model_paths.yaml (which ComfyUI applies before loading custom nodes)."""
    if folder_paths is None:
        return
    for name in ("magnet", "clap"):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name), is_default=True)
        paths, _ = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (paths, {".safetensors"})


def model_dirs(kind: str) -> list[Path]:
    """Folders to list models from: ComfyUI's registered paths, else the environment variable."""
    if folder_paths is not None:
        try:
            return [Path(p) for p in folder_paths.get_folder_paths(kind)]
        except KeyError:
            return []
    env = os.environ.get(ENV_DIRS.get(kind, ""), "")
    return [Path(p) for p in env.split(os.pathsep) if p]


def torch_device() -> torch.device:
    if mm is not None:
        return mm.get_torch_device()
    return default_device()


def offload_device() -> torch.device:
    return mm.unet_offload_device() if mm is not None else torch_device()


def intermediate_device() -> torch.device:
    return mm.intermediate_device() if mm is not None else torch.device("cpu")


class _Managed(torch.nn.Module):
    """A container the ModelPatcher may annotate (it sets `.device` etc., which e.g. transformers models
    expose as read-only properties); moving it moves the wrapped module."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.inner = module


_MANAGED_CLASSES: dict[str, type] = {}


def managed_class(label: str) -> type:
    """A _Managed subclass whose class name is `label`: ComfyUI logs `Requested to load <class name>`, so
    the log then reads `Requested to load MAGNeT LM (magnet-small-10secs)`."""
    if label not in _MANAGED_CLASSES:
        _MANAGED_CLASSES[label] = type(label, (_Managed,), {"__module__": __name__, "__qualname__": label})
    return _MANAGED_CLASSES[label]


def manage(module: torch.nn.Module, load_device=None, label: str = "MAGNeT model"):
    """Wrap a module for ComfyUI's memory manager (None outside ComfyUI); `label` names it in ComfyUI's log."""
    if mm is None:
        return None
    return comfy.model_patcher.ModelPatcher(managed_class(label)(module), load_device=load_device or torch_device(),
                                            offload_device=offload_device())


def load(*patchers):
    """Bring managed modules to their devices, all in ONE load_models_gpu call (ComfyUI may offload other
    models to make room; loading ours one by one could evict the first to fit the next), loaded fully where
    this ComfyUI can (`force_full_load`), then checked: any weight still elsewhere is moved (`settle`)."""
    unique = list({id(p): p for p in patchers if p is not None}.values())
    if not unique or mm is None:
        return
    if _takes_keyword(mm.load_models_gpu, "force_full_load"):
        mm.load_models_gpu(unique, force_full_load=True)
    else:   # ComfyUI before force_full_load (mid 2024): settle() completes partial loads
        mm.load_models_gpu(unique)
    for p in unique:
        settle(p)


@functools.lru_cache(maxsize=None)
def _takes_keyword(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index == b.index or a.index is None or b.index is None)


def settle(patcher) -> bool:
    """Make sure every parameter and buffer of a managed module is on the patcher's load device; move the
    module there when not (returns True then). A partial load or unload by ComfyUI (low VRAM, --novram, a
    later load needing room) moves only some modules; running on a split model fails ("Expected all tensors
    to be on the same device") or silently runs parts on the CPU."""
    module, device = getattr(patcher, "model", None), getattr(patcher, "load_device", None)
    if module is None or device is None:
        return False
    device = torch.device(device)
    stray = [name for name, t in (*module.named_parameters(), *module.named_buffers())
             if not _same_device(t.device, device)]
    if not stray:
        return False
    level = logging.DEBUG if getattr(patcher, "_magnet_settled", False) else logging.WARNING
    log.log(level, "MAGNeT: ComfyUI left %d of the weights of %s off %s (e.g. %s); moving the whole model "
            "there.", len(stray), type(module).__name__, device, stray[0])
    module.to(device)
    try:
        patcher._magnet_settled = True
    except AttributeError:
        pass
    return True


def _ask(fn, device) -> bool:
    """should_use_fp16/bf16(device) as for a model whose weights compute in their own type (ComfyUI's answers
    with manual_cast=True assume its casting layers, which our modules do not have)."""
    try:
        return bool(fn(device=device, model_params=0, manual_cast=False))
    except TypeError:    # older ComfyUI: no manual_cast / model_params
        return bool(fn(device))


def weight_dtype(device) -> torch.dtype:
    """The `auto` weight type for a model running on `device`: ComfyUI's choice inside ComfyUI, else the
    engine's (`magnet.devices.default_dtype`).

    In ComfyUI: the CPU -> fp32; --fp32-unet / --bf16-unet / --fp16-unet win (checked in the order
    unet_dtype checks them); else fp16 where should_use_fp16 says so (it honours --force-fp32,
    --force-fp16, and knows which GPUs have slow or broken fp16), then bf16 where should_use_bf16 does, else
    fp32. unet_dtype itself is not used: its last resort is fp16/bf16 weights for ComfyUI's manual-cast
    layers (stored low, computed in fp32), which would compute in fp16 here on Pascal or GTX 16xx cards."""
    dev = torch.device(device)
    if mm is None:
        return default_dtype(dev)
    if dev.type == "cpu":
        return torch.float32
    args = getattr(mm, "args", None)
    for flag, dtype in (("fp32_unet", torch.float32), ("bf16_unet", torch.bfloat16), ("fp16_unet", torch.float16)):
        if getattr(args, flag, False) and (dtype != torch.bfloat16 or bf16_supported(dev)):
            return dtype
    fp16, bf16 = getattr(mm, "should_use_fp16", None), getattr(mm, "should_use_bf16", None)
    if fp16 is None and bf16 is None:
        return default_dtype(dev)
    if fp16 is not None and _ask(fp16, dev):
        return torch.float16
    if bf16 is not None and _ask(bf16, dev):
        return torch.bfloat16
    return torch.float32


def check_interrupt():
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


def is_interrupt(exc: BaseException) -> bool:
    return mm is not None and isinstance(exc, mm.InterruptProcessingException)


class Progress:
    """progress(done, total) for the engine: ComfyUI's progress bar (also a cancel point) + interrupt."""

    def __init__(self, total: int = 0):
        self.bar = comfy.utils.ProgressBar(total) if mm is not None else None

    def __call__(self, done: int, total: int):
        if self.bar is not None:
            self.bar.update_absolute(done, total)
        check_interrupt()
