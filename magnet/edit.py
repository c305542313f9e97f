"""Editing with MAGNeT: audio to audio, seamless loops and prompt timelines.

All three reuse the one decoding loop (`sampling.generate`) and the window machinery of `longform`;
each takes the model (`MagnetModel`) as its first argument, and is also the model's method of the same
name (`model.vary(...)` delegates here; this module uses the model only through the object it is handed, so
`magnet.model` imports it and not the reverse). Like `MagnetModel.generate`, each public function checks its inputs
once and returns the codes (`return_seed=True`: `model.Generated`, the codes and the seed); each
`*_from_condition` form, for an encoded text, returns `Generated`.

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
  continuation, not a crossfade. A timeline with one prompt is exactly `model.generate`. Its cost is
  bounded like a plain generation's (`timeline_plan`: MIN_SECTION, MAX_COST).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Sequence

import torch

from . import longform, sampling
from .errors import MagnetError
from .arguments import MAX_SECONDS, Generated, check_fits, codes_arg, finite_arg, seconds_arg
from .sampling import SamplingParams, SpanArrangement, StepCounter
from .text import TextCondition


# -- shared helpers ---------------------------------------------------------------------------------

def _engine(model) -> dict:
    """Keyword arguments every engine call of `model` takes besides the sampling ones: its forward settings
    (`model.decoding`) where the model has them."""
    decoding = getattr(model, "decoding", None)
    return {} if decoding is None else {"decoding": decoding}


def _sampling(model, params: SamplingParams | None, fast=None, kw: dict | None = None) -> SamplingParams:
    """`model.sampling_params(params, **kw)`, where fast=None leaves `params.fast` as it is."""
    return model.sampling_params(params, **(kw or {}), **({} if fast is None else {"fast": fast}))


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
    def first_codebook(self) -> int:
        """The LM's index of the loop's stage 0 (the decoding loop names it in its messages)."""
        return self.k

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
    < keep_codebooks are kept at every frame (`params`: the sampling of codebooks
    keep_codebooks.., as `_vary_job` makes it)."""
    frames = given.shape[-1]
    if keep_codebooks == 0:
        return sampling.generate(lm, cond, frames, params, given=given, keep=keep, generator=generator, job=job,
                                 rescorer=rescorer, **engine)
    k = keep_codebooks
    tail = _TailLM(lm, given[:, :k].to(next(lm.parameters()).device))
    resc = None if rescorer is None or rescorer.weight == 0 else _TailRescorer(rescorer, tail)
    out = sampling.generate(tail, cond, frames, params, given=given[:, k:], keep=keep, generator=generator,
                            job=job, rescorer=resc, **engine)
    return tail.full(out)


class _Vary(NamedTuple):
    """A checked audio to audio job: the codes, what to keep, the sampling of the codebooks it decodes
    (keep_codebooks.. : their decoding steps only), and its windows."""
    codes: torch.Tensor
    strength: float
    keep_codebooks: int
    params: SamplingParams
    window: int
    overlap: int


def vary(model, codes: torch.Tensor, prompts: Sequence[str] | str, *, strength: float, keep_codebooks: int = 0,
         seed: int | None = None, params: SamplingParams | None = None, overlap: float | None = None,
         progress: sampling.Progress | None = None, rescorer: sampling.Rescorer | None = None,
         fast: bool | sampling.FastMode | None = None, return_seed: bool = False,
         **sampling_kwargs) -> torch.Tensor | Generated:
    """Audio to audio: codes [B, K, T] (from `model.encode` or `model.generate`) -> new codes [B, K, T] in
    which about `strength` of the spans are drawn again with `prompts` (one for all rows or one per row).

    strength: 0..1; 0 returns the codes bit-identical, 1 keeps only the length (and codebooks <
    keep_codebooks). keep_codebooks: 0..K-1 codebooks kept at every frame (1 = keep codebook 0: rhythm and
    melody; redraw timbre and detail). The spans are chosen from the seed: the same seed gives the same
    result. Sampling arguments (`decoding_steps`, `temperature`, ...) or `params`, `overlap` (seconds of
    context between windows, for clips longer than the window), `progress`, `rescorer`, `fast` and
    `return_seed` are as in `model.generate`."""
    job = _vary_job(model, codes, strength, keep_codebooks, _sampling(model, params, fast, sampling_kwargs), overlap)
    cond = model.encode_text(model.prompt_list(prompts, job.codes.shape[0]))
    return model.returned(_vary(model, cond, job, seed, progress, rescorer), return_seed)


