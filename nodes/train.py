"""LoRA fine-tuning in ComfyUI: train a LoRA on a folder of audio, and apply LoRAs to a MAGNeT model.

A LoRA is applied through ComfyUI's own weight patches on a clone of the model's ModelPatcher (ComfyUI's LoRA
math, W + strength * alpha / rank * B @ A, computed when ComfyUI loads the clone): the cached base model is
never changed, loaders stack, and ComfyUI restores the base weights when it loads another clone or unloads
this one. Outside ComfyUI the engine's `with_lora` (a model sharing the base weights) does the same."""
from __future__ import annotations

import copy
import logging
import math
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ..magnet.devices import codec_device
from ..magnet.errors import MagnetError
from ..magnet.lora import DEFAULT_RANK, check_lora_fits, check_strength, load_lora
from . import comfy
from .common import CATEGORY, MODEL, TEXT_ENCODER, Handle, finite, ready, seed_arg, user_errors

log = logging.getLogger(__name__)

NONE = "none"                    # the first choice of the LoRA and dataset lists (so they are never empty)
LORA_KIND = "magnet_loras"
SAVE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._()+-]{0,120}$")


# -- where LoRAs and datasets are ---------------------------------------------------------------------------

def list_loras() -> list[str]:
    """`none`, then the .safetensors files under models/loras/magnet (subfolders as `sub/name.safetensors`)."""
    names = set()
    for root in comfy.model_dirs(LORA_KIND):
        if root.is_dir():
            names.update(p.relative_to(root).as_posix() for p in root.rglob("*.safetensors")
                         if p.is_file() and not p.name.startswith("."))
    return [NONE, *sorted(names)]


def _inside(root: Path, name: str) -> Path | None:
    """root/name when the name stays inside root (no `..`, not absolute), else None. Judged on the name, not
    the resolved path: a LoRA file may be a link to one kept elsewhere."""
    rel = Path(str(name).replace("\\", "/"))
    if not str(name) or rel.is_absolute() or rel.drive or ".." in rel.parts:
        return None
    return root / rel


def resolve_lora(name: str) -> Path:
    """A LoRA name as listed (or as Train LoRA returns it) -> its file under models/loras/magnet."""
    roots = comfy.model_dirs(LORA_KIND)
    for candidate in (name, f"{name}.safetensors"):
        for root in roots:
            path = _inside(root, candidate)
            if path is not None and path.is_file():
                return path
    where = ", ".join(str(r) for r in roots) or "models/loras/magnet"
    raise MagnetError(f"LoRA {name!r} was not found in {where}. Train one with MAGNeT Train LoRA, or put the "
                      f".safetensors file there and refresh the page (R) so the list updates.")


def list_datasets() -> list[str]:
    """`none`, then every folder under ComfyUI's input folder (nested ones as `a/b`)."""
    root = comfy.input_dir()
    names = []
    if root is not None and root.is_dir():
        for here, dirs, _ in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]       # hidden ones (the token cache) pruned
            names += [Path(here, d).relative_to(root).as_posix() for d in dirs]
    return [NONE, *sorted(names)]


def resolve_dataset(dataset: str, path: str) -> Path:
    """The dataset folder: `path` when given (absolute, or relative to the input folder), else the chosen one."""
    root = comfy.input_dir()
    text = str(path or "").strip().strip('"')
    if text:
        p = Path(text).expanduser()
        if not p.is_absolute() and root is not None:
            p = root / p
        what = f"input `path` ({p})"
    elif dataset and dataset != NONE:
        p = (root / dataset) if root is not None else Path(dataset)
        what = f"input `dataset` ({p})"
    else:
        raise MagnetError(f"no dataset: choose a folder under {root or 'the input folder'} in `dataset`, or type "
                          f"a folder in `path`, holding the audio files to learn from (with optional .txt "
                          f"captions beside them).")
    if not p.is_dir():
        raise MagnetError(f"{what} is not a folder. Put the audio files in a folder under "
                          f"{root or 'the input folder'} (or give the full path of one).")
    return p


