"""MAGNeT's training objective and LoRA fine-tuning on a folder of audio.

The objective is the one the release was trained with (the reference solver's training step), written
from its description:

- one stage s per batch, uniform over the codebooks;
- per example t ~ U(0, 1) and a masking rate cos(pi/2 t); the number of span starts u is read from the
  mean-mask-rate table (`span_starts_table`: u such that 1 - C(T-L, u)/C(T, u) reaches the rate rounded to a
  whole percent), the starts placed uniformly and each extended to L = `span_len` frames (`spans_mask`);
- codebooks below s given, codebook s replaced by the mask token on the spans, codebooks above s all mask
  tokens; a forward with stage s (the band attention for s >= 1, as at inference);
- the cross entropy of codebook s on its masked positions only, padding excluded (`stage_loss`);
- the text dropped to the null condition for classifier-free guidance at the release's
  `classifier_free_guidance.training_dropout` (0.3 music, 0.1 sound effects).

`train_lora` runs it on a folder (`magnet.dataset`) with a LoRA (`magnet.lora`) on the LM's linear layers;
the LM, T5 and EnCodec stay frozen.
"""
from __future__ import annotations

import bisect
import dataclasses
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from . import lowp
from .devices import autocast_for
from .errors import MagnetError

MUSIC_DROPOUT = 0.3          # classifier_free_guidance.training_dropout of the music releases
SOUND_DROPOUT = 0.1          # ... of audio-magnet (t5-large); used when a release does not store it


# -- the masking schedule ---------------------------------------------------------------------------

def span_starts_table(T: int, span_len: int) -> list[int]:
    """The 101-entry table: masking percentage m (0..100) -> number u of span starts of `span_len` frames,
    placed uniformly among T positions, whose expected masked share first reaches m / 100.

    The expected share of u starts is 1 - C(T - L, u) / C(T, u), computed as the running product
    prod_j (T - L - j) / (T - j) (no overflow), in float64, for u = 0 .. T - 1."""
    T, L = int(T), int(span_len)
    if T < 1 or L < 1:
        raise MagnetError(f"span_starts_table needs T >= 1 and span_len >= 1 (got T={T}, span_len={L}).")
    share = [0.0]
    rest = (T - L) / float(T)          # C(T-L, u) / C(T, u) for u = 1
    for u in range(1, T):
        share.append(1.0 - rest)
        rest *= (T - L - u) / (T - u)
    return [bisect.bisect_left(share, m / 100.0) for m in range(101)]