def vary_from_condition(model, cond: TextCondition, codes: torch.Tensor, *, strength: float,
                        keep_codebooks: int = 0, params: SamplingParams | None = None, seed: int | None = None,
                        overlap: float | None = None, progress: sampling.Progress | None = None,
                        rescorer: sampling.Rescorer | None = None,
                        fast: bool | sampling.FastMode | None = None) -> Generated:
    """`vary` on an already encoded text (what the Audio to Audio node calls)."""
    job = _vary_job(model, codes, strength, keep_codebooks, _sampling(model, params, fast), overlap)
    return _vary(model, model.condition_rows(cond, job.codes.shape[0]), job, seed, progress, rescorer)


def _strength(strength) -> float:
    s = finite_arg(strength, "strength")
    if not 0.0 <= s <= 1.0:
        raise MagnetError(f"strength {strength!r} must be between 0 (keep the audio) and 1 (keep only its "
                          f"length), e.g. 0.4.")
    return s


def _keep_codebooks(k, n_q: int) -> int:
    v = finite_arg(k, "keep_codebooks")
    if v != int(v) or not 0 <= v < n_q:
        raise MagnetError(f"keep_codebooks {k!r} must be a whole number from 0 to {n_q - 1} (this model has "
                          f"{n_q} codebooks; keeping all {n_q} would change nothing): 0 redraws everything, 1 "
                          f"keeps codebook 0 (rhythm, melody).")
    return int(v)


def _vary_job(model, codes, strength, keep_codebooks, params: SamplingParams, overlap) -> _Vary:
    """The checks of audio to audio (`params` checked), once, before the text encoder runs."""
    codes = model.check_codes(codes)
    strength = _strength(strength)
    k = _keep_codebooks(keep_codebooks, model.cfg.n_q)
    T, L = codes.shape[-1], max(model.cfg.span_len, 1)
    if T < 2 * L:
        raise MagnetError(f"the clip is {T} frames ({T / model.frame_rate:g} s) long: audio to audio needs at "
                          f"least {2 * L} frames ({2 * L / model.frame_rate:g} s).")
    W = SpanArrangement.of(params, model.cfg.span_len).usable_window(min(model.max_frames, T))
    ov = longform.default_overlap(W) if overlap is None else \
        min(model.overlap_frames(overlap, params.span_arrangement), W - L)
    if k:               # the decoding loop decodes codebooks k.. only: their steps, checked once here
        params = replace(params, decoding_steps=tuple(params.decoding_steps[k:])).check(model.cfg.n_q - k)
    return _Vary(codes, strength, k, params, W, ov)


def _vary(model, cond: TextCondition, job: _Vary, seed, progress, rescorer) -> Generated:
    codes, k, params = job.codes, job.keep_codebooks, job.params
    T = codes.shape[-1]

    def decode(generator, used: int) -> torch.Tensor:
        redraw = redraw_mask(T, model.cfg.span_len, job.strength, used)
        if not bool(redraw.any()):
            return codes.clone()
        work = []
        for w in longform.plan_windows(T, job.window, job.overlap):
            keep = ~redraw[w.start:w.end]
            keep[:w.context] = True
            if not bool(keep.all()):
                work.append((w, keep))
        counter = StepCounter(total=len(work) * sum(params.decoding_steps), progress=progress)
        out = codes.clone()
        for w, keep in work:
            given = out[..., w.start:w.end].cpu()
            new = _decode_kept(model.lm, cond, given, keep, k, params, generator, counter, rescorer, _engine(model))
            out[..., w.start + w.context:w.end] = new[..., w.context:].to(out.device)
        return out
    return model.seeded(seed, decode)


# -- seamless loops -------------------------------------------------------------------------------------