def save_path(save_name: str) -> Path:
    """models/loras/magnet/<save_name>.safetensors (the first LoRA folder)."""
    name = str(save_name or "").strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not SAVE_NAME.match(name) or ".." in name:
        raise MagnetError(f"input `save_name` {save_name!r} is not a plain file name: use letters, digits, spaces "
                          f"and . _ ( ) + - (no folders), e.g. my_style.")
    roots = comfy.model_dirs(LORA_KIND)
    if not roots:
        raise MagnetError("there is no folder to save LoRAs in: set $MAGNET_LORAS_DIR (outside ComfyUI).")
    return roots[0] / f"{name}.safetensors"


# -- the LoRA Loader ------------------------------------------------------------------------------------------

class MagnetLoraLoader:
    """MAGNET_MODEL + a LoRA file -> MAGNET_MODEL with the LoRA applied at `strength` (chain loaders to
    stack LoRAs). In ComfyUI: weight patches on a clone of the model's ModelPatcher."""

    DISPLAY_NAME = "MAGNeT LoRA Loader"
    DESCRIPTION = ("Applies a LoRA trained with MAGNeT Train LoRA to a MAGNeT model, at a strength. Chain several "
                   "loaders to stack LoRAs; the loaded model itself is never changed.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "the MAGNeT release (from the Model Loader, or another LoRA Loader "
                                             "to stack LoRAs)"}),
                "lora": (list_loras(), {"tooltip": "a LoRA under models/loras/magnet (made by MAGNeT Train LoRA "
                                                   "for this release). none: the model passes through unchanged "
                                                   "unless `lora_name` is given"}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "how much of the LoRA: 1 = as trained, 0 = off (the model "
                                                  "unchanged), between = partly, negative = away from it"}),
            },
            "optional": {
                "lora_name": ("STRING", {"default": "",
                                         "tooltip": "a LoRA file name under models/loras/magnet; when not empty it "
                                                    "is used instead of `lora`. Connect MAGNeT Train LoRA's "
                                                    "lora_name here to use a LoRA as soon as it is trained"}),
            },
        }

    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("the model with the LoRA applied: connect to the Sampler (or another LoRA Loader)",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def IS_CHANGED(cls, model=None, lora=NONE, strength=1.0, lora_name="", **_):
        """A LoRA file trained again under the same name is read again."""
        name = str(lora_name or "").strip() or (lora if lora != NONE else "")
        try:
            st = resolve_lora(name).stat() if name else None
        except (MagnetError, OSError):
            return ""
        return "" if st is None else f"{name}:{st.st_mtime_ns}:{st.st_size}"

    def load(self, model, lora, strength, lora_name=""):
        with user_errors(self.DISPLAY_NAME):
            strength = check_strength(finite(strength, "strength"))
            name = str(lora_name or "").strip() or (None if lora in (None, "", NONE) else lora)
            if name is None:
                return (model,)
            weights = load_lora(resolve_lora(name))
            m = model.obj
            check_lora_fits(weights, m)
            if strength == 0.0:                 # ComfyUI's LoRA loader does the same: nothing to patch
                return (model,)
            label = f"{model.name} + {Path(weights.path).stem}"
            patcher, prefix = comfy.patcher_of(model.patchers, m.lm)
            if patcher is None:                 # outside ComfyUI: a model sharing the base weights
                return (Handle(m.with_lora(weights, strength), label, list(model.patchers)),)
            clone = comfy.lora_clone(patcher, prefix, weights.pairs(), weights.alpha, strength)
            return (Handle(m, label, [clone if p is patcher else p for p in model.patchers]),)


# -- the trainer ----------------------------------------------------------------------------------------------

class MagnetTrainLora:
    """A folder of audio (+ captions) -> a LoRA file in models/loras/magnet, with MAGNeT's own training
    objective; the LM, T5 and EnCodec stay frozen. Progress and the running loss show on the node; Cancel
    stops within one step."""

    DISPLAY_NAME = "MAGNeT Train LoRA"
    DESCRIPTION = ("Teaches a MAGNeT model the sound of a folder of your audio: trains a LoRA and saves it to "
                   "models/loras/magnet. Apply it with MAGNeT LoRA Loader.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "the MAGNeT release to adapt, from the Model Loader (the LoRA fits "
                                             "this release only)"}),
                "text_encoder": (TEXT_ENCODER, {"tooltip": "its T5, from the Text Encoder Loader (t5-base for "
                                                           "music, t5-large for audio-magnet): encodes the captions"}),
                "dataset": (list_datasets(), {"tooltip": "a folder under ComfyUI's input folder holding the audio "
                                                         "(any format soundfile reads; captions from <name>.txt "
                                                         "or <name>.json beside each file, else the file name)"}),
                "path": ("STRING", {"default": "",
                                    "tooltip": "or a folder path (absolute, or relative to the input folder); "
                                               "when not empty it is used instead of `dataset`"}),
                "trigger": ("STRING", {"default": "",
                                       "tooltip": "an optional word put before every caption (e.g. mystyle); "
                                                  "use it in prompts to call up what was learnt"}),
                "steps": ("INT", {"default": 200, "min": 1, "max": 100000,
                                  "tooltip": "optimizer steps; a few hundred for a handful of clips (watch "
                                             "the loss flatten)"}),
                "rank": ("INT", {"default": DEFAULT_RANK, "min": 1, "max": 256,
                                 "tooltip": f"LoRA rank: how much it can learn (and its file size); "
                                            f"{DEFAULT_RANK} suits a style, 4-8 a small change"}),
                "learning_rate": ("FLOAT", {"default": 0.0001, "min": 0.0000001, "max": 0.1, "step": 0.000001,
                                            "tooltip": "AdamW learning rate (warmup, then a cosine decay); "
                                                       "lower it if the loss jumps up or becomes nan"}),
                "batch": ("INT", {"default": 1, "min": 1, "max": 64,
                                  "tooltip": "clips per step; more is smoother but needs more memory"}),
                # not named `seed`: ComfyUI's frontend gives every INT named seed a control_after_generate
                # widget (randomize by default), which would train again at every queue
                "training_seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                          "tooltip": "random seed of the crops, masks and the LoRA's start; the "
                                                     "same seed, data and settings give the same LoRA on the CPU"}),
                "save_name": ("STRING", {"default": "my_style",
                                         "tooltip": "file name under models/loras/magnet (.safetensors is added); "
                                                    "an existing LoRA of that name is replaced"}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("lora_name", "loss")
    OUTPUT_TOOLTIPS = ("the saved LoRA's file name: connect to MAGNeT LoRA Loader's lora_name",
                       "the training loss per step as a picture (also shown on this node)")
    FUNCTION = "train"
    OUTPUT_NODE = True                 # it writes a file: runs even with nothing connected
    CATEGORY = CATEGORY

    def train(self, model, text_encoder, dataset, path, trigger, steps, rank, learning_rate, batch, training_seed,
              save_name, unique_id=None):
        from ..magnet.train import TrainSettings, train_lora
        with user_errors(self.DISPLAY_NAME):
            try:
                seed = seed_arg(training_seed)
            except MagnetError as e:
                raise MagnetError(str(e).replace("input `seed`", "input `training_seed`")) from None
            lr = finite(learning_rate, "learning_rate")
            if lr <= 0:
                raise MagnetError(f"input `learning_rate` is {lr:g}; it must be above 0 (typical: 0.0001).")
            data = resolve_dataset(dataset, path)
            out = save_path(save_name)
            m, te = ready(model, text_encoder)
            if getattr(m, "loras", None) or any(getattr(p, "patches", None) for p in model.patchers):
                raise MagnetError("the model has a LoRA applied (MAGNeT LoRA Loader): connect the Model Loader's "
                                  "model directly; a LoRA is trained on the release itself.")
            whole(m.codec, codec_device(m.device))
            settings = TrainSettings(steps=int(steps), rank=int(rank), lr=lr, batch=int(batch), seed=seed,
                                     trigger=str(trigger or "").strip())
            progress = TrainProgress(int(steps), unique_id)
            with torch.inference_mode(False):
                trainee = trainable(m, te)
                result = train_lora(trainee, data, out, settings, progress=progress, should_stop=progress.should_stop,
                                    log=lambda msg: log.warning("MAGNeT Train LoRA: %s", msg))
            comfy.check_interrupt()
            if progress.interrupt is not None:  # Cancel: the steps done so far are saved; the run stops here
                raise progress.interrupt
            if result.path is None:
                raise MagnetError("the training stopped before its first step; nothing was saved.")
            losses = [float(x) for x in result.losses]
            log.info("MAGNeT Train LoRA: %d steps, loss %s -> %s; saved %s", len(losses),
                     f"{losses[0]:.4f}" if losses else "-", f"{losses[-1]:.4f}" if losses else "-", result.path)
            image = loss_image(losses, list(result.val_losses or []))
            name = Path(result.path).relative_to(out.parent).as_posix()
            ui = comfy.temp_preview(png_bytes(image[0]), "magnet_lora_loss")
            return {"ui": {"images": ui}, "result": (name, image)}


def whole(module: torch.nn.Module, device) -> None:
    """EnCodec encodes the dataset where it is (only the model's LM is readied here). A partial unload by
    ComfyUI's memory manager can leave a module split between devices; it is then moved to `device` whole."""
    devices = {t.device for t in (*module.parameters(), *module.buffers())}
    if len(devices) > 1:
        module.to(device)


class TrainProgress:
    """progress(step, total, loss) for the engine: ComfyUI's bar, the running loss as text on the node, and a
    log line every tenth of the run; `should_stop` for its cancel polls.

    ComfyUI's bar raises the interrupt when the user pressed Cancel (and clears the request): caught here, so
    the engine stops at its next poll and saves the steps done, then the node raises it."""

    def __init__(self, total: int, node_id=None):
        self.bar = comfy.Progress(total)
        self.node_id = node_id
        self.every = max(1, total // 10)
        self.smooth = None
        self.interrupt = None

    def should_stop(self) -> bool:
        return self.interrupt is not None or comfy.interrupt_requested()

    def __call__(self, step: int, total: int, loss: float):
        loss = float(loss)
        if math.isfinite(loss):
            self.smooth = loss if self.smooth is None else 0.9 * self.smooth + 0.1 * loss
        text = f"step {step}/{total}  loss {loss:.4f}"
        if self.smooth is not None:
            text += f"  (average {self.smooth:.4f})"
        comfy.progress_text(text, self.node_id)
        if step % self.every == 0 or step == total:
            log.info("MAGNeT Train LoRA: %s", text)
        try:
            self.bar(step, total)
        except Exception as e:
            if not comfy.is_interrupt(e):
                raise
            self.interrupt = e


def trainable(m, te):
    """The model to train with: the loaded one (its LM, codec) with this text encoder. ComfyUI runs nodes under
    torch.inference_mode, so the weights its loaders made are inference tensors, which autograd refuses to save
    for backward even frozen: they are swapped for ordinary tensors of the same values (once, in place)."""
    leave_inference_mode(m.lm)        # T5 and EnCodec run without gradients: inference tensors are fine there
    trainee = copy.copy(m)
    trainee.text_encoder = te
    return trainee


def leave_inference_mode(module: torch.nn.Module) -> int:
    """Replace every inference-mode parameter and buffer of `module` by an ordinary copy (same values, same
    requires_grad); returns how many. Call outside inference mode."""
    n = 0
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_inference():
                mod._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad)
                n += 1
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_inference():
                mod._buffers[name] = b.clone()
                n += 1
    return n


# -- the loss picture -----------------------------------------------------------------------------------------

# 3x5 digits (and . - e) for the axis labels, so the picture needs no font library
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "e": "000111111100111", " ": "000000000000000",
}


