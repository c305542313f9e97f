"""Beyond one window: generations of any length, and regenerating a region of existing codes.

A MAGNeT release generates one fixed window (10 s or 30 s). Both operations here reuse the one
decoding loop, `sampling.generate`, on window-sized pieces:

- `generate_long` slides the window. The first window is generated as usual (optionally from a
  prompt); each next window starts `overlap` frames before the end of what exists and gets those
  frames as prompt tokens, so it continues them at the token level (no crossfade). The last window
  is placed so that it ends exactly at the requested length (it then has more context than
  `overlap`), so the result has exactly `frames` frames whatever the span arrangement.
- `regenerate_region` masks frames [start, end) in every codebook and decodes them again with the
  frames on both sides kept fixed (`given` + `keep`; the model is bidirectional). When the clip is
  longer than the window, the window is centred on the region and the rest of the clip is not seen.
  Every frame outside the region is copied back unchanged.

Everything here counts in frames; `MagnetModel.generate` / `MagnetModel.regenerate` take seconds.
One `torch.Generator` and one progress `StepCounter` serve all windows of a call, so a seed makes the whole
result reproducible and progress(done, total) counts to one total over all windows. An exception
raised from the progress callback propagates at once: it stops the job within one decoding step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import sampling
from .sampling import Progress, Rescorer, SamplingParams, SpanArrangement, StepCounter
from .stage_forward import DecodingSettings
from .text import TextCondition
from .transformer import LM


@dataclass(frozen=True)
class Window:
    """One window of a long generation, in absolute frames: codes [start, end) are decoded, of which
    the first `context` frames already exist (they are given as prompt and come back unchanged)."""
    start: int
    end: int
    context: int

    @property
    def frames(self) -> int:
        return self.end - self.start

    @property
    def new(self) -> int:
        """Frames this window adds."""
        return self.frames - self.context


def default_overlap(window: int) -> int:
    """The default overlap: half the window (5 s of context for the 10 s releases, 15 s for 30 s)."""
    return window // 2


def plan_windows(total: int, window: int, overlap: int, prompt: int = 0) -> list[Window]:
    """The windows that generate `total` frames, `window` frames each at most, consecutive windows
    sharing `overlap` frames; the first `prompt` frames are given.

    The first window starts at frame 0 and takes the whole prompt as context when it fits; each next
    one starts `overlap` frames before the end of the previous one; the last one is moved back so that
    it ends exactly at `total` (with more context). A total within one window is one window.
    """
    if window < 1 or not 0 <= overlap < window:
        raise ValueError(f"window {window} / overlap {overlap} frames: need 0 <= overlap < window")
    if not 0 <= prompt < total:
        raise ValueError(f"the prompt ({prompt} frames) must be shorter than the generation ({total} frames)")
    windows: list[Window] = []
    done = prompt
    while done < total:
        start = 0 if (not windows and done < window) else done - overlap
        start = max(0, min(start, total - window))
        end = min(start + window, total)
        windows.append(Window(start, end, done - start))
        done = end
    return windows


def generate_long(lm: LM, cond: TextCondition, frames: int, params: SamplingParams, *, window: int,
                  overlap: int | None = None, prompt: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, progress: Progress | None = None,
                  rescorer: Rescorer | None = None, job: StepCounter | None = None,
                  decoding: DecodingSettings | None = None) -> torch.Tensor:
    """Decode exactly `frames` frames [B, K, frames] of any length by sliding a window of at most
    `window` frames (the release's window; trimmed to `SpanArrangement.usable_window`) with `overlap`
    frames of context (default: half the window).

    prompt [B, K, P]: leading codes kept unchanged, of any length below `frames` (the first window takes
    all of it when it fits, else the generation continues from its last `overlap` frames).
    progress(done, total) counts over all windows (total = windows x steps per window).
    """
    cfg = lm.cfg
    params = params.check(cfg.n_q)
    W = SpanArrangement.of(params, cfg.span_len).usable_window(int(window))
    overlap = default_overlap(W) if overlap is None else int(overlap)
    P = prompt.shape[-1] if prompt is not None else 0
    plan = plan_windows(int(frames), W, overlap, P)
    if generator is None:
        generator, _ = sampling.make_generator(None, next(lm.parameters()).device)
    job = job or StepCounter(total=len(plan) * sum(params.decoding_steps), progress=progress)

    out = prompt if P else None
    for w in plan:
        context = out[..., w.start:w.start + w.context] if w.context else None
        codes = sampling.generate(lm, cond, w.frames, params, prompt=context,
                                  generator=generator, job=job, rescorer=rescorer, decoding=decoding)
        if codes.shape[-1] != w.frames:      # cannot happen within a usable window; guard the invariant
            raise RuntimeError(f"window {w} came back with {codes.shape[-1]} frames")
        new = codes[..., w.context:]
        out = new if out is None else torch.cat([out.to(new.device), new], dim=-1)
    return out


def region_window(total: int, start: int, end: int, window: int) -> tuple[int, int]:
    """The window [ws, we) (at most `window` frames, inside [0, total)) that holds frames [start, end)
    with as much context as fits, split evenly between the two sides where the clip allows."""
    size = min(window, total)
    ws = start - (size - (end - start)) // 2
    ws = max(0, min(ws, total - size))
    return ws, ws + size


def regenerate_region(lm: LM, cond: TextCondition, codes: torch.Tensor, start: int, end: int,
                      params: SamplingParams, *, window: int, generator: torch.Generator | None = None,
                      progress: Progress | None = None, rescorer: Rescorer | None = None,
                      job: StepCounter | None = None, decoding: DecodingSettings | None = None) -> torch.Tensor:
    """Codes [B, K, T] with frames [start, end) regenerated in every codebook, conditioned on the frames
    around them (within one window of at most `window` frames centred on the region). Every other code
    is returned unchanged. Runs one decoding (sum(decoding_steps) steps)."""
    cfg = lm.cfg
    params = params.check(cfg.n_q)
    T = codes.shape[-1]
    start, end = int(start), int(end)
    spans = SpanArrangement.of(params, cfg.span_len)
    W = spans.usable_window(min(int(window), T))
    if not (0 <= start < end <= T and end - start <= spans.room(W)):   # checked by the caller
        raise ValueError(f"region [{start}, {end}) does not fit a {W}-frame window of a {T}-frame clip")
    ws, we = region_window(T, start, end, W)
    given = codes[..., ws:we].to("cpu", torch.long)
    keep = torch.ones(we - ws, dtype=torch.bool)
    keep[start - ws:end - ws] = False
    if generator is None:
        generator, _ = sampling.make_generator(None, next(lm.parameters()).device)
    job = job or StepCounter(total=sum(params.decoding_steps), progress=progress)
    new = sampling.generate(lm, cond, we - ws, params, given=given, keep=keep, generator=generator,
                            job=job, rescorer=rescorer, decoding=decoding)
    out = codes.clone()
    out[..., start:end] = new[..., start - ws:end - ws].to(out.device)
    return out