def loop_seconds(duration=None, bars=None, bpm=None, beats_per_bar=4) -> float:
    """A loop's length in seconds: `duration`, or bars * beats_per_bar * 60 / bpm."""
    if duration is not None and (bars is not None or bpm is not None):
        raise MagnetError("give either a duration in seconds or bars and bpm, not both.")
    if duration is not None:
        d = finite_arg(duration, "duration")
        if not d > 0:
            raise MagnetError(f"duration {duration!r} must be more than 0 seconds.")
        return d
    if bars is None or bpm is None:
        raise MagnetError("give the loop's length: a duration in seconds, or bars and bpm (e.g. bars=4, "
                          "bpm=120).")
    bars, bpm, beats = finite_arg(bars, "bars"), finite_arg(bpm, "bpm"), finite_arg(beats_per_bar, "beats_per_bar")
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
            return_seed: bool = False, **sampling_kwargs) -> torch.Tensor | Generated:
    """Make an existing clip loopable: codes [B, K, F] -> codes [B, K, F] whose wrap-around join (last frame
    -> first frame) was regenerated by the model with both sides as context; the frames far from the join
    are unchanged. Decode with `decode_loop`. The other arguments are as in `model.generate`."""
    codes = _loop_codes(model, codes)
    params = _sampling(model, params, fast, sampling_kwargs)
    cond = model.encode_text(model.prompt_list(prompts, codes.shape[0]))
    return model.returned(_loopify_seeded(model, cond, codes, params, seed, progress, rescorer), return_seed)


def loopify_from_condition(model, cond: TextCondition, codes: torch.Tensor, *, params: SamplingParams | None = None,
                           seed: int | None = None, progress: sampling.Progress | None = None,
                           rescorer: sampling.Rescorer | None = None,
                           fast: bool | sampling.FastMode | None = None) -> Generated:
    """`loopify` on an already encoded text (what the Seamless Loop node calls for given tokens)."""
    codes = _loop_codes(model, codes)
    params = _sampling(model, params, fast)
    cond = model.condition_rows(cond, codes.shape[0])
    return _loopify_seeded(model, cond, codes, params, seed, progress, rescorer)


def _loop_codes(model, codes) -> torch.Tensor:
    """Codes to make loop: the model's check, and long enough for the join and its context."""
    codes = model.check_codes(codes)
    F, least = codes.shape[-1], min_loop_frames(model)
    if F < least:
        raise MagnetError(f"the clip is {F} frames ({F / model.frame_rate:g} s): a loop needs at least {least} "
                          f"frames ({least / model.frame_rate:g} s) for the join and its context.")
    return codes


def _loopify_seeded(model, cond, codes, params, seed, progress, rescorer) -> Generated:
    return model.seeded(seed, lambda generator, _seed: _loopify(
        model, cond, codes, params, generator, StepCounter(total=sum(params.decoding_steps), progress=progress),
        rescorer))


def generate_loop(model, prompts: Sequence[str] | str, *, duration: float | None = None, bars: float | None = None,
                  bpm: float | None = None, beats_per_bar: float = 4, seed: int | None = None,
                  params: SamplingParams | None = None, progress: sampling.Progress | None = None,
                  rescorer: sampling.Rescorer | None = None, fast: bool | sampling.FastMode | None = None,
                  return_seed: bool = False, **sampling_kwargs) -> torch.Tensor | Generated:
    """A seamless loop: codes [B, K, round(seconds * frame_rate)] whose end flows into their start.

    Its length: `duration` seconds, or `bars` bars of `beats_per_bar` beats at `bpm`. The clip is generated
    (sliding the window beyond it), then its wrap-around join is regenerated with both sides as context
    (see `loopify`). Decode with `decode_loop(model, codes, duration=...)` for exactly
    round(seconds * sample_rate) samples that repeat without a click. The other arguments are as in
    `model.generate`."""
    F = loop_frames(model, loop_seconds(duration, bars, bpm, beats_per_bar))
    params = _sampling(model, params, fast, sampling_kwargs)
    cond = model.encode_text(model.prompt_list(prompts))
    return model.returned(_generate_loop(model, cond, F, params, seed, progress, rescorer), return_seed)


def generate_loop_from_condition(model, cond: TextCondition, *, frames: int, params: SamplingParams | None = None,
                                 seed: int | None = None, progress: sampling.Progress | None = None,
                                 rescorer: sampling.Rescorer | None = None,
                                 fast: bool | sampling.FastMode | None = None) -> Generated:
    """`generate_loop` on an already encoded text, for a loop of exactly `frames` frames."""
    params = _sampling(model, params, fast)
    cond = model.condition_rows(cond, getattr(cond, "batch", 1))
    F = model.check_frames(frames)
    if F < min_loop_frames(model):
        raise MagnetError(f"a loop of {F} frames is shorter than the model's context: make it at least "
                          f"{min_loop_frames(model) / model.frame_rate:g} s.")
    return _generate_loop(model, cond, F, params, seed, progress, rescorer)