def _text(img: np.ndarray, x: int, y: int, text: str, color, scale: int = 2) -> None:
    for i, ch in enumerate(text):
        bits = np.array([c == "1" for c in _GLYPHS.get(ch, _GLYPHS[" "])]).reshape(5, 3)
        glyph = np.kron(bits, np.ones((scale, scale), dtype=bool))
        x0 = x + i * 4 * scale
        h, w = glyph.shape
        if x0 < 0 or y < 0 or x0 + w > img.shape[1] or y + h > img.shape[0]:
            continue
        img[y:y + h, x0:x0 + w][glyph] = color


def _polyline(img: np.ndarray, xs: np.ndarray, ys: np.ndarray, color, width: int = 1) -> None:
    for i in range(len(xs) - 1):
        n = int(max(abs(xs[i + 1] - xs[i]), abs(ys[i + 1] - ys[i]))) + 1
        px = np.rint(np.linspace(xs[i], xs[i + 1], n)).astype(int)
        py = np.rint(np.linspace(ys[i], ys[i + 1], n)).astype(int)
        for d in range(width):
            ok = (py + d >= 0) & (py + d < img.shape[0]) & (px >= 0) & (px < img.shape[1])
            img[py[ok] + d, px[ok]] = color
    if len(xs) == 1:
        img[int(ys[0]):int(ys[0]) + 3, max(0, int(xs[0]) - 1):int(xs[0]) + 2] = color


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.2e}"


