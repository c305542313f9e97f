"""MAGNeT's training objective, written from the reference solver's training step (audiocraft
`solvers/magnet.py`):

- one stage s per batch, uniform over the codebooks;
- per example t ~ U(0, 1) and a masking rate cos(pi/2 t); the number of span starts u is read from the
  mean-mask-rate table (`span_starts_table`: u such that 1 - C(T-L, u)/C(T, u) reaches the rate rounded to a
  whole percent), the starts placed uniformly and each extended to L = `span_len` frames (`spans_mask`);
- codebooks below s given, codebook s replaced by the mask token on the spans, codebooks above s all mask
  tokens; a forward with stage s (the band attention for s >= 1, as at inference);
- the cross entropy of codebook s on its masked positions only, padding excluded (`stage_loss`);
- the text dropped to the null condition for classifier-free guidance at the release's
  `classifier_free_guidance.training_dropout` (0.3 music, 0.1 sound effects; `release_training`).

`magnet.train` runs it on a folder of audio with a LoRA.
"""
from __future__ import annotations

import bisect
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import MagnetError


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
                valid: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of codebook `stage` on its masked (valid) positions, for an LM and a text memory
    (`text_memory`): their mean (the reference's loss), or with reduction='sum' their sum (training divides the
    sums of a step's micro-batches by the step's count, so the step's loss is the mean over all its examples).
    0-dim float32; exactly 0 (still part of the graph) when no position takes loss."""
    inputs, loss_at = stage_inputs(codes, stage, stage_mask, lm.mask_id, valid)
    logits = lm(inputs, mem, stage, heads=[stage])[:, 0]          # [B, T, card]
    target = codes[:, stage].masked_fill(~loss_at, -1)
    if not bool(loss_at.any()):
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-1,
                           reduction=reduction)


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
    """The training settings a release stores: `dropout` (classifier-free guidance training dropout, read from
    its xp.cfg or a converted file's metadata when it was loaded: `MagnetModel.training_defaults`) and
    `span_len`."""
    from .checkpoints import TRAINING_DROPOUT
    stored = getattr(model, "training_defaults", None) or {}
    dropout = stored.get("dropout", TRAINING_DROPOUT.get(getattr(model, "content", "music"), TRAINING_DROPOUT["music"]))
    return {"dropout": float(dropout), "span_len": int(model.cfg.span_len)}
