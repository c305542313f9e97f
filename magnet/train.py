"""LoRA fine-tuning on a folder of audio, with MAGNeT's own training objective (`magnet.objective`).

`train_lora` trains a LoRA (`magnet.lora`) on the LM's linear layers; the LM, T5 and EnCodec stay frozen. It
checks everything before any work, saves the full training state beside the LoRA so a stopped run resumes
exactly (`magnet.train_state`), renders previews with the current adapters (`magnet.previews`), and runs in
several processes under torchrun (`magnet.distributed`).
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import lowp
from .devices import autocast_for
from .errors import MagnetError, first_line
from .objective import (  # noqa: F401  (the objective's names, also importable from here)
    masked_loss, masking_rates, release_training, span_starts_table, spans_mask, stage_inputs, stage_loss,
    text_memory)
from .previews import preview_prompts, render_previews
from .train_state import derive_seed


# -- LoRA training ---------------------------------------------------------------------------------------

DEFAULT_STEPS = 500          # the one default of the CLI, the API and the Train LoRA node
PREVIEW_SECONDS = 5.0        # preview clips' length by default (capped at the release's window)


@dataclass
class TrainSettings:
    """How to train a LoRA. `steps` is the total number of optimizer steps (a resumed run continues to it);
    `alpha` None = the rank (scale 1); `cond_dropout` None = the release's own classifier-free-guidance training
    dropout; `crop_seconds` None = the release's window; `warmup` in optimizer steps; `save_every` 0 = only at the
    end; `val_dir` a folder of held-out clips (captions as for training); `seed` any whole number.

    Previews (`previews` True): at every save and at the end, clips of `preview_seconds` rendered with the
    current adapters from `preview_prompts` (default: the trigger word, then two captions of the set), seeded
    from `seed`; written as `<preview_dir>/step{step:06d}_{i}.wav` when `preview_dir` is given."""
    steps: int = DEFAULT_STEPS
    rank: int = 16
    alpha: float | None = None
    dropout: float = 0.0
    lr: float = 1e-4
    batch: int = 1
    grad_accum: int = 1
    warmup: int = 20
    weight_decay: float = 0.0
    seed: int = 0
    trigger: str = ""
    targets: tuple = ()
    checkpointing: bool = False
    save_every: int = 0
    val_dir: str | None = None
    cond_dropout: float | None = None
    crop_seconds: float | None = None
    cache_dir: str | None = None
    loudness: float | None = None
    previews: bool = True
    preview_prompts: tuple = ()
    preview_seconds: float | None = None
    preview_dir: str | None = None

    def checked(self) -> "TrainSettings":
        """A checked copy: every number finite, whole where it must be, in range; else one MagnetError naming
        the setting and what it takes (a value of the wrong type, e.g. a text from a linked node, included)."""
        from . import lora as lora_mod
        s = dataclasses.replace(self)
        for name, low in (("steps", 1), ("rank", 1), ("batch", 1), ("grad_accum", 1), ("warmup", 0),
                          ("save_every", 0)):
            v = getattr(s, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise MagnetError(f"training setting {name} = {v!r} must be a whole number >= {low}.")
        for name in ("lr", "dropout", "weight_decay"):
            v = getattr(s, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise MagnetError(f"training setting {name} = {v!r} must be a finite number >= 0.")
        if not s.lr > 0:
            raise MagnetError(f"learning rate {s.lr!r} must be more than 0 (typical: 1e-4 to 1e-3).")
        if s.dropout >= 1:
            raise MagnetError(f"LoRA dropout {s.dropout} must be below 1.")
        if s.alpha is None:
            s.alpha = float(s.rank)
        if isinstance(s.alpha, bool) or not (isinstance(s.alpha, (int, float)) and math.isfinite(s.alpha)
                                             and s.alpha > 0):
            raise MagnetError(f"LoRA alpha {s.alpha!r} must be a finite number > 0 (default: the rank).")
        s.alpha = float(s.alpha)
        for name, ok in (("cond_dropout", lambda v: 0 <= v < 1), ("crop_seconds", lambda v: v > 0),
                         ("preview_seconds", lambda v: v > 0)):
            v = getattr(s, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or not ok(v)):
                what = "in [0, 1)" if name == "cond_dropout" else "a number of seconds > 0"
                raise MagnetError(f"training setting {name} = {v!r} must be {what}.")
        if isinstance(s.seed, bool) or not isinstance(s.seed, int):
            raise MagnetError(f"training seed {s.seed!r} must be a whole number (any size).")
        if s.loudness is not None:
            from .audio import LUFS_RANGE
            v = s.loudness
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not LUFS_RANGE[0] <= v <= LUFS_RANGE[1]:
                raise MagnetError(f"training setting loudness = {v!r} must be a loudness in LUFS between "
                                  f"{LUFS_RANGE[0]:g} and {LUFS_RANGE[1]:g} (e.g. -14), or None to train on the "
                                  f"files as they are.")
        if not isinstance(s.trigger, str):
            raise MagnetError(f"trigger {s.trigger!r} must be a text.")
        prompts = (s.preview_prompts,) if isinstance(s.preview_prompts, str) else tuple(s.preview_prompts or ())
        if not all(isinstance(p, str) and p.strip() for p in prompts):
            raise MagnetError(f"preview prompts {list(prompts)!r} must be non-empty texts.")
        s.preview_prompts = tuple(p.strip() for p in prompts)
        s.targets = lora_mod.check_targets(s.targets or lora_mod.DEFAULT_TARGETS)
        return s


@dataclass
class TrainResult:
    path: Path | None
    losses: list = field(default_factory=list)       # one per optimizer step (this run)
    val_losses: list = field(default_factory=list)   # (step, loss) at each save and at the end
    steps_done: int = 0                              # optimizer steps in the file, resumed ones included
    cancelled: bool = False
    clips: int = 0
    state: Path | None = None                        # the training state beside `path` (to resume it)
    previews: list = field(default_factory=list)     # {'step', 'prompts', 'audio' [N, C, S], 'sample_rate', 'files'}


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup over `warmup` steps, then a cosine from 1 to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    rest = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / rest)))


class _Captions:
    """T5 states of each caption, encoded once: a batch pads them to its longest with zero rows (zero mask),
    exactly as encoding the batch together does (the padded positions are zero in the memory)."""

    def __init__(self, model, captions):
        self.model = model
        self.cache: dict = {}
        for c in dict.fromkeys(captions):
            cond = model.encode_text([c])
            n = max(1, int(cond.input_ids.shape[1]))
            self.cache[c] = (cond.hidden[0, :n].float().cpu().clone(), cond.mask[0, :n].cpu().clone())

    def batch(self, captions, device):
        """captions (None = the null condition) -> (hidden [B, L, D], mask [B, L]) on `device`."""
        D = self.model.cfg.text_dim
        rows = [self.cache[c] if c is not None else None for c in captions]
        L = max([r[0].shape[0] for r in rows if r is not None] or [1])
        hidden = torch.zeros(len(rows), L, D)
        mask = torch.zeros(len(rows), L, dtype=torch.long)
        for i, r in enumerate(rows):
            if r is not None:
                hidden[i, :r[0].shape[0]] = r[0]
                mask[i, :r[1].shape[0]] = r[1]
        return hidden.to(device), mask.to(device)


def _autocast_dtype(device: torch.device):
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _checkpointed(layer):
    from torch.utils.checkpoint import checkpoint
    inner = layer.forward

    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)
    layer.forward = forward


def step_stage(seed: int, step: int, K: int) -> int:
    """The codebook trained at optimizer step `step` (one per step, as the reference draws one per batch)."""
    return random.Random(derive_seed(seed, "stage", step)).randrange(K)


def example(data, seed: int, step: int, index: int, frames: int, table, span_len: int, dropout: float):
    """Example `index` (0 .. examples per step - 1, over every micro-batch and process) of optimizer step
    `step`: (codes [K, frames], valid [frames], caption or None when dropped, stage mask [frames]). Drawn from
    (seed, step, index) alone, so neither the batch size, the number of processes nor a restart changes it."""
    key = derive_seed(seed, "example", step, index)
    rng, gen = random.Random(key), torch.Generator().manual_seed(key)
    i = rng.randrange(len(data))
    codes, valid = data.window(i, frames, gen)
    caption = None if rng.random() < dropout else data.clips[i].caption
    mask = spans_mask(masking_rates(1, gen), frames, span_len, table, gen)[0]
    return codes, valid, caption, mask


def validation_loss(train_lm, data, captions: _Captions, frames: int, span_len: int, device, seed: int = 0) -> float:
    """Mean stage loss over the held-out clips: one window per clip (a crop drawn from `seed`, so the same one at
    every save), each stage, fixed masks at rate 0.5."""
    key = derive_seed(seed, "validation")
    gen = torch.Generator().manual_seed(key)
    table = span_starts_table(frames, span_len)
    total, n = 0.0, 0
    with torch.no_grad():
        for i, clip in enumerate(data.clips):
            codes, valid = data.window(i, frames, torch.Generator().manual_seed(key))
            hidden, mask = captions.batch([clip.caption], device)
            mem = text_memory(train_lm, hidden, mask)
            for stage in range(codes.shape[0]):
                sm = spans_mask(torch.tensor([0.5]), frames, span_len, table, gen)
                loss = masked_loss(train_lm, codes[None].to(device), mem, stage, sm.to(device), valid[None].to(device))
                total += float(loss)
                n += 1
    return total / max(n, 1)


# -- checks before any work -------------------------------------------------------------------------------

def check_output(out) -> Path:
    """The LoRA file to write: a .safetensors path that is not a folder, not under a file, in a folder that can
    be made and written to (a file is created there and removed). Checked before anything is encoded."""
    from .files import temporary_name
    out = Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise MagnetError(f"output {out} must end in .safetensors, e.g. {out.with_suffix('.safetensors')}.")
    if out.is_dir():
        raise MagnetError(f"output {out} is a folder: give a file name inside it, e.g. {out / 'my_style.safetensors'}.")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise MagnetError(f"output {out} is under {parent}, which is a file: choose a path in a folder.")
            break
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = temporary_name(out)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise MagnetError(f"cannot write the LoRA to {out.parent} ({e.strerror or first_line(e)}): choose a folder "
                          f"you can write to.") from None
    return out


def check_rank(lm, targets, rank: int) -> None:
    """A LoRA's rank must not exceed the smaller side of any layer it adapts (the packed q/k/v projection counts
    by the model width)."""
    from .lora import LoraLinear, target_names
    modules = dict(lm.named_modules())
    sizes = []
    for name in target_names(lm, targets):
        m = modules[name]
        m = m.base if isinstance(m, LoraLinear) else m
        out_f, in_f = m.weight.shape
        sizes.append((min(in_f, out_f // 3 if name.endswith("in_proj") else out_f), name))
    if sizes and rank > min(sizes)[0]:
        most, name = min(sizes)
        raise MagnetError(f"LoRA rank {rank} is more than the layer {name} can take ({most}): use a rank of at "
                          f"most {most} (typical: 4 to 64).")


def _portable(settings: dict, data_dir: Path) -> dict:
    """The training settings as a LoRA's metadata keeps them: no absolute path of this machine (the validation
    folder relative to the dataset's parent, or its name; no cache or preview folder)."""
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()
           if k not in ("cache_dir", "preview_dir")}
    if out.get("val_dir"):
        v = Path(out["val_dir"]).expanduser()
        try:
            out["val_dir"] = v.resolve().relative_to(data_dir.resolve().parent).as_posix()
        except ValueError:
            out["val_dir"] = v.name
    out["dataset"] = data_dir.name
    out["seed"] = str(out["seed"])           # any size: JSON readers keep big whole numbers as text
    return out


