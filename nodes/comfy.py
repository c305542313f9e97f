"""The only place that touches ComfyUI. Everything here falls back to plain PyTorch when ComfyUI is not
importable (tests, scripts), so the node classes run anywhere.

- model folders: `models/magnet/` (registered with folder_paths) and `models/text_encoders/`;
  outside ComfyUI, $MAGNET_MODELS_DIR and $MAGNET_TEXT_ENCODERS_DIR (os.pathsep-separated lists);
- devices and memory: `ModelPatcher` + `load_models_gpu`, so ComfyUI can offload our models; every model a
  node runs is readied in one call, loaded fully (ComfyUI's partial loads move only modules whose parameters
  are all their own, which would leave our weights split between GPU and CPU), then checked to be whole;
- weight types: `auto` follows ComfyUI's choice for the device (--force-fp32, --fp16-unet, ... included);
- progress and cancel: `comfy.utils.ProgressBar` and `throw_exception_if_processing_interrupted`;
- LoRAs: `models/loras/magnet/` (kind `magnet_loras`; outside ComfyUI $MAGNET_LORAS_DIR), applied as the
  ModelPatcher's own weight patches on a clone (`lora_clone`), built by ComfyUI's LoRA loader;
- datasets: folders under ComfyUI's `input/` (outside ComfyUI $MAGNET_INPUT_DIR).
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
from pathlib import Path

import torch

from ..magnet import lowp
from ..magnet.devices import bf16_supported, default_device, default_dtype
from ..magnet.transformer import official_name

try:  # ComfyUI present?
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils
    import folder_paths
except ImportError:  # plain Python: tests, scripts
    mm = None
    folder_paths = None
try:  # ComfyUI's LoRA loader (comfy/lora.py, 2024 on)
    import comfy.lora as comfy_lora
except ImportError:
    comfy_lora = None

IN_COMFY = mm is not None
log = logging.getLogger(__name__)
ENV_DIRS = {"magnet": "MAGNET_MODELS_DIR", "text_encoders": "MAGNET_TEXT_ENCODERS_DIR", "clap": "MAGNET_CLAP_DIR",
            "magnet_loras": "MAGNET_LORAS_DIR"}


def register_folders():
    """models/magnet (releases: folders and converted .safetensors) and models/clap. Keeps paths the user
    added in extra_model_paths.yaml (which ComfyUI applies before loading custom nodes)."""
    if folder_paths is None:
        return
    for name in ("magnet", "clap"):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name), is_default=True)
        paths, _ = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (paths, {".safetensors"})
    register_lora_folders()


def register_lora_folders():
    """`magnet_loras`: a `magnet` folder inside every LoRA folder ComfyUI knows (models/loras first, where the
    trainer saves; paths from extra_model_paths.yaml follow), so our LoRAs stay apart from image-model ones."""
    if folder_paths is None:
        return
    try:
        loras = folder_paths.get_folder_paths("loras")
    except KeyError:
        loras = []
    default = os.path.join(folder_paths.models_dir, "loras", "magnet")
    for path in [os.path.join(p, "magnet") for p in loras if os.path.join(p, "magnet") != default]:
        folder_paths.add_model_folder_path("magnet_loras", path)
    folder_paths.add_model_folder_path("magnet_loras", default, is_default=True)
    paths, _ = folder_paths.folder_names_and_paths["magnet_loras"]
    folder_paths.folder_names_and_paths["magnet_loras"] = (paths, {".safetensors"})


def input_dir() -> Path | None:
    """ComfyUI's input folder (datasets are chosen from its subfolders); outside ComfyUI $MAGNET_INPUT_DIR."""
    if folder_paths is not None:
        return Path(folder_paths.get_input_directory())
    env = os.environ.get("MAGNET_INPUT_DIR", "")
    return Path(env) if env else None


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
        self._register_state_dict_hook(_holder_names)


def _holder_names(module, state_dict, prefix, local_metadata):
    """ComfyUI sees each weight under the name of the module holding it (`...self_attn.in_proj.weight`).
    Its ModelPatcher loads module by module and patches `<module>.weight`, and accepts a patch only for a key
    of `state_dict()`; our LM's attention saves its packed projection under the checkpoints' name
    (`in_proj_weight`), which ComfyUI would then never patch. Only the keys ComfyUI reads change."""
    for name, _ in module.named_parameters():
        official = official_name(name)
        if official != name and prefix + official in state_dict:
            state_dict[prefix + name] = state_dict.pop(prefix + official)


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
    for p in unique:
        exact_before_patching(p)
    if _takes_keyword(mm.load_models_gpu, "force_full_load"):
        mm.load_models_gpu(unique, force_full_load=True)
    else:   # ComfyUI before force_full_load (mid 2024): settle() completes partial loads
        mm.load_models_gpu(unique)
    for p in unique:
        settle(p)


