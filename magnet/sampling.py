"""MAGNeT decoding: the one sampling loop every entry point (API, CLI, nodes) runs.

Codebooks are decoded one after another (stage 0..K-1). In stage s, codebooks < s are final and
codebooks > s are all mask tokens. Each stage runs n_s steps; at step i (t = i / (n_s - 1)):

1. masking rate m = cos(pi/2 * t); k = max(int(m * N), 1) spans (or tokens) to (re)mask, N = how many
   are still to generate;
2. the k least confident spans of the previous step are masked (`nonoverlap`: whole spans of
   `span_len` frames; `stride1`: least probable overlapping spans whose union covers about k tokens);
   given (prompt) frames are never masked;
3. one forward of the conditional and null rows together; classifier-free guidance annealed with m;
4. temperature annealed linearly to zero, sampling with top-p / top-k (or argmax);
5. masked positions take the sampled tokens; spans are scored from the probabilities of what was
   sampled; positions not re-masked this step get a score that never wins again.

The schedule numbers are computed exactly as the reference does (float32 torch scalars), so greedy
decoding is token-identical to it.

Nothing in the step loop waits on the device: every size and count a step needs (the schedule and the
number of spans to mask, made before the stage starts; the stride1 search bounds) is a Python number on
the host, sampling is `exponential_race` (not `torch.multinomial`, which checks its input on the host on
every call), and the check for NaN / infinite logits stays on the device until it is read once per stage,
after the stage's last step (`bool(nonfinite)`). The forward adds no wait on CUDA and MPS; only the CPU's
position pruning (`fastpath.FastPathSettings.prune_on_cpu`) reads which positions to compute, on the CPU,
where there is no device to wait for. No float64 tensor is made either (MPS has no float64).
tests/test_device_safety.py checks all three on the CPU.

Each stage's forward is a `fastpath.StageForward`: the same logits as `LM.forward`, with less work (on
the CPU only the positions a step uses are computed). Fast mode (`SamplingParams.fast`) is described in
`FastMode`.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Protocol, Sequence

import torch

from .errors import MagnetError
from .text import TextCondition
from .fastpath import DEFAULT_SETTINGS, FastPathSettings, StageForward
from .transformer import LM

SPAN_ARRANGEMENTS = ("nonoverlap", "stride1")
SPAN_SCORINGS = ("max", "prod")
DONT_REMASK = -1e4
DEFAULT_STEPS = (20, 10, 10, 10)
MAX_STEPS = 1000            # per codebook

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class FastMode:
    """What fast mode changes; the exact mode (the default) changes none of it.

    later_steps: at most this many decoding steps for each codebook >= 1 (codebook 0 keeps its
        steps). None leaves the steps as given.
    int8: the transformer's linear layers run with int8 weights and dynamically quantized int8
        activations (CPU only; ignored on other devices or where the int8 kernels are missing). The
        int8 copy is made on first use and kept beside the fp32 weights (`fastpath.int8_copy`).
    skip_unit_cfg: on steps whose guidance coefficient is 1 to within 1e-5 (the last step of each
        stage with min_cfg_coef = 1: the schedule gives 0.9999996 there), only the conditional rows run
        and their logits are used as they are, instead of mixing in the null-condition pass.
    """
    later_steps: int | None = 5
    int8: bool = True
    skip_unit_cfg: bool = True

    def summary(self) -> str:
        """One line for tooltips and help texts, made from these fields (so it cannot drift from them)."""
        parts = []
        if self.later_steps is not None:
            parts.append(f"at most {self.later_steps} decoding steps for codebooks after the first")
        if self.int8:
            parts.append("int8 linear layers on the CPU")
        if self.skip_unit_cfg:
            parts.append("no null-prompt pass where guidance is 1")
        return "fast mode: " + ", ".join(parts) + "; off = the exact mode, identical to the reference"

    def steps(self, steps: Sequence[int]) -> tuple[int, ...]:
        if self.later_steps is None:
            return tuple(steps)
        return tuple(steps[:1]) + tuple(min(int(s), int(self.later_steps)) for s in steps[1:])


@dataclass
class SamplingParams:
    """Everything that steers MAGNeT decoding besides the prompts. `check()` validates it."""
    use_sampling: bool = True
    temperature: float = 3.0
    top_k: int = 0
    top_p: float = 0.9
    max_cfg_coef: float = 10.0
    min_cfg_coef: float = 1.0
    decoding_steps: Sequence[int] = field(default=DEFAULT_STEPS)
    span_arrangement: str = "nonoverlap"
    span_scoring: str = "max"
    anneal_temp: bool = True
    fast: bool | FastMode = False    # True = FastMode(); `check` applies its step cap to decoding_steps
    _checked: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def _values(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if f.init)

    def check(self, n_q: int, defaults: dict | None = None) -> "SamplingParams":
        """Validated copy. decoding_steps None or 'auto': the release's own (`defaults`, read from its
        xp.cfg `generate.lm`), else `default_steps(n_q)`.

        Validation runs once: the copy remembers what it was checked for, so the inner layers a checked
        object passes through (the model, the window loop, the decoding loop) return it as it is. A copy
        made with `dataclasses.replace`, or a field changed since, is checked again."""
        if self._checked is not None and self._checked == (n_q, self._values()):
            return self
        steps = self.decoding_steps
        if isinstance(steps, str):
            steps = parse_steps(steps)
        if steps is None:
            steps = release_steps(defaults, n_q)
        try:
            whole = [int(s) for s in steps]
            if any(isinstance(s, bool) or float(s) != w for s, w in zip(steps, whole)):
                raise ValueError
            steps = whole
        except (TypeError, ValueError, OverflowError):
            raise MagnetError(f"decoding_steps {self.decoding_steps!r} must be {n_q} whole numbers, one per "
                              f"codebook, e.g. 20,10,10,10.") from None
        if len(steps) != n_q:
            raise MagnetError(f"decoding_steps {steps} has {len(steps)} entries but the model has {n_q} "
                              f"codebooks: give one step count per codebook, e.g. {list(DEFAULT_STEPS[:n_q])}.")
        if any(s < 1 for s in steps):
            raise MagnetError(f"decoding_steps {steps}: every step count must be at least 1.")
        if any(s > MAX_STEPS for s in steps):
            raise MagnetError(f"decoding_steps {steps}: at most {MAX_STEPS} steps per codebook (the releases use "
                              f"10 to 60; more only multiplies the time of every window).")
        num = {}
        for name in ("temperature", "top_p", "max_cfg_coef", "min_cfg_coef", "top_k"):
            v = getattr(self, name)
            try:
                if isinstance(v, bool):
                    raise ValueError
                num[name] = float(v)
            except (TypeError, ValueError):
                raise MagnetError(f"{name} {v!r} must be a number.") from None
            if not math.isfinite(num[name]):
                raise MagnetError(f"{name} {v} must be a finite number.")
        if num["top_k"] != int(num["top_k"]) or num["top_k"] < 0:
            raise MagnetError(f"top_k {self.top_k!r} must be a whole number >= 0 (0 turns it off).")
        if num["temperature"] < 0:
            raise MagnetError(f"temperature {self.temperature} must be >= 0.")
        if not (0.0 <= num["top_p"] <= 1.0):
            raise MagnetError(f"top_p {self.top_p} must be between 0 and 1 (0 turns it off).")
        if not isinstance(self.use_sampling, (bool, int)) or not isinstance(self.anneal_temp, (bool, int)):
            raise MagnetError("use_sampling / anneal_temp must be True or False.")
        if self.span_arrangement not in SPAN_ARRANGEMENTS:
            raise MagnetError(f"span_arrangement {self.span_arrangement!r} is unknown: use one of "
                              f"{', '.join(SPAN_ARRANGEMENTS)}.")
        if self.span_scoring not in SPAN_SCORINGS:
            raise MagnetError(f"span_scoring {self.span_scoring!r} is unknown: use one of {', '.join(SPAN_SCORINGS)}.")
        fast = self.fast
        if fast is True:
            fast = FastMode()
        elif fast is None or fast is False:
            fast = False
        elif not isinstance(fast, FastMode):
            raise MagnetError(f"fast {fast!r} must be True, False or a FastMode.")
        if fast:
            if fast.later_steps is not None and int(fast.later_steps) < 1:
                raise MagnetError(f"FastMode.later_steps {fast.later_steps} must be at least 1 (or None).")
            steps = list(fast.steps(steps))
        out = replace(self, decoding_steps=tuple(steps), fast=fast, temperature=num["temperature"],
                      top_p=num["top_p"], top_k=int(num["top_k"]), max_cfg_coef=num["max_cfg_coef"],
                      min_cfg_coef=num["min_cfg_coef"], use_sampling=bool(self.use_sampling),
                      anneal_temp=bool(self.anneal_temp))
        out._checked = (n_q, out._values())
        return out


def default_steps(n_q: int) -> tuple[int, ...]:
    """20 steps for the first codebook, 10 for each other (the paper's and the 10 s releases' setting)."""
    return tuple(DEFAULT_STEPS[:1]) + (DEFAULT_STEPS[1],) * (n_q - 1)


def release_steps(defaults: dict | None, n_q: int) -> tuple[int, ...]:
    """The decoding steps a release stores (xp.cfg `generate.lm.decoding_steps`: 60,10,10,10 in the 30 s
    music releases), when they are n_q whole numbers >= 1; else `default_steps(n_q)`."""
    stored = (defaults or {}).get("decoding_steps")
    try:
        steps = tuple(int(s) for s in stored)
        if len(steps) == n_q and all(s >= 1 and s == f for s, f in zip(steps, stored)):
            return steps
    except (TypeError, ValueError):
        pass
    return default_steps(n_q)


def parse_steps(text) -> list[int] | None:
    """'20,10,10,10' -> [20, 10, 10, 10]; 'auto' (or empty) -> None: the release's own steps."""
    if text is None or str(text).strip().lower() in ("auto", ""):
        return None
    try:
        return [int(s) for s in str(text).replace(" ", "").split(",") if s != ""]
    except ValueError:
        raise MagnetError(f"decoding_steps {text!r} must be comma-separated whole numbers, e.g. 20,10,10,10.") from None


