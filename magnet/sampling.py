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
position pruning (`stage_forward.DecodingSettings.prune_on_cpu`) reads which positions to compute, on the
CPU, where there is no device to wait for. No float64 tensor is made either (MPS has no float64).
tests/test_device_safety.py checks all three on the CPU.

Each stage's forward is a `stage_forward.StageForward`: the same logits as `LM.forward`, with less work (on
the CPU only the positions a step uses are computed). Fast mode (`SamplingParams.fast`) is described in
`FastMode`.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Protocol, Sequence

import torch

from .defaults import DEFAULT_STEPS, MAX_STEPS, MUSIC_DEFAULTS
from .errors import MagnetError
from .linears import LINEARS
from .stage_forward import DEFAULT_SETTINGS, DecodingSettings, StageForward
from .text import TextCondition
from .transformer import LM

SPAN_ARRANGEMENTS = ("nonoverlap", "stride1")
SPAN_SCORINGS = ("max", "prod")
DONT_REMASK = -1e4

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class FastMode:
    """What fast mode changes; the exact mode (the default) changes none of it.

    later_steps: at most this many decoding steps for each codebook >= 1 (codebook 0 keeps its
        steps). None leaves the steps as given.
    linears: the transformer's linear layers on the CPU (float32 weights; ignored on other devices):
        'auto' (the fastest path this CPU runs, from its features or measured once:
        `linears.choose_linears`; the environment variable MAGNET_FAST_LINEARS can set it), 'bf16'
        (bf16 weights and activations: AMX or avx512_bf16), 'int8' (int8 weights, dynamically quantized
        int8 activations: VNNI/AVX2) or 'fp32' (the weights themselves). A low-precision copy is made on first use; the float32 weights it
        replaces are held in float16 meanwhile and restored exactly when exact mode runs (`magnet.lowp`).
    skip_unit_cfg: on steps whose guidance coefficient is 1 to within 1e-5 (the last step of each
        stage with min_cfg_coef = 1: the schedule gives 0.9999996 there), only the conditional rows run
        and their logits are used as they are, instead of mixing in the null-condition pass.
    """
    later_steps: int | None = 5
    linears: str = "auto"
    skip_unit_cfg: bool = True

    def summary(self) -> str:
        """One line for tooltips and help texts, made from these fields (so it cannot drift from them)."""
        parts = []
        if self.later_steps is not None:
            parts.append(f"at most {self.later_steps} decoding steps for codebooks after the first")
        if self.linears == "auto":
            parts.append("linear layers in bf16 or int8 on the CPU, whichever it runs fastest")
        elif self.linears != "fp32":
            parts.append(f"{self.linears} linear layers on the CPU")
        if self.skip_unit_cfg:
            parts.append("no null-prompt pass where guidance is 1")
        return "fast mode: " + ", ".join(parts) + "; off = the exact mode, identical to the reference"

    def steps(self, steps: Sequence[int]) -> tuple[int, ...]:
        if self.later_steps is None:
            return tuple(steps)
        return tuple(steps[:1]) + tuple(min(int(s), int(self.later_steps)) for s in steps[1:])


# The key a release's xp.cfg `generate.lm` stores a sampling field under, where it differs from the field's
# name; the music releases' values (MUSIC_DEFAULTS, used where a release stores none) and every kind of
# release's published values are in `magnet.defaults`.
RELEASE_KEYS = {"temperature": "temp"}


def release_value(name: str, defaults: dict | None):
    """The value a release stores for the sampling field `name` (xp.cfg `generate.lm`, e.g. `temp` 3.5 in the
    audio-magnet releases), when it is of the right kind; else the music releases' value."""
    stored = (defaults or {}).get(RELEASE_KEYS.get(name, name))
    music = MUSIC_DEFAULTS[name]
    if isinstance(music, str):
        allowed = SPAN_ARRANGEMENTS if name == "span_arrangement" else SPAN_SCORINGS
        return stored if stored in allowed else music
    if isinstance(stored, (int, float)) and not isinstance(stored, bool) and math.isfinite(stored):
        return stored
    return music