# -- the loop --------------------------------------------------------------------------------------------------

def step_file(out: Path, step: int) -> Path:
    """Where a run saves the adapters of step `step` before its end (periodic saves, a cancel)."""
    return out.with_name(f"{out.stem}.step{step}.safetensors")


def _resume_from(resume, model, s: TrainSettings, log):
    """(LoRA weights, TrainState or None) of a resume, checked against this run's release, rank, alpha and
    targets (the dataset is checked once it is read)."""
    from . import lora as lora_mod
    from .train_state import check_resume, is_state_file, load_state, state_path
    path = Path(resume).expanduser()
    if is_state_file(path):
        state = load_state(path)
        path = path.with_name(path.name[: -len(".state.safetensors")] + ".safetensors")
    else:
        state = load_state(state_path(path)) if state_path(path).is_file() else None
    prev = lora_mod.as_lora(path)
    lora_mod.check_lora_fits(prev, model)
    release = Path(str(getattr(model, "source", "") or "")).name
    mine = {"release": release, "rank": s.rank, "alpha": s.alpha, "targets": list(s.targets)}
    if state is not None:
        check_resume(state, dict(mine, dataset=state.info["dataset"]))
    else:
        theirs = {"release": prev.meta.get("release", ""), "rank": prev.rank, "alpha": float(prev.alpha),
                  "targets": list(prev.targets)}
        for key in ("release", "rank", "alpha", "targets"):
            a, b = theirs[key], mine[key]
            if (sorted(a) if key == "targets" else a) != (sorted(b) if key == "targets" else b):
                raise MagnetError(f"cannot resume {path}: its {key} is {a!r}, this run's is {b!r}. Resume with "
                                  f"{key} {a!r}, or start a new training.")
        log(f"{path} has no training state beside it: continuing from its {prev.meta.get('steps') or 0} steps "
            f"with fresh optimizer moments (not an exact resume)")
    try:
        done = int(state.step if state is not None else prev.meta.get("steps") or 0)
    except (TypeError, ValueError):
        raise MagnetError(f"cannot resume {path}: its step count {prev.meta.get('steps')!r} is not a number. The "
                          f"file is damaged: resume from another file or start again.") from None
    if done >= s.steps:
        raise MagnetError(f"{path} has {done} steps already; steps is the total to reach: give more than {done}.")
    return prev, state, done