def make_generator(seed: int | None, device) -> tuple[torch.Generator, int]:
    """A generator on `device` seeded with `seed` (a fresh random seed when None); returns the seed."""
    if seed is None:
        seed = random.SystemRandom().randrange(2 ** 63)
    seed = check_seed(seed)
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g, seed


def check_seed(seed) -> int:
    """A seed as a whole number in [0, 2^64) (negative values wrap, as ComfyUI's do); else a MagnetError."""
    try:
        if isinstance(seed, bool):
            raise ValueError
        value = int(seed) if not isinstance(seed, float) else int(seed) if seed.is_integer() else None
        if value is None:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise MagnetError(f"seed {seed!r} must be a whole number (or None/empty for a random one).") from None
    return value % (2 ** 64)


# -- schedules (computed as the reference computes them: float32 torch scalars) --------------------

def stage_schedule(n_steps: int, n_to_generate: int) -> list[tuple[float, int]]:
    """[(masking rate m, number to mask k)] for each step of a stage."""
    out = []
    for t in torch.linspace(0, 1, n_steps):
        m = torch.cos(t * math.pi * 0.5)
        out.append((float(m), max(int((m * n_to_generate).item()), 1)))
    return out


# -- sampling ---------------------------------------------------------------------------------------

def sample_tokens(logits, probs, params: SamplingParams, generator):
    """Returns (tokens [..., 1], the probabilities the spans are scored with)."""
    if not params.use_sampling:
        return torch.argmax(logits, dim=-1, keepdim=True), probs
    flat = probs.reshape(-1, probs.shape[-1])
    if params.top_p > 0.0:
        p_sort, idx = torch.sort(flat, dim=-1, descending=True)
        keep = (torch.cumsum(p_sort, dim=-1) - p_sort) <= params.top_p
        p_sort = p_sort * keep
        pick = exponential_race(p_sort / p_sort.sum(-1, keepdim=True), generator)
        tok = torch.gather(idx, -1, pick)
    elif params.top_k > 0:
        k = min(params.top_k, flat.shape[-1])
        kth = torch.topk(flat, k, dim=-1).values[:, -1:]
        flat = flat * (flat >= kth)
        flat = flat / flat.sum(-1, keepdim=True)
        tok = exponential_race(flat, generator)
        # the reference scores spans with these renormalised top-k probabilities
        probs = flat.view_as(probs)
    else:
        tok = exponential_race(flat, generator)
    return tok.view(*probs.shape[:-1], 1), probs