@dataclass
class SamplingParams:
    """Everything that steers MAGNeT decoding besides the prompts. `check()` validates it.

    A field left at None means the release's own setting: `check(n_q, defaults)` takes it from the release's
    xp.cfg `generate.lm` (`MagnetModel.generation_defaults`; `release_value`, `release_steps`), and where the
    release stores none, from the music releases (`defaults.MUSIC_DEFAULTS`, `defaults.DEFAULT_STEPS`). So
    `SamplingParams()` runs a release as it was published (each kind's values: `defaults.KINDS`). A value given
    always wins."""
    use_sampling: bool = True
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    max_cfg_coef: float | None = None
    min_cfg_coef: float | None = None
    decoding_steps: Sequence[int] | str | None = None    # None or 'auto': the release's own
    span_arrangement: str | None = None
    span_scoring: str | None = None
    anneal_temp: bool = True
    fast: bool | FastMode = False    # True = FastMode(); `check` applies its step cap to decoding_steps
    _checked: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def _values(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if f.init)

    def check(self, n_q: int, defaults: dict | None = None) -> "SamplingParams":
        """Validated copy, every None field filled: decoding_steps None or 'auto': the release's own
        (`defaults`, read from its xp.cfg `generate.lm`), else `default_steps(n_q)`; the other None fields
        from `release_value(name, defaults)`.

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
        given = {name: getattr(self, name) for name in MUSIC_DEFAULTS}
        given.update({name: release_value(name, defaults) for name, v in given.items() if v is None})
        num = {}
        for name in ("temperature", "top_p", "max_cfg_coef", "min_cfg_coef", "top_k"):
            v = given[name]
            try:
                if isinstance(v, bool):
                    raise ValueError
                num[name] = float(v)
            except (TypeError, ValueError):
                raise MagnetError(f"{name} {v!r} must be a number.") from None
            if not math.isfinite(num[name]):
                raise MagnetError(f"{name} {v} must be a finite number.")
        if num["top_k"] != int(num["top_k"]) or num["top_k"] < 0:
            raise MagnetError(f"top_k {given['top_k']!r} must be a whole number >= 0 (0 turns it off).")
        if num["temperature"] < 0:
            raise MagnetError(f"temperature {given['temperature']} must be >= 0.")
        if not (0.0 <= num["top_p"] <= 1.0):
            raise MagnetError(f"top_p {given['top_p']} must be between 0 and 1 (0 turns it off).")
        if not isinstance(self.use_sampling, (bool, int)) or not isinstance(self.anneal_temp, (bool, int)):
            raise MagnetError("use_sampling / anneal_temp must be True or False.")
        if given["span_arrangement"] not in SPAN_ARRANGEMENTS:
            raise MagnetError(f"span_arrangement {given['span_arrangement']!r} is unknown: use one of "
                              f"{', '.join(SPAN_ARRANGEMENTS)}.")
        if given["span_scoring"] not in SPAN_SCORINGS:
            raise MagnetError(f"span_scoring {given['span_scoring']!r} is unknown: use one of "
                              f"{', '.join(SPAN_SCORINGS)}.")
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
            if fast.linears not in ("auto",) + LINEARS:
                raise MagnetError(f"FastMode.linears {fast.linears!r} must be one of auto, {', '.join(LINEARS)}.")
            steps = list(fast.steps(steps))
        out = replace(self, decoding_steps=tuple(steps), fast=fast, temperature=num["temperature"],
                      top_p=num["top_p"], top_k=int(num["top_k"]), max_cfg_coef=num["max_cfg_coef"],
                      min_cfg_coef=num["min_cfg_coef"], use_sampling=bool(self.use_sampling),
                      anneal_temp=bool(self.anneal_temp), span_arrangement=given["span_arrangement"],
                      span_scoring=given["span_scoring"])
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
    seed = random_seed() if seed is None else check_seed(seed)
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g, seed


def random_seed() -> int:
    """A fresh random seed (from the operating system), for a generation given none."""
    return random.SystemRandom().randrange(2 ** 63)


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
             rescorer: Rescorer | None = None, decoding: DecodingSettings | None = None) -> torch.Tensor:
    """Decode `frames` frames of codes [B, K, frames] for the prompts of `cond`.

    prompt [B, K, P] (P < frames): leading codes kept unchanged (continuation). More generally,
    `given` [B, K, frames] with `keep` (bool [frames]): the kept frames' codes are fixed in every
    codebook and the others generated around them (the model is bidirectional). With the `nonoverlap`
    arrangement the result is trimmed to a multiple of `span_len` frames, as the reference does.
    progress(done, total) is called after every decoding step. decoding: how the forward runs
    (`magnet.stage_forward.DecodingSettings`; the defaults when None).

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
    settings = decoding or DEFAULT_SETTINGS
    first_codebook = getattr(lm, "first_codebook", 0)   # an LM that decodes only codebooks >= k says k

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
                                  generator, job, rescorer, codebook=first_codebook + stage)
    return codes