def loss_image(losses: list[float], val_losses: list | None = None, width: int = 640,
               height: int = 360) -> torch.Tensor:
    """The loss per step as a ComfyUI IMAGE (float32 [1, height, width, 3] in 0..1): each step's loss (dim), its
    running average (bright), validation losses (dots, when there are any), with the loss range and step count."""
    img = np.full((height, width, 3), 0.11, dtype=np.float32)
    left, right, top, bottom = 60, width - 16, 16, height - 30
    img[top:bottom + 1, left] = img[bottom, left:right + 1] = 0.45                   # axes
    pts = np.array([v for v in losses if math.isfinite(v)], dtype=np.float64)
    vals = [(float(s), float(v)) for s, v in (_pairs(val_losses) or []) if math.isfinite(float(v))]
    if len(pts) or vals:
        every = np.concatenate([pts, np.array([v for _, v in vals])]) if vals else pts
        lo, hi = float(every.min()), float(every.max())
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        n = max(len(losses), 2)

        def to_y(v):
            return bottom - (np.asarray(v) - lo) / (hi - lo) * (bottom - top)

        def to_x(step):
            return left + (np.asarray(step, dtype=np.float64) - 1) / (n - 1) * (right - left)
        for frac in (0.25, 0.5, 0.75):                                                   # grid
            img[int(top + frac * (bottom - top)), left + 1:right + 1] = 0.2
        steps = np.array([i + 1 for i, v in enumerate(losses) if math.isfinite(v)], dtype=np.float64)
        if len(pts):
            _polyline(img, to_x(steps), to_y(pts), (0.35, 0.45, 0.6))
            avg = np.empty_like(pts)
            acc = pts[0]
            for i, v in enumerate(pts):
                acc = v if i == 0 else 0.9 * acc + 0.1 * v
                avg[i] = acc
            _polyline(img, to_x(steps), to_y(avg), (0.35, 0.8, 1.0), width=2)
        for s, v in vals:
            x, y = int(round(float(to_x(s)))), int(round(float(to_y(v))))
            img[max(0, y - 3):y + 4, max(0, x - 3):x + 4] = (1.0, 0.65, 0.2)
        _text(img, 4, top, _fmt(hi), (0.8, 0.8, 0.8))
        _text(img, 4, bottom - 10, _fmt(lo), (0.8, 0.8, 0.8))
        _text(img, right - 4 * 2 * len(str(len(losses))), bottom + 8, str(len(losses)), (0.8, 0.8, 0.8))
        _text(img, left, bottom + 8, "1", (0.8, 0.8, 0.8))
    return torch.from_numpy(img).clamp_(0, 1)[None]


def _pairs(val_losses) -> list:
    """Validation losses as (step, loss): given as pairs, or as a plain list spread evenly over the run."""
    out = []
    for i, v in enumerate(val_losses or []):
        if isinstance(v, (tuple, list)) and len(v) == 2:
            out.append((v[0], v[1]))
        else:
            out.append((i + 1, v))
    return out


def png_bytes(image: torch.Tensor) -> bytes:
    """An RGB float image [H, W, 3] in 0..1 as PNG bytes (zlib only: no image library needed)."""
    arr = (image.detach().cpu().float().clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
