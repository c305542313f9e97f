"""Editing with MAGNeT: audio to audio, seamless loops and prompt timelines.

All three reuse the one decoding loop (`sampling.generate`) and the window machinery of `longform`;
each takes the model (`MagnetModel`) as its first argument.

- `vary(model, codes, prompts, strength=..., keep_codebooks=...)`: audio to audio. A fraction `strength`
  of the clip's spans (span_len frames each, spread over the whole clip: one chosen at random in each of
  equal stretches, from the seed) is masked and drawn again with the prompt; the rest is given to the
  model unchanged, so the new spans fit what is around them. strength 0 returns the input bit-identical,
  1 keeps only the length. `keep_codebooks=k` also keeps codebooks < k everywhere (k=1 keeps codebook 0,
  the coarse rhythm and melody, and redraws timbre and detail). Clips longer than the window are
  processed window by window, each continuing the edited audio before it.
- `generate_loop` / `loopify` / `decode_loop`: loops whose end flows into their start. The clip is
  rotated by half its length so that the wrap-around join lies inside it, the frames around the join are
  regenerated with the audio on both sides as context, and the clip is rotated back. `decode_loop`
  decodes circularly (the codes padded on both sides with their own other end, the middle kept) and
  returns exactly round(duration * sample_rate) samples; when that is not a whole number of frames the
  one period is resampled circularly (FFT), so the repetition stays seamless.
- `generate_timeline`: prompts that change at given times ("0:00 calm piano intro\\n0:30 drums come
  in"). The piece is made section by section: each section (from one prompt's time to the next) is
  generated with its prompt as a continuation of everything before it (sliding the window as
  `longform.generate_long` does), so every window is conditioned on the prompt in force over all of the
  new audio it writes, and a prompt change happens at its time (to within one span, 60 ms) as a musical
  continuation, not a crossfade. A timeline with one prompt is exactly `model.generate`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, replace
from typing import Sequence

import torch

from . import longform, sampling
from .devices import autocast_for
from .errors import MagnetError
from .sampling import SamplingParams
from .text import TextCondition

# progress over several decodings: one counter handed to each (named StepCounter in newer engines)
_Job = getattr(sampling, "StepCounter", None) or getattr(sampling, "_Job")

SAMPLING_KEYS = tuple(f.name for f in fields(SamplingParams) if f.init)    # what sampling keyword arguments may set


# -- shared helpers ---------------------------------------------------------------------------------

def _autocast(model):
    return autocast_for(model.device, model.dtype)


def _engine(model) -> dict:
    """Keyword arguments every engine call of `model` takes besides the sampling ones: its forward settings
    (`model.fastpath`) where the model has them."""
    fastpath = getattr(model, "fastpath", None)
    return {} if fastpath is None else {"fastpath": fastpath}


def _params(model, params: SamplingParams | None, fast, kw: dict) -> SamplingParams:
    unknown = set(kw) - set(SAMPLING_KEYS)
    if unknown:
        raise MagnetError(f"unknown sampling argument(s) {', '.join(sorted(unknown))}: use "
                          f"{', '.join(SAMPLING_KEYS)}.")
    if params is None:
        params = SamplingParams(**{"decoding_steps": "auto", **kw})
    elif kw:
        params = replace(params, **kw)
    if fast is not None:
        params = replace(params, fast=fast)
    return params.check(model.cfg.n_q, getattr(model, "generation_defaults", None))


def _check_codes(model, codes) -> torch.Tensor:
    """The model's own check of finished codes (integer [B, K, T] of its codec)."""
    return model._check_codes(codes)


def _cond_rows(model, cond: TextCondition, B: int) -> TextCondition:
    """The conditioning checked (this model's T5 width, plain prompts) with one row per row of codes."""
    if getattr(cond, "timeline", None):
        raise MagnetError("a prompt timeline conditions a whole generation (the Sampler, generate_timeline): "
                          "here give plain prompts (Text Encode).")
    return model.condition_rows(cond, B)