@dataclass(frozen=True)
class SpanArrangement:
    """How a decoding groups its frames into spans of `span_len` frames, and what follows from it.

    `nonoverlap` (span_len > 1): whole, disjoint spans; a decoding's length is a multiple of the span
    (`unit`), so the decoding loop trims to whole spans (`trim`), and a window holds `usable_window(w)`
    frames. `stride1`: single positions whose masks cover the least probable overlapping spans; any
    length. A span_len of 1 is single positions either way. `scoring` ranks whole spans: `max` (1 - the
    highest p in the span) or `prod` (-sum log p)."""
    name: str
    span_len: int
    scoring: str = "max"

    @classmethod
    def of(cls, params: SamplingParams, span_len: int) -> "SpanArrangement":
        """The arrangement of checked `params` for a model of `span_len`."""
        return cls(params.span_arrangement, int(span_len), params.span_scoring)

    @property
    def whole_spans(self) -> bool:
        return self.span_len > 1 and self.name == "nonoverlap"

    @property
    def stride1(self) -> bool:
        return self.span_len > 1 and self.name == "stride1"

    @property
    def unit(self) -> int:
        """Frames a decoding's length is a whole multiple of: the span (whole spans), else 1."""
        return self.span_len if self.whole_spans else 1

    def trim(self, frames: int) -> int:
        """`frames` rounded down to whole units: the length the decoding loop returns for `frames`."""
        return frames - frames % self.unit

    def usable_window(self, window: int) -> int:
        """The longest decoding within `window` frames that the loop returns whole."""
        return self.trim(window)

    def room(self, window: int) -> int:
        """The most frames of a decoding within `window` that can be fixed context (an overlap, the frames
        around a region) or a regenerated region: all of the usable window but one span, so that each
        decoding has at least one span of each."""
        return self.usable_window(window) - max(self.span_len, 1)

    def first_scores(self, keep: torch.Tensor, batch: int, device) -> tuple[torch.Tensor, int]:
        """A stage's starting scores [batch, units] (kept units: DONT_REMASK, never masked) and how many
        units it generates. `keep`: bool [T] on the host, T whole units."""
        fixed = keep.view(-1, self.span_len).all(dim=-1) if self.whole_spans else keep    # on the host
        scores = torch.zeros((batch, fixed.numel()), device=device).masked_fill(fixed.to(device), DONT_REMASK)
        return scores, int((~fixed).sum())

    def pick(self, scores: torch.Tensor, n_mask: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The least confident `n_mask` units of scores [B, units] -> (bool [B, T] positions to mask, bool
        [B, units] spans picked, or None when the units are positions)."""
        if self.stride1:
            return least_probable_spans(scores, n_mask, self.span_len), None
        picked = scores.topk(n_mask, dim=-1).indices
        if not self.whole_spans:
            return torch.zeros_like(scores, dtype=torch.bool).scatter(1, picked, True), None
        spans = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter(1, picked, True)
        return spans.repeat_interleave(self.span_len, dim=-1), spans

    def score(self, p: torch.Tensor, masked: torch.Tensor, spans: torch.Tensor | None) -> torch.Tensor:
        """Scores [B, units] from p [B, T], the probability of each position's sampled token: spans
        (re)sampled this step are scored (`max`: 1 - the highest p in the span, `prod`: -sum log p;
        positions: -log p); the others get DONT_REMASK."""
        if not self.whole_spans:
            return (-torch.log(p)).masked_fill(~masked, DONT_REMASK)
        by_span = p.view(p.shape[0], -1, self.span_len)
        if self.scoring == "max":
            scores = 1 - by_span.max(dim=-1).values
        else:
            scores = (-torch.log(by_span)).sum(dim=-1)
        return scores.masked_fill(~spans, DONT_REMASK)


def _decode_stage(codes, stage: int, n_steps: int, forward: StageForward, mask_id: int, span_len: int,
                  given, keep, params: SamplingParams, generator, job: StepCounter, rescorer, codebook: int):
    """Decode codebook `stage` of codes [B, K, T] in `n_steps` steps (the five steps of the module
    docstring); kept frames (`keep`, bool [T]) hold `given`'s codes. `codebook`: the model's index of that
    codebook (for the error message; it differs from `stage` when the LM decodes only the later ones)."""
    B, K, T = codes.shape
    dev = codes.device
    spans = SpanArrangement.of(params, span_len)
    if spans.trim(T) != T:
        T = spans.trim(T)
        codes = codes[..., :T]
    keep = torch.zeros(T, dtype=torch.bool) if keep is None else keep[:T]   # on the host: sizes known here
    kept_codes = given[:, stage, :T] if bool(keep.any()) else None
    keep_dev = keep.to(dev)
    seq = torch.full((B, T), mask_id, dtype=torch.long, device=dev)
    scores, to_generate = spans.first_scores(keep, B, dev)
    nonfinite = torch.zeros((), dtype=torch.bool, device=dev)

    for i, (m, n_mask) in enumerate(stage_schedule(n_steps, to_generate)):
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
        raise MagnetError(f"the model produced NaN or infinite values while decoding codebook {codebook}: its "
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
