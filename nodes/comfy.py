"""The only place that touches ComfyUI. Everything here falls back to plain PyTorch when ComfyUI is not
importable (tests, scripts), so the node classes run anywhere.

- model folders: `models/magnet/` (registered with folder_paths) and `models/text_encoders/`;
  outside ComfyUI, $MAGNET_MODELS_DIR and $MAGNET_TEXT_ENCODERS_DIR (os.pathsep-separated lists);
- devices and memory: `ModelPatcher` + `load_models_gpu`, so ComfyUI can offload our models;
- progress and cancel: `comfy.utils.ProgressBar` and `throw_exception_if_processing_interrupted`.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

try:  # ComfyUI present?
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils
    import folder_paths
except ImportError:  # plain Python: tests, scripts
    mm = None
    folder_paths = None

IN_COMFY = mm is not None
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
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    """Bring managed modules to their device (ComfyUI may offload others to make room)."""
    patchers = [p for p in patchers if p is not None]
    if patchers and mm is not None:
        mm.load_models_gpu(patchers)


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