def exponential_race(p: torch.Tensor, generator) -> torch.Tensor:
    """One token per row of p [N, V] (probabilities, rows summing to 1): [N, 1] long.

    This is `torch.multinomial(p, 1, generator=generator)` without its input checks: ATen's multinomial
    draws one sample as argmax(p / q) with q ~ Exp(1) drawn by `exponential_` on a tensor like p
    (aten/src/ATen/native/Distributions.cpp, the `n_sample == 1` fast path), after checking p on the host
    (a device sync on every call on CUDA). Here the same draw and the same division run without the
    checks, so on the CPU the tokens and the generator's state afterwards are bit-identical to
    multinomial's (tests/test_device_safety.py).

    q is clamped away from 0 (`race_floor`): MPS's `exponential_` can return 0 (as -0.0), and multinomial
    there then lets a zero-probability token win (0 / -0.0 is NaN, which argmax takes); clamped, a zero
    probability never wins. No CPU draw lies below the floor, so there the clamp changes nothing."""
    q = torch.empty_like(p).exponential_(1, generator=generator)
    return race_winner(p, q)


def race_floor(dtype: torch.dtype) -> float:
    """The least q `race_winner` divides by: the smallest positive normal number of `dtype` (a device that
    flushes subnormals to zero cannot turn it into 0); for float16, whose normal range starts at 6e-5,
    where the CPU's draws do fall, the smallest subnormal (2^-24), which only replaces an exact 0. The
    decoding loop's probabilities are float32."""
    info = torch.finfo(dtype)
    return 2.0 ** -24 if dtype == torch.float16 else info.tiny