def _generate_loop(model, cond, F: int, params, seed, progress, rescorer) -> Generated:
    W = SpanArrangement.of(params, model.cfg.span_len).usable_window(min(model.max_frames, F))
    plan = longform.plan_windows(F, W, longform.default_overlap(W))
    counter = StepCounter(total=(len(plan) + 1) * sum(params.decoding_steps), progress=progress)

    def decode(generator, _seed):
        codes = longform.generate_long(model.lm, cond, F, params, window=W, generator=generator, job=counter,
                                       rescorer=rescorer, **_engine(model))
        return _loopify(model, cond, codes, params, generator, counter, rescorer)
    return model.seeded(seed, decode)


def decode_loop(model, codes: torch.Tensor, *, duration: float | None = None, repeats: int = 1) -> torch.Tensor:
    """Codes of a loop [B, K, F] -> waveform [B, C, repeats * round(duration * sample_rate)] on the CPU that
    repeats without a click. `model`: a MagnetModel or its codec. duration: the loop's seconds (default
    F / frame_rate; it must round to F frames). The waveform's size is estimated before it is made: one
    that cannot fit in memory, or of more than MAX_SECONDS, is refused.

    The codec decodes circularly: the codes padded on each side with (up to 5 s of) their own other end,
    decoded together, the middle F frames kept. When round(duration * sample_rate) is not F hops, that one
    period is resampled circularly (FFT) to the exact length; the pitch moves by less than one frame in F."""
    codec = getattr(model, "codec", model)
    codes = codes_arg(codes, codec.n_q, codec.card, "decode the loop with the codec that made it")
    B, F = codes.shape[0], codes.shape[-1]
    fr, sr = float(codec.frame_rate), int(codec.sample_rate)
    seconds = F / fr if duration is None else finite_arg(duration, "duration")
    if duration is not None and int(round(seconds * fr)) != F:
        raise MagnetError(f"duration {seconds:g} s does not match the loop's {F} frames ({F / fr:g} s): give the "
                          f"duration the loop was generated with (or none).")
    reps = finite_arg(repeats, "repeats")
    if reps != int(reps) or reps < 1:
        raise MagnetError(f"repeats {repeats!r} must be a whole number >= 1.")
    reps = int(reps)
    if reps * seconds > MAX_SECONDS:
        raise MagnetError(f"{reps} repeats of a {seconds:g} s loop is {reps * seconds:g} s: at most {MAX_SECONDS:g} "
                          f"s of audio in one call. Repeat it fewer times (the loop is seamless: repeat the "
                          f"decoded audio where you use it).")
    S = int(round(seconds * sr))
    check_fits(B * codec.channels * S * (reps + 2) * 4, f"{reps} repeats of a {seconds:g} s loop (batch {B})",
               torch.device("cpu"))
    P = min(F, int(round(5 * fr)))
    padded = torch.cat([codes[..., F - P:], codes, codes[..., :P]], dim=-1)
    decode = model.decode if hasattr(model, "codec") else codec.decode
    wav = decode(padded).float().cpu()
    hop = wav.shape[-1] // padded.shape[-1]
    period = wav[..., P * hop:(P + F) * hop]
    if S != period.shape[-1]:
        spec = torch.fft.rfft(period.double(), dim=-1)
        n = S // 2 + 1
        if spec.shape[-1] >= n:
            spec = spec[..., :n]
        else:
            spec = torch.cat([spec, spec.new_zeros(*spec.shape[:-1], n - spec.shape[-1])], dim=-1)
        period = (torch.fft.irfft(spec, n=S, dim=-1) * (S / period.shape[-1])).float()
    return period.repeat(1, 1, reps) if reps > 1 else period.contiguous()


# -- prompt timeline ---------------------------------------------------------------------------------------

_STAMP = re.compile(r"\d+(?::\d\d){0,2}(?:\.\d+)?")       # s, m:ss, h:mm:ss; decimals with a dot
_AFTER_STAMP = re.compile(r"\s*[-\u2013|]\s*|\s+|$")        # what may separate the time from the prompt