def spans_mask(rates: torch.Tensor, T: int, span_len: int, table: Sequence[int] | torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """bool [B, T]: for each masking rate in `rates` [B], u = table[round(100 rate)] (at least 1) span starts
    drawn uniformly without replacement, each extended forward to `span_len` frames (cut at the end)."""
    rates = torch.as_tensor(rates, dtype=torch.float32)
    table = torch.as_tensor(list(table), dtype=torch.long)
    B = rates.shape[0]
    u = table[torch.round(100 * rates).long()].clamp(min=1)
    order = torch.rand((B, T), generator=generator).argsort(dim=-1)   # a uniform random permutation per row
    starts = order < u.view(-1, 1)
    mask = starts.clone()
    for shift in range(1, span_len):
        mask[:, shift:] |= starts[:, :-shift]
    return mask


def masking_rates(batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """cos(pi/2 t) for t ~ U(0, 1), one per example (float32, as the reference draws them)."""
    t = torch.rand((batch,), generator=generator)
    return torch.cos(t * math.pi * 0.5)


# -- the loss ---------------------------------------------------------------------------------------

def stage_inputs(codes: torch.Tensor, stage: int, stage_mask: torch.Tensor, mask_id: int,
                 valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input codes [B, K, T], loss positions bool [B, T]) of one training example batch: codebooks < stage
    kept, codebook `stage` masked where `stage_mask`, codebooks > stage all masked; padding (where `valid`
    [B, T] is False) is a mask token in every codebook and takes no loss."""
    B, K, T = codes.shape
    masked = torch.zeros((B, K, T), dtype=torch.bool, device=codes.device)
    masked[:, stage] = stage_mask
    masked[:, stage + 1:] = True
    loss_at = stage_mask.clone()
    if valid is not None:
        masked |= ~valid.view(B, 1, T)
        loss_at &= valid
    return torch.where(masked, torch.full_like(codes, mask_id), codes), loss_at


def text_memory(lm, hidden: torch.Tensor, mask: torch.Tensor):
    """The LM's text memory (`LM.memory`) of T5 states [B, L, text_dim] and their mask [B, L], usable in a
    graph that needs gradients (states made under inference mode are copied out of it)."""
    if hidden.is_inference():
        hidden = hidden.clone()
    if mask.is_inference():
        mask = mask.clone()
    return lm.memory(hidden, mask)


def masked_loss(lm, codes: torch.Tensor, mem, stage: int, stage_mask: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
    """Cross entropy of codebook `stage` on its masked (valid) positions, for an LM and a text memory
    (`text_memory`). 0-dim float32; exactly 0 (still part of the graph) when no position takes loss."""
    inputs, loss_at = stage_inputs(codes, stage, stage_mask, lm.mask_id, valid)
    logits = lm(inputs, mem, stage, heads=[stage])[:, 0]          # [B, T, card]
    target = codes[:, stage].masked_fill(~loss_at, -1)
    if not bool(loss_at.any()):
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-1)


def stage_loss(model, codes: torch.Tensor, prompts: Sequence[str | None], stage: int,
               stage_mask: torch.Tensor) -> torch.Tensor:
    """MAGNeT's training loss for one stage, as the reference computes it (no condition dropout inside).

    model: a `MagnetModel` (its LM and T5). codes: long [B, K, T]. prompts: B strings, None (or "") = the
    null condition. stage: the codebook trained. stage_mask: bool [B, T], the spans of codebook `stage` to
    predict. Returns a 0-dim tensor, differentiable with respect to whatever in the LM requires grad."""
    lm = model.lm
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.dim() != 3:
        raise MagnetError("codes must be integer codes [batch, codebooks, frames] (from model.encode).")
    B, K, T = codes.shape
    if K != lm.cfg.n_q:
        raise MagnetError(f"codes have {K} codebooks; this model has {lm.cfg.n_q}.")
    if not 0 <= int(stage) < K:
        raise MagnetError(f"stage {stage} is not a codebook of this model (0..{K - 1}).")
    stage_mask = torch.as_tensor(stage_mask).to(torch.bool)
    if tuple(stage_mask.shape) != (B, T):
        raise MagnetError(f"stage_mask has shape {tuple(stage_mask.shape)}; expected [{B}, {T}] (batch, frames).")
    prompts = [prompts] if isinstance(prompts, str) or prompts is None else list(prompts)
    if len(prompts) != B:
        raise MagnetError(f"{len(prompts)} prompts for {B} rows of codes: give one per row (None = no text).")
    cond = model.encode_text(["" if p is None else p for p in prompts])
    device = next(lm.parameters()).device
    mem = text_memory(lm, cond.hidden[:B].to(device), cond.mask[:B].to(device))
    return masked_loss(lm, codes.long().to(device), mem, int(stage), stage_mask.to(device))


# -- what the release says about its training -----------------------------------------------------------

def release_training(model) -> dict:
    """The training settings a release stores in its xp.cfg: `dropout` (classifier-free guidance training
    dropout) and `span_len`. Read from the release folder's state_dict.bin (memory-mapped: no weight is read);
    for a converted file, which does not keep them, the defaults of its kind (0.3 music; 0.1 for
    t5-large releases, the sound-effect ones)."""
    span_len = int(model.cfg.span_len)
    default = SOUND_DROPOUT if "large" in str(model.cfg.text_encoder) else MUSIC_DROPOUT
    source = Path(str(getattr(model, "source", "") or ""))
    lm_file = source / "state_dict.bin" if source.is_dir() else None
    dropout = default
    if lm_file is not None and lm_file.is_file():
        try:
            import yaml
            pkg = torch.load(lm_file, map_location="cpu", weights_only=True, mmap=True)
            xp = yaml.safe_load(pkg["xp.cfg"]) if isinstance(pkg, dict) and "xp.cfg" in pkg else {}
            value = ((xp or {}).get("classifier_free_guidance") or {}).get("training_dropout")
            if value is not None and math.isfinite(float(value)) and 0.0 <= float(value) < 1.0:
                dropout = float(value)
        except Exception:       # an unreadable config: the kind's default (loading the model read it already)
            pass
    return {"dropout": dropout, "span_len": span_len}


# -- LoRA training ---------------------------------------------------------------------------------------

@dataclass
class TrainSettings:
    """How to train a LoRA. `alpha` None = the rank (scale 1); `cond_dropout` None = the release's own
    classifier-free-guidance training dropout; `crop_seconds` None = the release's window; `warmup` in optimizer
    steps; `save_every` 0 = only at the end; `val_dir` a folder of held-out clips (captions as for training)."""
    steps: int = 500
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

    def checked(self) -> "TrainSettings":
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
        if not (isinstance(s.alpha, (int, float)) and math.isfinite(s.alpha) and s.alpha > 0):
            raise MagnetError(f"LoRA alpha {s.alpha!r} must be a finite number > 0 (default: the rank).")
        if s.cond_dropout is not None and not (0 <= float(s.cond_dropout) < 1):
            raise MagnetError(f"condition dropout {s.cond_dropout!r} must be in [0, 1).")
        if s.crop_seconds is not None and not (math.isfinite(float(s.crop_seconds)) and s.crop_seconds > 0):
            raise MagnetError(f"crop_seconds {s.crop_seconds!r} must be a number of seconds > 0.")
        s.targets = lora_mod.check_targets(s.targets or lora_mod.DEFAULT_TARGETS)
        s.seed = int(s.seed)
        return s


@dataclass
class TrainResult:
    path: Path | None
    losses: list = field(default_factory=list)       # one per optimizer step (this run)
    val_losses: list = field(default_factory=list)   # (step, loss) at each save and at the end
    steps_done: int = 0                              # optimizer steps in the file, resumed ones included
    cancelled: bool = False
    clips: int = 0


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


def _example_batch(data, settings, frames, K, table, span_len, dropout, rng: random.Random, gen: torch.Generator):
    """One batch: (codes [B, K, T], valid [B, T], captions with None for dropped ones, stage, stage mask)."""
    idx = [rng.randrange(len(data)) for _ in range(settings.batch)]
    windows = [data.window(i, frames, gen) for i in idx]
    codes = torch.stack([w[0] for w in windows])
    valid = torch.stack([w[1] for w in windows])
    captions = [None if rng.random() < dropout else data.clips[i].caption for i in idx]
    stage = rng.randrange(K)
    mask = spans_mask(masking_rates(len(idx), gen), frames, span_len, table, gen)
    return codes, valid, captions, stage, mask


def validation_loss(train_lm, data, captions: _Captions, frames: int, span_len: int, device, seed: int = 0) -> float:
    """Mean stage loss over the held-out clips: every clip's first window, each stage, fixed masks at rate 0.5."""
    gen = torch.Generator().manual_seed(seed)
    table = span_starts_table(frames, span_len)
    total, n = 0.0, 0
    with torch.no_grad():
        for i, clip in enumerate(data.clips):
            codes, valid = data.window(i, frames, torch.Generator().manual_seed(seed))
            hidden, mask = captions.batch([clip.caption], device)
            mem = text_memory(train_lm, hidden, mask)
            for stage in range(codes.shape[0]):
                sm = spans_mask(torch.tensor([0.5]), frames, span_len, table, gen)
                loss = masked_loss(train_lm, codes[None].to(device), mem, stage, sm.to(device), valid[None].to(device))
                total += float(loss)
                n += 1
    return total / max(n, 1)


def train_lora(model, data_dir, out, settings: TrainSettings | None = None, *, progress=None, should_stop=None,
               resume=None, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train a LoRA on the audio in `data_dir` and write it to `out` (.safetensors).

    progress(step, total, loss) after each optimizer step; should_stop() polled before each micro-batch (a
    cancel stops within one step: the file then holds the adapters after the last complete step, written
    atomically; a half-written file never exists). resume: a LoRA file of this model to continue from (its
    `steps` count; the optimizer's moments start afresh). The model (LM, T5, codec) is not changed."""
    from . import lora as lora_mod
    from .dataset import AudioFolder
    s = (settings or TrainSettings()).checked()
    log = log or (lambda msg: None)
    out = Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise MagnetError(f"output {out} must end in .safetensors.")
    if getattr(model, "text_encoder", None) is None:
        raise MagnetError("training needs the text encoder: load the model with text_encoder=<T5 folder>.")
    lm = model.lm
    device = next(lm.parameters()).device
    if device.type != "cuda" and next(lm.parameters()).dtype != torch.float32:
        raise MagnetError(f"training on {device.type} needs float32 weights: load the model with dtype='fp32'.")
    rel = release_training(model)
    span_len = rel["span_len"]
    dropout = rel["dropout"] if s.cond_dropout is None else float(s.cond_dropout)
    frames = model.max_frames if s.crop_seconds is None else max(span_len + 1, int(s.crop_seconds * model.frame_rate))
    frames = min(frames, model.max_frames)
    table = span_starts_table(frames, span_len)
    K = lm.cfg.n_q

    data = AudioFolder(data_dir, model, trigger=s.trigger, cache_dir=s.cache_dir)
    val = AudioFolder(s.val_dir, model, trigger=s.trigger, what="validation folder") if s.val_dir else None
    for p, why in data.skipped:
        log(f"skipped {p} ({why})")
    captions = _Captions(model, data.captions + (val.captions if val else []))

    with lowp.cpu_lock(device), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(s.seed)
        init = torch.Generator().manual_seed(s.seed)
        train_lm, adapters = lora_mod.attach(lm, s.targets, s.rank, s.alpha, s.dropout, generator=init)
        start = 0
        if resume is not None:
            prev = lora_mod.as_lora(resume)
            lora_mod.check_lora_fits(prev, model)
            lora_mod.load_into(adapters, prev)
            start = int(prev.meta.get("steps") or 0)
        train_lm.train()
        if s.checkpointing:
            for layer in train_lm.transformer.layers:
                _checkpointed(layer)
        params = [p for a in adapters.values() for p in (a.lora_A, a.lora_B)]
        opt = torch.optim.AdamW(params, lr=s.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=s.weight_decay)
        total = max(s.steps, start)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i + start, s.warmup, total))
        amp = _autocast_dtype(device)
        scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
        result = TrainResult(path=None, steps_done=start, clips=len(data))
        training = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(s).items()}
        training.update(cond_dropout=dropout, span_len=span_len, frames=frames)

        def save(steps_done: int):
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
            result.path = lora_mod.save_lora(out, lora_mod.adapter_tensors(adapters), meta)

        step = start
        while step < s.steps:
            rng = random.Random(s.seed * 1_000_003 + step)
            gen = torch.Generator().manual_seed(s.seed * 1_000_003 + step)
            step_loss = 0.0
            stopped = False
            for _ in range(s.grad_accum):
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                codes, valid, caps, stage, smask = _example_batch(data, s, frames, K, table, span_len, dropout,
                                                                  rng, gen)
                hidden, tmask = captions.batch(caps, device)
                ctx = autocast_for(device, amp if amp is not None else torch.float32)
                with ctx:
                    mem = text_memory(train_lm, hidden, tmask)
                    loss = masked_loss(train_lm, codes.to(device), mem, stage, smask.to(device),
                                       valid.to(device))
                loss = loss / s.grad_accum
                (scaler.scale(loss) if scaler is not None else loss).backward()
                step_loss += float(loss.detach())
            if stopped:
                opt.zero_grad(set_to_none=True)
                result.cancelled = True
                break
            if not math.isfinite(step_loss):
                raise MagnetError(f"the training loss became {step_loss} at step {step + 1}: the training diverged. "
                                  f"Lower the learning rate (now {s.lr:g}).")
            if scaler is not None:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            result.losses.append(step_loss)
            result.steps_done = step
            if progress is not None:
                progress(step, s.steps, step_loss)
            if s.save_every and step % s.save_every == 0 and step < s.steps:
                save(step)
        if step > start or not result.cancelled:
            save(step)
    return result
