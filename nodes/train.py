"""LoRA fine-tuning in ComfyUI: train a LoRA on a folder of audio, and apply LoRAs to a MAGNeT model.

A LoRA is applied through ComfyUI's own weight patches on a clone of the model's ModelPatcher (ComfyUI's LoRA
math, W + strength * alpha / rank * B @ A, computed when ComfyUI loads the clone): the cached base model is
never changed, loaders stack, and ComfyUI restores the base weights when it loads another clone or unloads
this one. Outside ComfyUI the engine's `with_lora` (a model sharing the base weights) does the same."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from ..magnet.devices import codec_device
from ..magnet.errors import MagnetError
from ..magnet.chart import SMOOTHING, loss_chart
from ..magnet.chart import png_bytes as chart_png
from ..magnet.audio import wav_bytes
from ..magnet.lora import DEFAULT_RANK, check_lora_fits, check_strength, load_lora
from ..magnet.train import TrainSettings
from . import comfy
from .paths import NONE, list_datasets, list_loras, resolve_dataset, resolve_lora, save_path, token_cache
from .common import CATEGORY, MODEL, TEXT_ENCODER, Handle, audio_out, finite, ready, seed_arg, user_errors

log = logging.getLogger(__name__)

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
    objective; the LM, T5 and EnCodec stay frozen. Progress and the running loss show on the node, previews
    play on it; Cancel stops within one step and keeps the steps done (`<name>.step<N>`, resumable)."""

    DISPLAY_NAME = "MAGNeT Train LoRA"
    DESCRIPTION = ("Teaches a MAGNeT model the sound of a folder of your audio: trains a LoRA and saves it to "
                   "models/loras/magnet, with preview clips you can hear on the node. Apply it with MAGNeT LoRA "
                   "Loader.")

    @classmethod
    def INPUT_TYPES(cls):
        d = TrainSettings()
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
                                    "tooltip": "or a folder path relative to the input folder (or an absolute "
                                               "path in a folder the administrator allows); when not empty it "
                                               "is used instead of `dataset`"}),
                "trigger": ("STRING", {"default": "",
                                       "tooltip": "an optional word put before every caption (e.g. mystyle); "
                                                  "use it in prompts to call up what was learnt"}),
                "steps": ("INT", {"default": d.steps, "min": 1, "max": 100000,
                                  "tooltip": "optimizer steps in all (a resumed run continues to this total); a "
                                             "few hundred for a handful of clips (watch the loss flatten)"}),
                "rank": ("INT", {"default": DEFAULT_RANK, "min": 1, "max": 256,
                                 "tooltip": f"LoRA rank: how much it can learn (and its file size); "
                                            f"{DEFAULT_RANK} suits a style, 4-8 a small change"}),
                "learning_rate": ("FLOAT", {"default": d.lr, "min": 0.0000001, "max": 0.1, "step": 0.000001,
                                            "tooltip": "AdamW learning rate (warmup, then a cosine decay); "
                                                       "lower it if the loss jumps up or becomes nan"}),
                "batch": ("INT", {"default": d.batch, "min": 1, "max": 64,
                                  "tooltip": "clips per step; more is smoother but needs more memory"}),
                # not named `seed`: ComfyUI's frontend gives every INT named seed a control_after_generate
                # widget (randomize by default), which would train again at every queue
                "training_seed": ("INT", {"default": d.seed, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                          "tooltip": "random seed of the crops, masks and the LoRA's start; the "
                                                     "same seed, data and settings give the same LoRA on the CPU"}),
                "save_name": ("STRING", {"default": "my_style",
                                         "tooltip": "file name under models/loras/magnet (.safetensors is added); "
                                                    "a finished LoRA of that name is replaced at the end (a "
                                                    "cancelled run saves to <name>.step<N> instead)"}),
            },
            "optional": {
                "previews": ("BOOLEAN", {"default": d.previews,
                                         "tooltip": "render short clips with the LoRA at the end (and at each "
                                                    "save), played on this node and given at the previews output"}),
                "preview_prompts": ("STRING", {"default": "", "multiline": True,
                                               "tooltip": "one prompt per line for the previews; empty: the trigger "
                                                          "word and two captions of the dataset"}),
                "save_every": ("INT", {"default": d.save_every, "min": 0, "max": 100000,
                                       "tooltip": "also save (and preview) every N steps as <name>.step<N>; 0: only "
                                                  "at the end"}),
                "resume_from": ("STRING", {"default": "",
                                           "tooltip": "a LoRA under models/loras/magnet to continue, e.g. "
                                                      "my_style.step120 (what a cancelled run saved): the same "
                                                      "dataset, rank and release; steps is the total to reach"}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("STRING", "IMAGE", "AUDIO")
    RETURN_NAMES = ("lora_name", "loss", "previews")
    OUTPUT_TOOLTIPS = ("the saved LoRA's file name: connect to MAGNeT LoRA Loader's lora_name",
                       "the loss chart: the loss per step, its average and the validation losses (also on the node)",
                       "the last preview clips, one per prompt (also played on the node, one after another); "
                       "silence when previews are off")
    FUNCTION = "train"
    OUTPUT_NODE = True                 # it writes a file: runs even with nothing connected
    CATEGORY = CATEGORY

    def train(self, model, text_encoder, dataset, path, trigger, steps, rank, learning_rate, batch, training_seed,
              save_name, previews=True, preview_prompts="", save_every=0, resume_from="", unique_id=None):
        from ..magnet.train import train_lora
        with user_errors(self.DISPLAY_NAME):
            try:
                seed = seed_arg(training_seed)
            except MagnetError as e:
                raise MagnetError(str(e).replace("input `seed`", "input `training_seed`")) from None
            lr = finite(learning_rate, "learning_rate")
            if lr <= 0:
                raise MagnetError(f"input `learning_rate` is {lr:g}; it must be above 0 (typical: 0.0001).")
            if not isinstance(previews, bool):
                raise MagnetError(f"input `previews` {previews!r} must be true or false.")
            prompts = tuple(line.strip() for line in str(preview_prompts or "").splitlines() if line.strip())
            cache = token_cache()
            settings = TrainSettings(steps=steps, rank=rank, lr=lr, batch=batch, seed=seed, trigger=trigger,
                                     save_every=save_every, previews=previews, preview_prompts=prompts,
                                     cache_dir=None if cache is None else str(cache)).checked()
            data = resolve_dataset(dataset, path)
            out = save_path(save_name)
            resume = resolve_lora(str(resume_from).strip()) if str(resume_from or "").strip() else None
            m, te = ready(model, text_encoder)
            if getattr(m, "loras", None) or any(getattr(p, "patches", None) for p in model.patchers):
                raise MagnetError("the model has a LoRA applied (MAGNeT LoRA Loader): connect the Model Loader's "
                                  "model directly; a LoRA is trained on the release itself.")
            whole(m.codec, codec_device(m.device))
            progress = TrainProgress(settings.steps, unique_id)
            with torch.inference_mode(False):
                trainee = trainable(m, te)
                result = train_lora(trainee, data, out, settings, progress=progress, should_stop=progress.should_stop,
                                    resume=resume, log=lambda msg: log.warning("MAGNeT Train LoRA: %s", msg))
            if result.cancelled and result.path is not None:
                comfy.progress_text(f"stopped at step {result.steps_done}: saved {Path(result.path).name} (put it "
                                    f"in resume_from to continue)", unique_id)
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
            audio, reel = preview_audio(result.previews, m.sample_rate)
            ui = {"images": comfy.temp_file(png_bytes(image[0]), "magnet_lora_loss", ".png")}
            if reel is not None:
                ui["audio"] = comfy.temp_file(reel, "magnet_lora_previews", ".wav")
            return {"ui": ui, "result": (name, image, audio)}


def preview_audio(previews: list, sample_rate: int) -> tuple[dict, bytes | None]:
    """The last previews as an AUDIO (one clip per prompt) and as one WAV for the node's player (the clips one
    after another, half a second apart); a short silence and None without previews."""
    if not previews:
        return audio_out(torch.zeros(1, 1, sample_rate // 10), sample_rate), None
    last = previews[-1]
    wav, sr = last["audio"].float().cpu(), int(last["sample_rate"])
    gap = torch.zeros(wav.shape[1], sr // 2)
    reel = torch.cat([torch.cat([clip, gap], dim=-1) for clip in wav], dim=-1)
    return audio_out(wav, sr), wav_bytes(reel, sr)


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
            self.smooth = loss if self.smooth is None else SMOOTHING * self.smooth + (1 - SMOOTHING) * loss
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
    """The model to train with: the loaded one (its LM, codec) with this text encoder, through the engine (which
    checks the T5's width). ComfyUI runs nodes under torch.inference_mode, so the weights its loaders made are
    inference tensors, which autograd refuses to save for backward even frozen: they are swapped for ordinary
    tensors of the same values (once, in place)."""
    trainee = m.with_text_encoder(te)
    leave_inference_mode(m.lm)        # T5 and EnCodec run without gradients: inference tensors are fine there
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


# -- the loss chart -------------------------------------------------------------------------------------------

def loss_image(losses: list[float], val_losses: list | None = None) -> torch.Tensor:
    """The engine's training chart (`magnet.chart.loss_chart`) as a ComfyUI IMAGE (float32 [1, H, W, 3] in 0..1)."""
    rgb = np.asarray(loss_chart(losses, val_losses), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb.copy())[None]


def png_bytes(image: torch.Tensor) -> bytes:
    """An IMAGE's picture [H, W, 3] in 0..1 as PNG bytes (for the node's own preview)."""
    from PIL import Image
    arr = (image.detach().cpu().float().clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    return chart_png(Image.fromarray(arr, "RGB"))