def _prompts(prompts, B: int | None = None) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if B is not None and len(prompts) == 1 and B > 1:
        prompts = prompts * B
    if B is not None and len(prompts) != B:
        raise MagnetError(f"{len(prompts)} text prompts for {B} rows of codes: give one prompt per row "
                          f"(or one for all).")
    return prompts


def _number(value, what: str) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise MagnetError(f"{what} {value!r} must be a number.") from None
    if not math.isfinite(v):
        raise MagnetError(f"{what} {value!r} must be a finite number.")
    return v


# -- audio to audio -----------------------------------------------------------------------------------

def redraw_mask(frames: int, span_len: int, strength: float, seed: int) -> torch.Tensor:
    """bool [frames]: the frames to redraw. The clip is cut into spans of `span_len` frames (the last may
    be shorter); round(strength * spans) of them are chosen, one at random in each of that many equal
    stretches of the clip, so they spread over the whole clip. Deterministic in `seed`."""
    L = max(int(span_len), 1)
    n_spans = -(-frames // L)
    n = int(round(strength * n_spans))
    mask = torch.zeros(frames, dtype=torch.bool)
    if n == 0:
        return mask
    g = torch.Generator().manual_seed(int(seed) % (2 ** 63))
    bounds = [round(i * n_spans / n) for i in range(n + 1)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        s = a + int(torch.randint(b - a, (1,), generator=g))
        mask[s * L:(s + 1) * L] = True
    return mask


class _TailLM:
    """The LM as the decoding loop sees it when codebooks < k are given whole: the loop decodes codebooks
    k..K-1 as its stages 0..K-k-1, and every forward gets the given codebooks put back in front."""

    def __init__(self, lm, head: torch.Tensor):
        self.lm, self.head, self.k = lm, head, head.shape[1]
        self.cfg = replace(lm.cfg, n_q=lm.cfg.n_q - self.k)

    @property
    def mask_id(self) -> int:
        return self.lm.mask_id

    def parameters(self):
        return self.lm.parameters()

    def memory(self, *args, **kwargs):
        return self.lm.memory(*args, **kwargs)

    def full(self, codes: torch.Tensor) -> torch.Tensor:
        head = self.head[..., :codes.shape[-1]].to(codes.device)
        if head.shape[0] != codes.shape[0]:
            head = head.repeat(codes.shape[0] // head.shape[0], 1, 1)
        return torch.cat([head, codes], dim=1)

    def __call__(self, codes, mem, stage: int = -1, heads=None, **kwargs):
        heads = None if heads is None else [h + self.k for h in heads]
        return self.lm(self.full(codes), mem, stage=stage + self.k if stage >= 0 else stage, heads=heads,
                       **kwargs)


class _TailRescorer:
    """A rescorer seen through `_TailLM`: it gets the whole codes and the real codebook index."""

    def __init__(self, rescorer, tail: _TailLM):
        self.rescorer, self.tail, self.weight = rescorer, tail, rescorer.weight

    def begin(self, cond, frames):
        self.rescorer.begin(cond, frames)

    def probs(self, codes, stage):
        return self.rescorer.probs(self.tail.full(codes), stage + self.tail.k)


def _decode_kept(lm, cond, given, keep, keep_codebooks, params, generator, job, rescorer, engine):
    """sampling.generate with `given`/`keep` (frames kept in every codebook), where in addition codebooks
    < keep_codebooks are kept at every frame."""
    frames = given.shape[-1]
    if keep_codebooks == 0:
        return sampling.generate(lm, cond, frames, params, given=given, keep=keep, generator=generator, job=job,
                                 rescorer=rescorer, **engine)
    k = keep_codebooks
    tail = _TailLM(lm, given[:, :k].to(next(lm.parameters()).device))
    tparams = replace(params, decoding_steps=tuple(params.decoding_steps[k:]))
    resc = None if rescorer is None or rescorer.weight == 0 else _TailRescorer(rescorer, tail)
    out = sampling.generate(tail, cond, frames, tparams, given=given[:, k:], keep=keep, generator=generator,
                            job=job, rescorer=resc, **engine)
    return tail.full(out)


def vary(model, codes: torch.Tensor, prompts: Sequence[str] | str, *, strength: float, keep_codebooks: int = 0,
         seed: int | None = None, params: SamplingParams | None = None, overlap: float | None = None,
         progress: sampling.Progress | None = None, rescorer: sampling.Rescorer | None = None,
         fast: bool | sampling.FastMode | None = None, **sampling_kwargs) -> torch.Tensor:
    """Audio to audio: codes [B, K, T] (from `model.encode` or `model.generate`) -> new codes [B, K, T] in
    which about `strength` of the spans are drawn again with `prompts` (one for all rows or one per row).

    strength: 0..1; 0 returns the codes bit-identical, 1 keeps only the length (and codebooks <
    keep_codebooks). keep_codebooks: 0..K-1 codebooks kept at every frame (1 = keep codebook 0: rhythm and
    melody; redraw timbre and detail). The spans are chosen from the seed: the same seed gives the same
    result. Sampling arguments (`decoding_steps`, `temperature`, ...) or `params`, `overlap` (seconds of
    context between windows, for clips longer than the window), `progress`, `rescorer` and `fast` are as
    in `model.generate`."""
    codes = _check_codes(model, codes)
    _strength(strength)
    _keep_codebooks(keep_codebooks, model.cfg.n_q)
    params = _params(model, params, fast, sampling_kwargs)
    cond = model.encode_text(_prompts(prompts, codes.shape[0]))
    return vary_from_condition(model, cond, codes, strength=strength, keep_codebooks=keep_codebooks, seed=seed,
                               params=params, overlap=overlap, progress=progress, rescorer=rescorer)


def _strength(strength) -> float:
    s = _number(strength, "strength")
    if not 0.0 <= s <= 1.0:
        raise MagnetError(f"strength {strength!r} must be between 0 (keep the audio) and 1 (keep only its "
                          f"length), e.g. 0.4.")
    return s


def _keep_codebooks(k, n_q: int) -> int:
    v = _number(k, "keep_codebooks")
    if v != int(v) or not 0 <= v < n_q:
        raise MagnetError(f"keep_codebooks {k!r} must be a whole number from 0 to {n_q - 1} (this model has "
                          f"{n_q} codebooks; keeping all {n_q} would change nothing): 0 redraws everything, 1 "
                          f"keeps codebook 0 (rhythm, melody).")
    return int(v)


def vary_from_condition(model, cond: TextCondition, codes: torch.Tensor, *, strength: float,
                        keep_codebooks: int = 0, params: SamplingParams, seed: int | None = None,
                        overlap: float | None = None, progress: sampling.Progress | None = None,
                        rescorer: sampling.Rescorer | None = None,
                        fast: bool | sampling.FastMode | None = None) -> torch.Tensor:
    """`vary` on an already encoded text (what the Audio to Audio node calls)."""
    codes = _check_codes(model, codes)
    strength = _strength(strength)
    k = _keep_codebooks(keep_codebooks, model.cfg.n_q)
    params = _params(model, params, fast, {})
    B, K, T = codes.shape
    cond = _cond_rows(model, cond, B)
    L = max(model.cfg.span_len, 1)
    generator, used = sampling.make_generator(seed, model.device)
    model.last_seed = used
    if T < 2 * L:
        raise MagnetError(f"the clip is {T} frames ({T / model.frame_rate:g} s) long: audio to audio needs at "
                          f"least {2 * L} frames ({2 * L / model.frame_rate:g} s).")
    redraw = redraw_mask(T, L, strength, used)
    if not bool(redraw.any()):
        return codes.clone()
    W = longform.usable_window(min(model.max_frames, T), L, params.span_arrangement)
    ov = model.overlap_frames(overlap, params.span_arrangement)
    ov = min(ov, W - L) if overlap is not None else longform.default_overlap(W)
    plan = longform.plan_windows(T, W, ov)
    work = []
    for w in plan:
        keep = ~redraw[w.start:w.end]
        keep[:w.context] = True
        if not bool(keep.all()):
            work.append((w, keep))
    job = _Job(total=len(work) * sum(params.decoding_steps[k:]), progress=progress)
    out = codes.clone()
    with _autocast(model):
        for w, keep in work:
            given = out[..., w.start:w.end].cpu()
            new = _decode_kept(model.lm, cond, given, keep, k, params, generator, job, rescorer, _engine(model))
            out[..., w.start + w.context:w.end] = new[..., w.context:].to(out.device)
    return out


# -- seamless loops -------------------------------------------------------------------------------------

def loop_seconds(duration=None, bars=None, bpm=None, beats_per_bar=4) -> float:
    """A loop's length in seconds: `duration`, or bars * beats_per_bar * 60 / bpm."""
    if duration is not None and (bars is not None or bpm is not None):
        raise MagnetError("give either a duration in seconds or bars and bpm, not both.")
    if duration is not None:
        d = _number(duration, "duration")
        if not d > 0:
            raise MagnetError(f"duration {duration!r} must be more than 0 seconds.")
        return d
    if bars is None or bpm is None:
        raise MagnetError("give the loop's length: a duration in seconds, or bars and bpm (e.g. bars=4, "
                          "bpm=120).")
    bars, bpm, beats = _number(bars, "bars"), _number(bpm, "bpm"), _number(beats_per_bar, "beats_per_bar")
    if not bpm > 0:
        raise MagnetError(f"bpm {bpm:g} must be more than 0 beats per minute, e.g. 120.")
    if not bars > 0:
        raise MagnetError(f"bars {bars:g} must be more than 0, e.g. 4.")
    if not beats > 0:
        raise MagnetError(f"beats_per_bar {beats:g} must be more than 0, e.g. 4.")
    return bars * beats * 60.0 / bpm


def min_loop_frames(model) -> int:
    """The shortest loop: the join region (at least 2 spans) needs as much context again around it."""
    return 4 * max(model.cfg.span_len, 1)


def loop_frames(model, seconds: float) -> int:
    """Frames of a loop of `seconds`: round(seconds * frame_rate), checked against the model's limits."""
    from .model import seconds_arg
    seconds = seconds_arg(seconds)
    F = int(round(seconds * model.frame_rate))
    least = min_loop_frames(model)
    if F < least:
        raise MagnetError(f"a loop of {seconds:g} s is shorter than the model's context: the join needs at "
                          f"least {least / model.frame_rate:g} s ({least} frames); make it longer (more bars or "
                          f"a lower bpm).")
    return F


def _join_region(model, F: int, join: int) -> tuple[int, int]:
    """Frames [a, b) to regenerate around the join (frame `join`, near the middle) of a rotated loop of F
    frames: about an eighth of the window on each side of it, at most a quarter of the loop."""
    L = max(model.cfg.span_len, 1)
    r = max(L, min(F // 4, model.max_frames // 8))
    return join - r, join + r


def _loopify(model, cond, codes, params, generator, job, rescorer):
    F = codes.shape[-1]
    shift = F // 2
    rotated = torch.roll(codes, -shift, dims=-1)        # rotated[F - shift] = codes[0]: the join is at F - shift
    a, b = _join_region(model, F, F - shift)
    rotated = longform.regenerate_region(model.lm, cond, rotated, a, b, params, window=model.max_frames,
                                         generator=generator, job=job, rescorer=rescorer, **_engine(model))
    return torch.roll(rotated, shift, dims=-1)


def loopify(model, codes: torch.Tensor, prompts: Sequence[str] | str, *, seed: int | None = None,
            params: SamplingParams | None = None, progress: sampling.Progress | None = None,
            rescorer: sampling.Rescorer | None = None, fast: bool | sampling.FastMode | None = None,
            **sampling_kwargs) -> torch.Tensor:
    """Make an existing clip loopable: codes [B, K, F] -> codes [B, K, F] whose wrap-around join (last frame
    -> first frame) was regenerated by the model with both sides as context; the frames far from the join
    are unchanged. Decode with `decode_loop`."""
    codes = _check_codes(model, codes)
    params = _params(model, params, fast, sampling_kwargs)
    cond = model.encode_text(_prompts(prompts, codes.shape[0]))
    return loopify_from_condition(model, cond, codes, params=params, seed=seed, progress=progress,
                                  rescorer=rescorer)


def loopify_from_condition(model, cond, codes, *, params: SamplingParams, seed=None, progress=None, rescorer=None,
                           fast=None) -> torch.Tensor:
    codes = _check_codes(model, codes)
    params = _params(model, params, fast, {})
    cond = _cond_rows(model, cond, codes.shape[0])
    F = codes.shape[-1]
    least = min_loop_frames(model)
    if F < least:
        raise MagnetError(f"the clip is {F} frames ({F / model.frame_rate:g} s): a loop needs at least {least} "
                          f"frames ({least / model.frame_rate:g} s) for the join and its context.")
    generator, model.last_seed = sampling.make_generator(seed, model.device)
    job = _Job(total=sum(params.decoding_steps), progress=progress)
    with _autocast(model):
        return _loopify(model, cond, codes, params, generator, job, rescorer)


def generate_loop(model, prompts: Sequence[str] | str, *, duration: float | None = None, bars: float | None = None,
                  bpm: float | None = None, beats_per_bar: float = 4, seed: int | None = None,
                  params: SamplingParams | None = None, progress: sampling.Progress | None = None,
                  rescorer: sampling.Rescorer | None = None, fast: bool | sampling.FastMode | None = None,
                  **sampling_kwargs) -> torch.Tensor:
    """A seamless loop: codes [B, K, round(seconds * frame_rate)] whose end flows into their start.

    Its length: `duration` seconds, or `bars` bars of `beats_per_bar` beats at `bpm`. The clip is generated
    (sliding the window beyond it), then its wrap-around join is regenerated with both sides as context
    (see `loopify`). Decode with `decode_loop(model, codes, duration=...)` for exactly
    round(seconds * sample_rate) samples that repeat without a click."""
    seconds = loop_seconds(duration, bars, bpm, beats_per_bar)
    F = loop_frames(model, seconds)
    params = _params(model, params, fast, sampling_kwargs)
    cond = model.encode_text(_prompts(prompts))
    return generate_loop_from_condition(model, cond, frames=F, params=params, seed=seed, progress=progress,
                                        rescorer=rescorer)


def generate_loop_from_condition(model, cond: TextCondition, *, frames: int, params: SamplingParams,
                                 seed: int | None = None, progress=None, rescorer=None, fast=None) -> torch.Tensor:
    """`generate_loop` on an already encoded text, for a loop of exactly `frames` frames."""
    params = _params(model, params, fast, {})
    model.check_condition(cond)
    F = int(frames)
    if F < min_loop_frames(model):
        raise MagnetError(f"a loop of {F} frames is shorter than the model's context: make it at least "
                          f"{min_loop_frames(model) / model.frame_rate:g} s.")
    generator, model.last_seed = sampling.make_generator(seed, model.device)
    W = longform.usable_window(min(model.max_frames, F), model.cfg.span_len, params.span_arrangement)
    plan = longform.plan_windows(F, W, longform.default_overlap(W))
    job = _Job(total=(len(plan) + 1) * sum(params.decoding_steps), progress=progress)
    with _autocast(model):
        codes = longform.generate_long(model.lm, cond, F, params, window=W, generator=generator, job=job,
                                       rescorer=rescorer, **_engine(model))
        return _loopify(model, cond, codes, params, generator, job, rescorer)


def decode_loop(model, codes: torch.Tensor, *, duration: float | None = None, repeats: int = 1) -> torch.Tensor:
    """Codes of a loop [B, K, F] -> waveform [B, C, repeats * round(duration * sample_rate)] on the CPU that
    repeats without a click. `model`: a MagnetModel or its codec. duration: the loop's seconds (default
    F / frame_rate; it must round to F frames).

    The codec decodes circularly: the codes padded on each side with (up to 5 s of) their own other end,
    decoded together, the middle F frames kept. When round(duration * sample_rate) is not F hops, that one
    period is resampled circularly (FFT) to the exact length; the pitch moves by less than one frame in F."""
    codec = getattr(model, "codec", model)
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.dim() not in (2, 3):
        raise MagnetError("codes must be integer codes [batch, codebooks, frames] (from model.generate "
                          "or model.encode).")
    codes = codes[None] if codes.dim() == 2 else codes
    if codes.shape[1] != codec.n_q or codes.shape[-1] == 0 or int(codes.min()) < 0 or \
            int(codes.max()) >= codec.card:
        raise MagnetError(f"codes of shape {tuple(codes.shape)} with values in [{int(codes.min())}, "
                          f"{int(codes.max())}] are not codes of this codec ({codec.n_q} codebooks of "
                          f"{codec.card} entries): decode the loop with the codec that made it.")
    F = codes.shape[-1]
    fr, sr = float(codec.frame_rate), int(codec.sample_rate)
    seconds = F / fr if duration is None else _number(duration, "duration")
    if duration is not None and int(round(seconds * fr)) != F:
        raise MagnetError(f"duration {seconds:g} s does not match the loop's {F} frames ({F / fr:g} s): give the "
                          f"duration the loop was generated with (or none).")
    reps = _number(repeats, "repeats")
    if reps != int(reps) or reps < 1:
        raise MagnetError(f"repeats {repeats!r} must be a whole number >= 1.")
    P = min(F, int(round(5 * fr)))
    padded = torch.cat([codes[..., F - P:], codes, codes[..., :P]], dim=-1).long()
    decode = model.decode if hasattr(model, "codec") else codec.decode
    wav = decode(padded).float().cpu()
    hop = wav.shape[-1] // padded.shape[-1]
    period = wav[..., P * hop:(P + F) * hop]
    S = int(round(seconds * sr))
    if S != period.shape[-1]:
        spec = torch.fft.rfft(period.double(), dim=-1)
        n = S // 2 + 1
        if spec.shape[-1] >= n:
            spec = spec[..., :n]
        else:
            spec = torch.cat([spec, spec.new_zeros(*spec.shape[:-1], n - spec.shape[-1])], dim=-1)
        period = (torch.fft.irfft(spec, n=S, dim=-1) * (S / period.shape[-1])).float()
    return period.repeat(1, 1, int(reps)) if reps > 1 else period.contiguous()


# -- prompt timeline ---------------------------------------------------------------------------------------

_TIME = re.compile(r"^\s*(\d+(?::\d+){0,2}(?:\.\d*)?)(?:\s*[-\u2013:|]\s*|\s+|$)(.*)$")


def _seconds_of(stamp: str, line: str) -> float:
    parts = stamp.split(":")
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        raise MagnetError(f"timeline line {line!r}: {stamp!r} is not a time; write m:ss, h:mm:ss or seconds.") \
            from None
    if any(n >= 60 for n in nums[1:]):
        raise MagnetError(f"timeline line {line!r}: minutes and seconds after a ':' must be below 60 "
                          f"(write 1:10, not 0:70).")
    total = 0.0
    for n in nums:
        total = total * 60 + n
    return total


def parse_timeline(timeline) -> list[tuple[float, str]]:
    """[(seconds, prompt)] from text ('0:00 calm piano intro', one per line; m:ss, h:mm:ss or plain seconds
    such as '12.5 text'; blank lines and lines starting with # are skipped) or from a list of pairs.
    Checked: at least one entry, the first at 0, times strictly increasing, every prompt non-empty."""
    entries = []
    if isinstance(timeline, str):
        for raw in timeline.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            m = _TIME.match(line)
            if not m:
                raise MagnetError(f"timeline line {line!r} does not start with a time: write one prompt per "
                                  f"line as '0:30 drums come in' (m:ss, h:mm:ss or seconds).")
            entries.append((_seconds_of(m.group(1), line), m.group(2).strip()))
    else:
        try:
            for t, p in timeline:
                entries.append((_number(t, "timeline time"), p))
        except (TypeError, ValueError):
            raise MagnetError("timeline must be text ('0:00 prompt' lines) or a list of (seconds, prompt) "
                              "pairs.") from None
    if not entries:
        raise MagnetError("the timeline is empty: write one prompt per line, e.g. '0:00 calm piano intro'.")
    for i, (t, p) in enumerate(entries):
        if not isinstance(p, str) or not p.strip():
            raise MagnetError(f"timeline entry {i + 1} (at {t:g} s) has no prompt: write the text after the "
                              f"time, e.g. '0:30 drums come in'.")
        if t < 0:
            raise MagnetError(f"timeline time {t:g} s is negative: times start at 0:00.")
        if i and t <= entries[i - 1][0]:
            raise MagnetError(f"timeline times must increase: {t:g} s comes after {entries[i - 1][0]:g} s. Sort "
                              f"the lines by time, one prompt per time.")
    if entries[0][0] != 0:
        raise MagnetError(f"the timeline starts at {entries[0][0]:g} s: the first prompt must be at 0:00 "
                          f"(what plays from the start).")
    return [(float(t), p.strip()) for t, p in entries]


@dataclass
class TimelineCondition(TextCondition):
    """A prompt timeline, encoded: as a TextCondition it is its first prompt (for anything that takes one
    prompt); `timeline` holds (seconds, TextCondition of that prompt alone) for every entry.
    `MagnetModel.generate_from_condition` hands it to `generate_timeline_from_condition`."""
    timeline: list = field(default_factory=list)


def encode_timeline(model_or_encoder, timeline) -> TimelineCondition:
    """Parse and encode a timeline: each prompt encoded alone, exactly as `model.generate([prompt])` would."""
    entries = parse_timeline(timeline)
    encode = getattr(model_or_encoder, "encode_text", None) or model_or_encoder.encode
    cache: dict = {}
    parts = []
    for t, p in entries:
        if p not in cache:
            cache[p] = encode([p])
        parts.append((t, cache[p]))
    first = parts[0][1]
    return TimelineCondition(first.prompts, first.hidden, first.mask, first.input_ids, first.encoder,
                             timeline=parts)


def generate_timeline(model, timeline, *, duration: float, seed: int | None = None, overlap: float | None = None,
                      params: SamplingParams | None = None, prompt: torch.Tensor | None = None,
                      progress: sampling.Progress | None = None, rescorer: sampling.Rescorer | None = None,
                      fast: bool | sampling.FastMode | None = None, **sampling_kwargs) -> torch.Tensor:
    """Codes [1, K, T] of `duration` seconds whose prompt changes along `timeline` ([(seconds, prompt)] or
    '0:00 prompt' lines). Lengths as `model.generate` (exactly int(duration * frame_rate) beyond the
    window). Each section continues the audio before it with its own prompt (see the module docstring);
    one prompt gives exactly `model.generate([prompt], duration=duration, seed=seed)`."""
    params = _params(model, params, fast, sampling_kwargs)
    frames = model.frames_for(duration)
    model.overlap_frames(overlap, params.span_arrangement)
    entries = parse_timeline(timeline)
    _check_times(entries, frames / model.frame_rate)
    cond = encode_timeline(model, entries)
    return generate_timeline_from_condition(model, cond, frames=frames, params=params, seed=seed, overlap=overlap,
                                            prompt=prompt, progress=progress, rescorer=rescorer)


def _check_times(entries, seconds: float) -> None:
    for t, p in entries:
        if t >= seconds:
            raise MagnetError(f"timeline time {t:g} s ({p!r}) is at or beyond the end of the {seconds:g} s "
                              f"piece: make the duration longer or remove that line.")


def timeline_sections(model, cond: TimelineCondition, frames: int, params: SamplingParams, prompt_frames: int = 0):
    """[(first frame, end frame, TextCondition)]: each prompt's section of a `frames`-frame piece."""
    fr = model.frame_rate
    times = [int(round(t * fr)) for t, _ in cond.timeline]
    out = []
    for i, (start, (_, c)) in enumerate(zip(times, cond.timeline)):
        end = times[i + 1] if i + 1 < len(times) else frames
        start = max(start, prompt_frames)
        if end > start:
            out.append((start, end, c))
    return out


def generate_timeline_from_condition(model, cond: TimelineCondition, *, frames: int, params: SamplingParams,
                                     seed: int | None = None, overlap: float | None = None,
                                     prompt: torch.Tensor | None = None, progress: sampling.Progress | None = None,
                                     rescorer: sampling.Rescorer | None = None,
                                     fast: bool | sampling.FastMode | None = None) -> torch.Tensor:
    """The timeline generation on an encoded `TimelineCondition` (what the Sampler runs for the Prompt
    Timeline node's conditioning). `prompt`: codes kept at the start (the sections continue them)."""
    if not getattr(cond, "timeline", None):
        raise MagnetError("the conditioning has no timeline: encode it with the Prompt Timeline node or "
                          "magnet.edit.encode_timeline.")
    params = _params(model, params, fast, {})
    frames = int(frames)
    _check_times([(t, c.prompts[0] if c.prompts else "") for t, c in cond.timeline], frames / model.frame_rate)
    L = max(model.cfg.span_len, 1)
    ov = model.overlap_frames(overlap, params.span_arrangement)
    W = longform.usable_window(model.max_frames, L, params.span_arrangement)
    for _, c in cond.timeline:
        model.check_condition(c)
    out = model.check_prompt_codes(prompt, 1, frames)
    P = 0 if out is None else out.shape[-1]
    sections = timeline_sections(model, cond, frames, params, P)
    # what each section will run: (end, cond, plan or None for one window)
    runs = []
    done = P
    for i, (start, end, c) in enumerate(sections):
        last = i == len(sections) - 1
        if end <= model.max_frames:                     # within one window: one decoding, trimmed to whole spans
            if params.span_arrangement == "nonoverlap" and not last:
                end -= end % L
            if end - done < (L if params.span_arrangement == "nonoverlap" else 1):
                continue
            runs.append((end, c, None))
            done = end - (end % L if params.span_arrangement == "nonoverlap" else 0)
        else:
            runs.append((end, c, longform.plan_windows(end, W, ov, done)))
            done = end
    job = _Job(total=sum(1 if plan is None else len(plan) for _, _, plan in runs) * sum(params.decoding_steps),
               progress=progress)
    generator, model.last_seed = sampling.make_generator(seed, model.device)
    dev, engine = model.device, _engine(model)
    with _autocast(model):
        for end, c, plan in runs:
            c = c if c.batch == 1 else _cond_rows(model, c, 1)
            if plan is None:
                out = sampling.generate(model.lm, c, end, params, prompt=out, generator=generator, job=job,
                                        rescorer=rescorer, **engine)
            else:
                out = longform.generate_long(model.lm, c, end, params, window=W, overlap=ov, prompt=out,
                                             generator=generator, job=job, rescorer=rescorer, **engine)
    return out.to(dev) if out is not None else out