def _timeline_line(line: str) -> tuple[float, str]:
    """One timeline line -> (seconds, prompt): a time (`s`, `m:ss` or `h:mm:ss`, decimals only with a dot),
    then a space, '-', '–' or '|', then the prompt. Anything else is refused, naming the line."""
    stamp = re.match(r"[\d:.,]*", line).group()
    if not stamp:
        raise MagnetError(f"timeline line {line!r} does not start with a time: write one prompt per line as "
                          f"'0:30 drums come in' (m:ss, h:mm:ss or seconds).")
    after = _AFTER_STAMP.match(line, len(stamp))
    if not _STAMP.fullmatch(stamp) or after is None:
        raise MagnetError(f"timeline line {line!r}: {stamp!r} is not a time. Write seconds (12.5), m:ss (1:30) or "
                          f"h:mm:ss (1:02:03), decimals only with a dot (1:30.5; no frame counts), then a space "
                          f"and the prompt.")
    nums = [float(p) for p in stamp.split(":")]
    if any(n >= 60 for n in nums[1:]):
        raise MagnetError(f"timeline line {line!r}: minutes and seconds after a ':' must be below 60 "
                          f"(write 1:10, not 0:70).")
    total = 0.0
    for n in nums:
        total = total * 60 + n
    return total, line[after.end():]