def race_winner(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """argmax(p / q) along the last dim, keepdim, q clamped to at least `race_floor` (see
    `exponential_race`)."""
    return torch.argmax(p / q.clamp_min(race_floor(q.dtype)), dim=-1, keepdim=True)


def cfg_mix(logits: torch.Tensor, batch: int, coef: float) -> torch.Tensor:
    """Classifier-free guidance: rows [0, B) conditional, [B, 2B) null."""
    cond, uncond = logits.split(batch, dim=0)
    return uncond + (cond - uncond) * coef


# -- masking ----------------------------------------------------------------------------------------

def least_probable_spans(scores: torch.Tensor, n_target: int, span_len: int) -> torch.Tensor:
    """stride1 masking, vectorised over the batch: scores [B, T] (per-token -log p) -> bool mask [B, T]
    covering the u least probable overlapping spans, u found by the reference's binary search so that
    about `n_target` tokens are masked."""
    B, T = scores.shape
    span_scores = scores.unfold(1, span_len, 1).sum(dim=-1)               # [B, S]
    S = span_scores.shape[1]
    order = torch.argsort(span_scores, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(S, device=scores.device).expand(B, S))
    # a token is covered by the top-u spans iff the best rank among the spans covering it is < u
    big = torch.full((B, span_len - 1), S, dtype=rank.dtype, device=rank.device)
    padded = torch.cat([big, rank, big], dim=1)                            # [B, S + 2(L-1)] = [B, T + L - 1]
    tok_rank = padded.unfold(1, span_len, 1).amin(dim=-1)                  # [B, T]
    n_target = max(n_target, span_len)
    lo, hi = n_target // span_len, n_target - span_len + 1
    mid = round(0.5 * (lo + hi))
    if mid == lo or mid == hi:
        return tok_rank < mid
    dev = scores.device
    lo_t = torch.full((B,), lo, device=dev)
    hi_t = torch.full((B,), hi, device=dev)
    mid_t = torch.full((B,), mid, device=dev)
    last = mid_t.clone()
    active = torch.ones(B, dtype=torch.bool, device=dev)
    for _ in range((hi - lo).bit_length() + 2):      # enough iterations for the search to settle
        n = (tok_rank < mid_t[:, None]).sum(dim=-1)
        last = torch.where(active, mid_t, last)
        over = n > n_target
        hi_t = torch.where(active & over, mid_t, hi_t)
        lo_t = torch.where(active & ~over, mid_t, lo_t)
        new_mid = half_to_even_midpoint(lo_t + hi_t)
        mid_t = torch.where(active, new_mid, mid_t)
        active = active & (mid_t > lo_t) & (mid_t < hi_t)
    return tok_rank < last[:, None]


def half_to_even_midpoint(s: torch.Tensor) -> torch.Tensor:
    """round(s / 2) for integer tensors s >= 0, rounding halves to even as Python's `round` does, in
    integer arithmetic (no float64, which MPS lacks): floor(s / 2), plus 1 where s is odd and floor(s / 2)
    is odd."""
    half = torch.div(s, 2, rounding_mode="floor")
    return half + (s & half & 1)


# -- the decoding loop ------------------------------------------------------------------------------

@dataclass
class StepCounter:
    """Counts decoding steps for progress across stages (and across windows, for long generations)."""
    total: int
    done: int = 0
    progress: Progress | None = None

    def step(self):
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)