def train_lora(model, data_dir, out, settings: TrainSettings | None = None, *, progress=None, should_stop=None,
               resume=None, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train a LoRA on the audio in `data_dir` and write it to `out` (.safetensors), with its training state
    beside it (`<stem>.state.safetensors`).

    Everything that can be checked is checked before any file is encoded: the output path, the text encoder
    (the model's own width check), the settings, the rank against the layers, a resume's file and state.
    progress(step, total, loss) after each optimizer step; should_stop() polled before each micro-batch: a cancel
    stops within one step and writes the adapters of the last complete step, with their state, to
    `<stem>.step<N>.safetensors` (never over a finished LoRA of the name asked for). Periodic saves
    (`save_every`) write there too. resume: a LoRA file (or its state file) written by this function: the run
    continues to `settings.steps` (the total) and, on the CPU, ends with the same LoRA, bit for bit, as a run that
    was never stopped. The model (LM, T5, codec) is not changed."""
    from . import lora as lora_mod
    from .dataset import AudioFolder
    from .distributed import current
    from .train_state import dataset_fingerprint, restore_optimizer, restore_rng, save_state, state_path
    s = (settings or TrainSettings()).checked()
    group = current()
    log = (log or (lambda msg: None)) if group.main else (lambda msg: None)
    progress = progress if group.main else None
    out = check_output(out) if group.main else Path(out).expanduser()
    te = getattr(model, "text_encoder", None)
    if te is None:
        raise MagnetError("training needs the text encoder: load the model with text_encoder=<T5 folder>.")
    model.check_text_encoder(te)
    lm = model.lm
    device = next(lm.parameters()).device
    if device.type != "cuda" and next(lm.parameters()).dtype != torch.float32:
        raise MagnetError(f"training on {device.type} needs float32 weights: load the model with dtype='fp32'.")
    check_rank(lm, s.targets, s.rank)
    prev, state, start = _resume_from(resume, model, s, log) if resume is not None else (None, None, 0)
    rel = release_training(model)
    span_len = rel["span_len"]
    dropout = rel["dropout"] if s.cond_dropout is None else float(s.cond_dropout)
    frames = model.max_frames if s.crop_seconds is None else max(span_len + 1, int(s.crop_seconds * model.frame_rate))
    frames = min(frames, model.max_frames)
    table = span_starts_table(frames, span_len)
    K = lm.cfg.n_q

    data_dir = Path(data_dir).expanduser()
    if not group.main:                  # the first process encodes (and caches) the files, then the others read
        group.barrier()
    data = AudioFolder(data_dir, model, trigger=s.trigger, cache_dir=s.cache_dir, loudness=s.loudness)
    val = (AudioFolder(s.val_dir, model, trigger=s.trigger, what="validation folder", loudness=s.loudness)
           if s.val_dir else None)
    if group.main:
        group.barrier()
    for p, why in data.skipped:
        log(f"skipped {p} ({why})")
    fingerprint = dict(dataset_fingerprint(data.digests, data.captions), loudness=s.loudness)
    if state is not None:
        from .train_state import check_resume
        check_resume(state, {"release": state.info["release"], "rank": s.rank, "alpha": s.alpha,
                             "targets": list(s.targets), "dataset": fingerprint})
    captions = _Captions(model, data.captions + (val.captions if val else []))
    prompts = preview_prompts(s.preview_prompts, s.trigger, data) if s.previews else []
    preview_seconds = min(s.preview_seconds or PREVIEW_SECONDS, model.segment_duration)
    release = Path(str(getattr(model, "source", "") or "")).name
    settings_json = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(s).items()
                     if k not in ("cache_dir", "preview_dir", "val_dir")}

    with lowp.cpu_lock(device), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(derive_seed(s.seed, "torch"))
        init = torch.Generator().manual_seed(derive_seed(s.seed, "init"))
        train_lm, adapters = lora_mod.attach(lm, s.targets, s.rank, s.alpha, s.dropout, generator=init)
        if prev is not None:
            lora_mod.load_into(adapters, prev)
        train_lm.train()
        if s.checkpointing:
            for layer in train_lm.transformer.layers:
                _checkpointed(layer)
        names = {}
        for name, a in adapters.items():
            names[a.lora_A], names[a.lora_B] = f"{name}.lora_A", f"{name}.lora_B"
        params = list(names)
        opt = torch.optim.AdamW(params, lr=s.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=s.weight_decay)
        amp = _autocast_dtype(device)
        scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
        if state is not None:
            restore_optimizer(state, opt, names)
            restore_rng(state)
            if scaler is not None and state.info.get("scaler"):
                scaler.load_state_dict(state.info["scaler"])
        result = TrainResult(path=None, steps_done=start, clips=len(data))
        training = _portable(dataclasses.asdict(s), data_dir)
        training.update(cond_dropout=dropout, span_len=span_len, frames=frames)
        periodic: list[Path] = []

        def save(steps_done: int, final: bool):
            if not group.main:                 # the first process writes the files and renders the previews
                result.path = out if final else step_file(out, steps_done)
                return
            recent = result.losses[-10:]
            val_loss = None
            if val is not None:
                train_lm.eval()
                val_loss = validation_loss(train_lm, val, captions, frames, span_len, device, s.seed)
                train_lm.train()
                result.val_losses.append((steps_done, val_loss))
            meta = lora_mod.lora_meta(model, rank=s.rank, alpha=s.alpha, targets=s.targets, training=training,
                                      trigger=s.trigger, clips=len(data), steps=steps_done,
                                      train_loss=sum(recent) / len(recent) if recent else None, val_loss=val_loss)
            target = out if final else step_file(out, steps_done)
            result.path = lora_mod.save_lora(target, lora_mod.adapter_tensors(adapters), meta)
            info = {"settings": settings_json, "release": release, "dataset": fingerprint}
            result.state = save_state(state_path(target), step=steps_done, total=s.steps, info=info,
                                      optimizer=opt, param_names=names, scaler=scaler)
            for p in periodic:                 # only the newest state is kept (each LoRA file stays)
                p.unlink(missing_ok=True)
            periodic[:] = [] if final else [result.state]
            if prompts and not result.cancelled:
                folder = Path(s.preview_dir).expanduser() if s.preview_dir else None
                result.previews.append(render_previews(model, train_lm, prompts, preview_seconds, s.seed,
                                                       steps_done, folder))

        step = start
        while step < s.steps:
            stage = step_stage(s.seed, step, K)
            # every process draws every example of the step (cheap: crops and masks), so each knows the count of
            # masked positions over all of them; it computes its own share: micro-batch m, examples
            # (m * processes + rank) * batch + j
            batch = [example(data, s.seed, step, e, frames, table, span_len, dropout)
                     for e in range(s.batch * s.grad_accum * group.world)]
            count = max(1, sum(int((mask & valid).sum()) for _, valid, _, mask in batch))
            step_loss = 0.0
            stopped = False
            for m in range(s.grad_accum):
                if group.any(should_stop is not None and should_stop(), device):
                    stopped = True
                    break
                first = (m * group.world + group.rank) * s.batch
                part = batch[first:first + s.batch]
                codes = torch.stack([x[0] for x in part]).to(device)
                valid = torch.stack([x[1] for x in part]).to(device)
                smask = torch.stack([x[3] for x in part]).to(device)
                hidden, tmask = captions.batch([x[2] for x in part], device)
                torch.manual_seed(derive_seed(s.seed, "dropout", step, m, group.rank))    # LoRA dropout's draws
                with autocast_for(device, amp if amp is not None else torch.float32):
                    mem = text_memory(train_lm, hidden, tmask)
                    loss = masked_loss(train_lm, codes, mem, stage, smask, valid, reduction="sum") / count
                (scaler.scale(loss) if scaler is not None else loss).backward()
                step_loss += float(loss.detach())
            if stopped:
                opt.zero_grad(set_to_none=True)
                result.cancelled = True
                break
            if group.world > 1:                # the gradients (and loss) of every process summed, in one call
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([step_loss], device=device)])
                group.sum_(flat)
                at = 0
                for p, g in zip(params, grads):
                    p.grad = flat[at:at + g.numel()].view_as(g).to(g.dtype)
                    at += g.numel()
                step_loss = float(flat[-1])
            if not math.isfinite(step_loss):
                raise MagnetError(f"the training loss became {step_loss} at step {step + 1}: the training diverged. "
                                  f"Lower the learning rate (now {s.lr:g}).")
            for g in opt.param_groups:
                g["lr"] = s.lr * lr_factor(step, s.warmup, s.steps)
            if scaler is not None:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            result.losses.append(step_loss)
            result.steps_done = step
            if progress is not None:
                progress(step, s.steps, step_loss)
            if s.save_every and step % s.save_every == 0 and step < s.steps:
                save(step, final=False)
        if step > start and result.cancelled:
            save(step, final=False)
            log(f"stopped at step {step} of {s.steps}: saved {result.path}; resume it with this file to continue")
        elif not result.cancelled:
            save(step, final=True)
    group.barrier()                            # every process leaves once the files are written
    return result