def parse_timeline(timeline) -> list[tuple[float, str]]:
    """[(seconds, prompt)] from text ('0:00 calm piano intro', one per line; m:ss, h:mm:ss or plain seconds
    such as '12.5 text', decimals with a dot; blank lines and lines starting with # are skipped) or from a
    list of pairs.
    Checked: at least one entry, the first at 0, times strictly increasing, every prompt non-empty."""
    entries = []
    if isinstance(timeline, str):
        for raw in timeline.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            entries.append(_timeline_line(line))
    else:
        try:
            for t, p in timeline:
                entries.append((finite_arg(t, "timeline time"), p))
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
    `MagnetModel.generate_from_condition` runs it through `generate_timeline_from_condition`."""
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


MIN_SECTION = 0.25   # a section (not the last) ending beyond the first window: at least this part of the window
MAX_COST = 4         # a timeline: at most this many times the decodings of a plain generation of its length


class TimelinePlan(NamedTuple):
    """What a timeline generation runs: `runs` [(end frame, entry index, windows or None for one
    decoding)], each continuing all before it; the window and overlap in frames; `decodings` in all."""
    runs: list
    window: int
    overlap: int
    decodings: int


def timeline_plan(model, entries, frames: int, params: SamplingParams, overlap: float | None = None,
                  prompt_frames: int = 0) -> TimelinePlan:
    """Plan (and check, before any work) a timeline generation of `frames` frames from `entries`
    [(seconds, prompt)] (`params` checked; `prompt_frames` frames given at the start).

    Each entry's section runs from its time to the next one's: one decoding while it ends within the
    first window, else the window slid from what exists to its end. Its cost is bounded like a plain
    generation's: every section but the last that ends beyond the first window must be at least MIN_SECTION
    (a quarter) of the window long (each costs at least one decoding of the window), and all sections
    together may run at most MAX_COST (4) times the window decodings of a plain generation of the same
    length. Otherwise a MagnetError says which rule and what to change, before anything is encoded."""
    fr, L, W1 = model.frame_rate, model.cfg.span_len, model.max_frames
    seconds = frames / fr
    for t, p in entries:
        if t >= seconds:
            raise MagnetError(f"timeline time {t:g} s ({p!r}) is at or beyond the end of the {seconds:g} s "
                              f"piece: make the duration longer or remove that line.")
    spans = SpanArrangement.of(params, L)
    W = spans.usable_window(W1)
    ov = model.overlap_frames(overlap, params.span_arrangement)
    least = max(L, int(MIN_SECTION * W1))
    times = [int(round(t * fr)) for t, _ in entries]
    runs, done = [], prompt_frames
    for i, (t, (_, p)) in enumerate(zip(times, entries)):
        last = i == len(times) - 1
        start, end = max(t, prompt_frames), frames if last else times[i + 1]
        if end <= start:
            continue
        if end > W1 and end - start < least and not last:
            raise MagnetError(f"the timeline section at {t / fr:g} s ({p!r}) is {(end - start) / fr:g} s long: "
                              f"beyond the first window ({W1 / fr:g} s) each section but the last must last at least "
                              f"{least / fr:g} s (a quarter of the window; each costs a window's decoding). "
                              f"Merge it with its neighbours or move its time.")
        if end <= W1:                             # within one window: one decoding, trimmed to whole spans
            end = end if last else spans.trim(end)
            if end - done < spans.unit:
                continue
            runs.append((end, i, None))
            done = spans.trim(end)
        else:
            runs.append((end, i, longform.plan_windows(end, W, ov, done)))
            done = end
    decodings = sum(1 if plan is None else len(plan) for _, _, plan in runs)
    plain = 1 if frames <= W1 else len(longform.plan_windows(frames, W, ov, prompt_frames))
    if decodings > MAX_COST * plain:
        raise MagnetError(f"this timeline needs {decodings} window decodings, {decodings / plain:.1f} times a plain "
                          f"{seconds:g} s generation ({plain}): at most {MAX_COST} times. Use fewer, longer "
                          f"sections (every prompt change costs at least one decoding of the "
                          f"{W1 / fr:g} s window).")
    return TimelinePlan(runs, W, ov, decodings)


def generate_timeline(model, timeline, *, duration: float, seed: int | None = None, overlap: float | None = None,
                      params: SamplingParams | None = None, prompt: torch.Tensor | None = None,
                      progress: sampling.Progress | None = None, rescorer: sampling.Rescorer | None = None,
                      fast: bool | sampling.FastMode | None = None, return_seed: bool = False,
                      **sampling_kwargs) -> torch.Tensor | Generated:
    """Codes [1, K, T] of `duration` seconds whose prompt changes along `timeline` ([(seconds, prompt)] or
    '0:00 prompt' lines). Lengths as `model.generate` (exactly int(duration * frame_rate) beyond the
    window). Each section continues the audio before it with its own prompt (see the module docstring);
    one prompt gives exactly `model.generate([prompt], duration=duration, seed=seed)`. The timeline is
    planned and its cost checked (`timeline_plan`) before any prompt is encoded."""
    params = _sampling(model, params, fast, sampling_kwargs)
    frames = model.frames_for(duration)
    entries = parse_timeline(timeline)
    prompt = model.check_prompt_codes(prompt, 1, frames)
    plan = timeline_plan(model, entries, frames, params, overlap, 0 if prompt is None else prompt.shape[-1])
    cond = encode_timeline(model, entries)
    out = _generate_timeline(model, [c for _, c in cond.timeline], plan, params, prompt, seed, progress, rescorer)
    return model.returned(out, return_seed)


def generate_timeline_from_condition(model, cond: TimelineCondition, *, frames: int,
                                     params: SamplingParams | None = None, seed: int | None = None,
                                     overlap: float | None = None, prompt: torch.Tensor | None = None,
                                     progress: sampling.Progress | None = None,
                                     rescorer: sampling.Rescorer | None = None,
                                     fast: bool | sampling.FastMode | None = None) -> Generated:
    """The timeline generation on an encoded `TimelineCondition` (what the Sampler runs for the Prompt
    Timeline node's conditioning). `prompt`: codes kept at the start (the sections continue them)."""
    if not getattr(cond, "timeline", None):
        raise MagnetError("the conditioning has no timeline: encode it with the Prompt Timeline node or "
                          "magnet.edit.encode_timeline.")
    params = _sampling(model, params, fast)
    frames = model.check_frames(frames)
    conds = [model.condition_rows(c, 1) for _, c in cond.timeline]
    prompt = model.check_prompt_codes(prompt, 1, frames)
    entries = [(t, c.prompts[0] if c.prompts else "") for t, c in cond.timeline]
    plan = timeline_plan(model, entries, frames, params, overlap, 0 if prompt is None else prompt.shape[-1])
    return _generate_timeline(model, conds, plan, params, prompt, seed, progress, rescorer)


def _generate_timeline(model, conds: list, plan: TimelinePlan, params, prompt, seed, progress,
                       rescorer) -> Generated:
    counter = StepCounter(total=plan.decodings * sum(params.decoding_steps), progress=progress)
    engine = _engine(model)

    def decode(generator, _seed):
        out = prompt
        for end, i, windows in plan.runs:
            if windows is None:
                out = sampling.generate(model.lm, conds[i], end, params, prompt=out, generator=generator,
                                        job=counter, rescorer=rescorer, **engine)
            else:
                out = longform.generate_long(model.lm, conds[i], end, params, window=plan.window,
                                             overlap=plan.overlap, prompt=out, generator=generator, job=counter,
                                             rescorer=rescorer, **engine)
        return out.to(model.device)
    return model.seeded(seed, decode)