class Rescorer(Protocol):
    """An external model that rescores MAGNeT's samples (see DESIGN.md, "Rescoring").

    `begin` is called once per generation with the text and the length; `probs` once per decoding step
    with the codes after sampling, returning the external model's probability of `codes[:, stage]`
    [B, T]. Spans are then ranked by `weight * p_ext + (1 - weight) * p_magnet`; weight 0 is never called.
    """
    weight: float

    def begin(self, cond: TextCondition, frames: int) -> None: ...

    def probs(self, codes: torch.Tensor, stage: int) -> torch.Tensor: ...


def generate(lm: LM, cond: TextCondition, frames: int, params: SamplingParams, *,
             prompt: torch.Tensor | None = None, given: torch.Tensor | None = None,
             keep: torch.Tensor | None = None, generator: torch.Generator | None = None,
             progress: Progress | None = None, job: StepCounter | None = None,
             rescorer: Rescorer | None = None, fastpath: FastPathSettings | None = None) -> torch.Tensor:
    """Decode `frames` frames of codes [B, K, frames] for the prompts of `cond`.

    prompt [B, K, P] (P < frames): leading codes kept unchanged (continuation). More generally,
    `given` [B, K, frames] with `keep` (bool [frames]): the kept frames' codes are fixed in every
    codebook and the others generated around them (the model is bidirectional). With the `nonoverlap`
    arrangement the result is trimmed to a multiple of `span_len` frames, as the reference does.
    progress(done, total) is called after every decoding step. fastpath: how the forward runs
    (`magnet.fastpath.FastPathSettings`; the defaults when None).

    The inputs are taken as checked: the model classes check prompts, codes and the conditioning's text
    width once, where the user hands them in (`MagnetModel.check_prompt_codes`, `check_condition`).
    """
    cfg = lm.cfg
    params = params.check(cfg.n_q)
    dev = next(lm.parameters()).device
    B, K = cond.batch, cfg.n_q
    if prompt is not None and prompt.shape[-1] > 0:
        if given is not None:
            raise ValueError("give either prompt codes or given codes with a keep mask, not both")
        P = prompt.shape[-1]
        given = torch.full((B, K, frames), lm.mask_id, dtype=torch.long)
        given[..., :P] = prompt.cpu()
        keep = torch.zeros(frames, dtype=torch.bool)
        keep[:P] = True
    if given is not None:
        keep = torch.as_tensor(keep, dtype=torch.bool).cpu()
        if bool(keep.all()):
            raise MagnetError("every frame is kept: there is nothing to generate.")
    if generator is None:
        generator, _ = make_generator(None, dev)
    job = job or StepCounter(total=sum(params.decoding_steps), progress=progress)
    if rescorer is not None and rescorer.weight == 0:
        rescorer = None
    settings = fastpath or DEFAULT_SETTINGS

    cond = cond.to(dev)
    with torch.inference_mode():
        if cond.unconditional:        # conditional and null rows are identical: one pass, no guidance
            mem, guided = lm.memory(cond.hidden[:B], cond.mask[:B]), False
        else:
            mem, guided = lm.memory(cond.hidden, cond.mask, null_rows=B), True
        if rescorer is not None:
            rescorer.begin(cond, frames)
        codes = torch.full((B, K, frames), lm.mask_id, dtype=torch.long, device=dev)
        if given is not None:
            given = given.to(dev)
            codes = torch.where(keep.to(dev), given, codes)
        for stage, n_steps in enumerate(params.decoding_steps):
            forward = StageForward(lm, mem, guided=guided, batch=B, stage=stage, n_steps=n_steps,
                                   fast=params.fast or None, settings=settings)
            codes = _decode_stage(codes, stage, n_steps, forward, lm.mask_id, lm.cfg.span_len, given, keep, params,
                                  generator, job, rescorer)
    return codes