def exact_before_patching(patcher) -> None:
    """ComfyUI computes a weight patch (a LoRA) from the weight it finds: a weight fast mode holds as a
    float16 record (`magnet.lowp`) is made its exact float32 self first, so a patched model is the same
    whatever ran before (weights already patched are ComfyUI's own tensors, never records)."""
    patches = getattr(patcher, "patches", None)
    if not patches:
        return
    params = []
    for key in patches:
        obj = patcher.model
        for part in str(key).split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.Tensor):
            params.append(obj)
    lowp.restore_params(params, getattr(patcher.model, "inner", None))


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


def interrupt_requested() -> bool:
    """Whether the user pressed Cancel, without raising (the trainer stops after the step it is in and saves
    the steps done); `check_interrupt` then raises."""
    if mm is None:
        return False
    fn = getattr(mm, "processing_interrupted", None)
    return bool(fn()) if fn is not None else False


def progress_text(text: str, node_id) -> None:
    """A line of text shown on the node while it runs (ComfyUI's send_progress_text, 2025 on; else nothing)."""
    if mm is None or node_id is None:
        return
    try:
        from server import PromptServer
        PromptServer.instance.send_progress_text(text, node_id)
    except Exception:    # an older ComfyUI: the bar and the log still show progress
        pass


def temp_file(data: bytes, prefix: str, suffix: str) -> list[dict]:
    """Write a file (a PNG, a WAV) into ComfyUI's temp folder and return the `ui` entry that shows it on the node
    (what PreviewImage / PreviewAudio do); [] outside ComfyUI."""
    if folder_paths is None:
        return []
    folder = Path(folder_paths.get_temp_directory())
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{prefix}_{os.urandom(5).hex()}{suffix}"
    (folder / name).write_bytes(data)
    return [{"filename": name, "subfolder": "", "type": "temp"}]


def patcher_of(patchers, module: torch.nn.Module):
    """(the ModelPatcher among `patchers` that manages `module`, the prefix of `module`'s names in it), or
    (None, "") when none does (outside ComfyUI)."""
    for p in patchers:
        root = getattr(p, "model", None)
        if p is None or root is None or not (hasattr(p, "clone") and hasattr(p, "add_patches")):
            continue
        for name, sub in root.named_modules():
            if sub is module:
                return p, (name + "." if name else "")
    return None, ""


def lora_clone(patcher, prefix: str, pairs: dict, alpha: float, strength: float):
    """A clone of `patcher` carrying a LoRA as ComfyUI's own weight patches: W + strength * alpha / rank * B @ A
    on each adapted weight, computed by ComfyUI when it loads the clone; the shared module is unchanged
    until then, and ComfyUI restores it when it loads another clone (or unloads this one).

    pairs: {parameter name of the weight in the patched module: (A [rank, in], B [out, rank])}. The patches are
    made by ComfyUI's LoRA loader (`comfy.lora.load_lora`) from `<name>.lora_up.weight` (B),
    `.lora_down.weight` (A) and `.alpha`, so any ComfyUI gets the patch form it understands."""
    if comfy_lora is None:
        raise RuntimeError("this ComfyUI has no comfy.lora module")
    tensors, to_load = {}, {}
    for name, (a, b) in pairs.items():
        stem = name[: -len(".weight")] if name.endswith(".weight") else name
        tensors[f"{stem}.lora_up.weight"] = b
        tensors[f"{stem}.lora_down.weight"] = a
        tensors[f"{stem}.alpha"] = torch.tensor(float(alpha))
        to_load[stem] = prefix + name
    patches = comfy_lora.load_lora(tensors, to_load)
    clone = patcher.clone()
    added = clone.add_patches(patches, float(strength))
    missing = sorted(set(patches) - set(added))
    if len(patches) != len(pairs) or missing:
        raise RuntimeError(f"ComfyUI did not accept the LoRA patches for {missing or sorted(pairs)[:3]}")
    return clone