class _Spans:
    """How one stage's T positions are masked and scored: whole spans of `span_len` frames (`nonoverlap`;
    T a multiple of span_len), or single positions (`stride1`, whose masks cover least probable
    overlapping spans, or span_len 1). `units` = the spans or positions; kept units are never masked."""

    def __init__(self, params: SamplingParams, span_len: int, keep: torch.Tensor, batch: int, device):
        self.L = span_len
        self.whole_spans = span_len > 1 and params.span_arrangement == "nonoverlap"
        self.stride1 = span_len > 1 and params.span_arrangement == "stride1"
        self.scoring = params.span_scoring
        self.batch, self.device = batch, device
        fixed = keep.view(-1, span_len).all(dim=-1) if self.whole_spans else keep    # on the host
        self.n_units = fixed.numel()
        self.to_generate = int((~fixed).sum())
        self.first_scores = torch.zeros((batch, self.n_units), device=device).masked_fill(fixed.to(device),
                                                                                            DONT_REMASK)

    def pick(self, scores: torch.Tensor, n_mask: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The least confident `n_mask` units -> (bool [B, T] positions to mask, bool [B, units] spans
        picked, or None when the units are positions)."""
        if self.stride1:
            return least_probable_spans(scores, n_mask, self.L), None
        picked = scores.topk(n_mask, dim=-1).indices
        if not self.whole_spans:
            return torch.zeros_like(scores, dtype=torch.bool).scatter(1, picked, True), None
        spans = torch.zeros((self.batch, self.n_units), dtype=torch.bool, device=self.device).scatter(1, picked, True)
        return spans.repeat_interleave(self.L, dim=-1), spans

    def score(self, p: torch.Tensor, masked: torch.Tensor, spans: torch.Tensor | None) -> torch.Tensor:
        """Scores [B, units] from p [B, T], the probability of each position's sampled token: spans
        (re)sampled this step are scored (`max`: 1 - the highest p in the span, `prod`: -sum log p;
        positions: -log p); the others get DONT_REMASK."""
        if not self.whole_spans:
            return (-torch.log(p)).masked_fill(~masked, DONT_REMASK)
        if self.scoring == "max":
            scores = 1 - p.view(self.batch, self.n_units, self.L).max(dim=-1).values
        else:
            scores = (-torch.log(p)).view(self.batch, self.n_units, self.L).sum(dim=-1)
        return scores.masked_fill(~spans, DONT_REMASK)


def _decode_stage(codes, stage: int, n_steps: int, forward: StageForward, mask_id: int, span_len: int,
                  given, keep, params: SamplingParams, generator, job: StepCounter, rescorer):
    """Decode codebook `stage` of codes [B, K, T] in `n_steps` steps (the five steps of the module
    docstring); kept frames (`keep`, bool [T]) hold `given`'s codes."""
    B, K, T = codes.shape
    dev = codes.device
    if span_len > 1 and params.span_arrangement == "nonoverlap" and T % span_len:
        T = T // span_len * span_len
        codes = codes[..., :T]
    keep = torch.zeros(T, dtype=torch.bool) if keep is None else keep[:T]   # on the host: sizes known here
    spans = _Spans(params, span_len, keep, B, dev)
    kept_codes = given[:, stage, :T] if bool(keep.any()) else None
    keep_dev = keep.to(dev)
    seq = torch.full((B, T), mask_id, dtype=torch.long, device=dev)
    scores = spans.first_scores
    nonfinite = torch.zeros((), dtype=torch.bool, device=dev)

    for i, (m, n_mask) in enumerate(stage_schedule(n_steps, spans.to_generate)):
        # 1-2. mask: the least confident spans of the previous step; kept frames keep their codes
        remask, picked_spans = spans.pick(scores, n_mask)
        seq = seq.masked_fill(remask, mask_id)
        if kept_codes is not None:
            seq = torch.where(keep_dev, kept_codes, seq)
        codes[:, stage] = seq
        masked = seq == mask_id

        # 3. forward: the conditional and null rows together; logits where they are used (the masked
        # positions, whole spans for `nonoverlap`, which scores a span from all its positions)
        coef = m * params.max_cfg_coef + (1 - m) * params.min_cfg_coef
        logits, guided = forward.logits(codes, remask if spans.whole_spans else masked, coef)

        # guidance, annealed with the masking rate
        if guided:
            logits = cfg_mix(logits, B, coef)

        # 4. sample, the temperature annealed linearly to zero
        temp = params.temperature * ((n_steps - 1 - i) / n_steps) if params.anneal_temp else params.temperature
        probs = torch.softmax(logits / max(temp, 1e-2), dim=-1)
        probs, nonfinite = _guard_nonfinite(probs, nonfinite)
        tokens, probs = sample_tokens(logits, probs, params, generator)
        seq = torch.where(masked, tokens[..., 0], seq)
        codes[:, stage] = seq

        # 5. score what was sampled (mixed with the rescorer's probabilities)
        p = torch.gather(probs, -1, tokens)[..., 0]                                    # [B, T]
        if rescorer is not None:
            w = float(rescorer.weight)
            p = w * rescorer.probs(codes, stage).to(p) + (1 - w) * p
        scores = spans.score(p, masked, picked_spans)
        job.step()
    if bool(nonfinite):                     # one host sync per stage
        raise MagnetError(f"the model produced NaN or infinite values while decoding codebook {stage}: its "
                          f"weights are damaged, or half precision (fp16) overflowed. Load the model in fp32 "
                          f"(dtype fp32), or download the release again.")
    return codes


def _guard_nonfinite(probs: torch.Tensor, flag):
    """Rows of `probs` that are not finite (NaN/inf logits) are replaced by a uniform distribution so that
    sampling never fails on them mid-stage, and `flag` (a device tensor: no host sync) records that it
    happened; the stage then ends with one clear error."""
    bad = ~torch.isfinite(probs.sum(-1, keepdim=True))
    probs = probs.masked_fill(bad, 1.0 / probs.shape[-1])
    return probs, flag | bad.any()
