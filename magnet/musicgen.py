"""The autoregressive side: MusicGen, the AR prompt generator (hybrid MAGNeT) and the AR rescorer.

    from magnet import MagnetModel, MusicGenModel
    from magnet.musicgen import MusicGenRescorer, generate_hybrid
    musicgen = MusicGenModel.from_pretrained("models/magnet/musicgen-small", text_encoder="t5-base")
    codes = musicgen.generate(["lofi hip hop beat"], duration=10, seed=1)            # pure AR
    magnet = MagnetModel.from_pretrained("models/magnet/magnet-small-10secs", text_encoder="t5-base")
    codes = generate_hybrid(magnet, musicgen, ["lofi hip hop beat"], seed=1)          # AR prompt + MAGNeT
    codes = magnet.generate(["lofi"], rescorer=MusicGenRescorer(musicgen, weight=0.5))  # rescored MAGNeT

MusicGen is the same transformer as MAGNeT (`transformer.LM`), causal, over codebooks in the *delay*
pattern: codebook k is shifted right by `delays[k]` frames (official releases: 0, 1, 2, 3) behind one
leading step of special tokens (id = card). Layout step s holds, for codebook k, frame s - 1 - delays[k]
(the special token where that frame is outside [0, T)). The output at step s predicts the content of
step s + 1, so the logits for frame t of codebook k sit at output position t + delays[k]. A frame is
complete once step t + 1 + max(delays) is written: T frames take T + max(delays) decoding steps.

Decoding (`MusicGenModel.generate`) feeds one layout step at a time through a key/value cache
(`transformer.KVCache`, preallocated), so a new frame costs the same whatever the length so far; the
conditional and null rows run in one batch and are mixed `uncond + (cond - uncond) * cfg_coef`, as
the reference does. Teacher forcing (`MusicGenModel.logits`) runs the whole layout sequence at once.

Hybrid generation (`generate_hybrid`): MusicGen writes the first `ar_seconds`, MAGNeT keeps those
frames fixed as prompt tokens and fills in the rest in parallel. MusicGen is run `max(delays)` frames
past the hand-over point and those extra frames are dropped, so every handed-over frame of every
codebook was predicted with real (not end-of-sequence) context. Default length: `DEFAULT_AR_SECONDS`
(3 s), capped at 30 % of the requested duration: enough AR context to set tempo, key and timbre at the
start (where parallel decoding has the least to hold on to), while MAGNeT still writes at least 70 %
of the clip in parallel and the AR part costs at most ~30 % of a pure-AR generation.

Rescoring (`MusicGenRescorer`, the `sampling.Rescorer` protocol): after each MAGNeT decoding step of
stage s, one teacher-forced MusicGen pass (conditional + null rows, mixed with `cfg_coef`) gives the
probability of every sampled token of codebook s; spans are then ranked by
`w * p_musicgen + (1 - w) * p_magnet`. What MusicGen sees, by the delay pattern, when it predicts frame t
of codebook s: codebooks < s (final in stage s) up to frame t + s - k - 1 — real tokens; codebook s up to
frame t - 1 — the tokens MAGNeT just sampled; codebooks > s up to frame t - (k - s) - 1 — **still masked
in stage s**. We feed those as they are: MAGNeT's mask id equals MusicGen's special token id (both =
card), which is MusicGen's own "no token here" input (it fills the not-yet-valid positions of every
sequence with it, in training and generation). So MusicGen scores codebook s from what exists at that
stage and is told that the higher codebooks are unknown; nothing is invented for them. Frames given as a
prompt keep all their codebooks, so there MusicGen sees the real higher codebooks. The last s frames of
codebook s are predicted with end-of-sequence special tokens in the lower codebooks, exactly as MusicGen
predicts them at the end of its own generations. Cost: one full MusicGen forward (2B rows, T + 3 steps)
per MAGNeT decoding step (B rows when `cfg_coef` is 1 or the prompts are all empty).

Compatibility (`check_compatible`): tokens only mean the same thing under the same codec, and the
rescorer reuses MAGNeT's T5 hidden states, so the two releases must share the codec (sample rate,
channels, frame rate, codebooks, and the codebook vectors themselves) and the text encoder (name and
width); anything else is a MagnetError naming both releases.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from . import sampling
from .codec import Codec
from .errors import MagnetError
from .model import CodecLM, Generated, MagnetModel, finite_arg, seconds_arg
from .text import TextCondition, TextEncoder
from .transformer import LM, KVCache, Memory

DEFAULT_AR_SECONDS = 3.0       # hybrid: seconds written by MusicGen before MAGNeT takes over ...
DEFAULT_AR_FRACTION = 0.3      # ... at most this fraction of the requested duration
DEFAULT_RESCORER_WEIGHT = 0.5


# -- the delay pattern ------------------------------------------------------------------------------

def delay_sequence(codes: torch.Tensor, delays: Sequence[int], special: int, steps: int | None = None) -> torch.Tensor:
    """codes [B, K, T] -> layout sequence [B, K, steps] (default T + max(delays) + 1): step s holds frame
    s - 1 - delays[k] of codebook k, the special token where that frame is outside [0, T)."""
    B, K, T = codes.shape
    D = max(delays)
    steps = T + D + 1 if steps is None else steps
    seq = codes.new_full((B, K, steps), special)
    for k, d in enumerate(delays):
        n = max(0, min(T, steps - 1 - d))
        seq[:, k, 1 + d:1 + d + n] = codes[:, k, :n]
    return seq


def undelay(seq: torch.Tensor, delays: Sequence[int], frames: int, shift: int = 1) -> torch.Tensor:
    """Inverse of `delay_sequence` for [B, K, S, ...]: out[:, k, t] = seq[:, k, t + delays[k] + shift].
    shift=1 for a layout sequence of tokens; shift=0 for the model's outputs (which predict the next step)."""
    return torch.stack([seq[:, k, d + shift:d + shift + frames] for k, d in enumerate(delays)], dim=1)


def valid_mask(delays: Sequence[int], frames: int, device=None) -> torch.Tensor:
    """[K, T] bool: positions whose prediction only needs steps inside the valid layout (t + delay < T);
    what the reference's `compute_predictions` marks valid."""
    t = torch.arange(frames, device=device)
    return torch.stack([t + d < frames for d in delays])


# -- AR sampling parameters -------------------------------------------------------------------------

@dataclass
class ARParams:
    """MusicGen decoding settings (the reference's defaults). `check()` validates them."""
    use_sampling: bool = True
    temperature: float = 1.0
    top_k: int = 250
    top_p: float = 0.0
    cfg_coef: float = 3.0

    def check(self) -> "ARParams":
        for name in ("temperature", "top_p", "cfg_coef", "top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise MagnetError(f"{name} {v!r} must be a number.")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise MagnetError(f"temperature {self.temperature} must be a finite number >= 0 (0 = argmax).")
        if not (0.0 <= self.top_p <= 1.0):
            raise MagnetError(f"top_p {self.top_p} must be between 0 and 1 (0 turns it off).")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise MagnetError(f"top_k {self.top_k} must be a whole number >= 0 (0 turns it off).")
        if not math.isfinite(self.cfg_coef):
            raise MagnetError(f"cfg_coef {self.cfg_coef} must be a finite number (3 is MusicGen's default).")
        return replace(self, top_k=int(self.top_k), temperature=float(self.temperature),
                       top_p=float(self.top_p), cfg_coef=float(self.cfg_coef))

    @property
    def greedy(self) -> bool:
        return not self.use_sampling or self.temperature <= 0


def _text_memory(lm: LM, cond: TextCondition, cfg_coef: float) -> tuple[Memory, bool]:
    """Memory for the conditional rows, plus the null rows when guidance changes anything."""
    B = cond.batch
    if cond.unconditional or cfg_coef == 1.0:
        return lm.memory(cond.hidden[:B], cond.mask[:B]), False
    return lm.memory(cond.hidden, cond.mask, null_rows=B), True


# -- the model --------------------------------------------------------------------------------------

class MusicGenModel(CodecLM):
    """An official MusicGen release (`lm_model: transformer_lm`, delay pattern) ready to generate:
    `lm` (the causal transformer), `codec` (EnCodec) and `text_encoder` (T5, may be None until given)."""

    def __init__(self, lm: LM, codec: Codec, text_encoder: TextEncoder | None = None, **kw):
        if lm.cfg.kind != "musicgen":
            raise MagnetError(f"{kw.get('source') or 'this model'} is a MAGNeT release, not MusicGen: load it with "
                              f"MagnetModel.from_pretrained.")
        super().__init__(lm, codec, text_encoder, **kw)

    KIND = "musicgen"
    KIND_ERROR = ("{source} is a MAGNeT release (lm_model transformer_lm_magnet), not MusicGen: load it with "
                  "MagnetModel.from_pretrained, and give MusicGenModel a MusicGen release such as "
                  "facebook/musicgen-small.")

    # -- properties ---------------------------------------------------------------------------------
    @property
    def delays(self) -> list[int]:
        return list(self.lm.cfg.delays)

    @property
    def special_id(self) -> int:
        return self.lm.mask_id

    def frames_for(self, duration: float | None = None, max_frames: int | None = None) -> int:
        """Frames to generate from `duration` seconds or `max_frames` (default: the release's window)."""
        if duration is not None and max_frames is not None:
            raise MagnetError("give either duration (seconds) or max_frames, not both.")
        if max_frames is not None:
            if isinstance(max_frames, bool) or int(max_frames) != max_frames or max_frames < 1:
                raise MagnetError(f"max_frames {max_frames!r} must be a whole number >= 1.")
            frames = int(max_frames)
        elif duration is not None:
            frames = int(seconds_arg(duration) * self.frame_rate)
            if frames < 1:
                raise MagnetError(f"duration {duration:g} s is shorter than one frame (1/{self.frame_rate} s).")
        else:
            frames = self.max_frames
        if frames > self.max_frames:
            raise MagnetError(f"{frames} frames ({frames / self.frame_rate:g} s) is beyond this MusicGen "
                              f"release's {self.segment_duration:g} s window: ask for at most "
                              f"{self.segment_duration:g} s ({self.max_frames} frames).")
        return frames

    # -- generation ---------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str] | str, *, duration: float | None = None, max_frames: int | None = None,
                 seed: int | None = None, use_sampling: bool = True, temperature: float = 1.0, top_k: int = 250,
                 top_p: float = 0.0, cfg_coef: float = 3.0, prompt: torch.Tensor | None = None,
                 progress: sampling.Progress | None = None) -> torch.Tensor:
        """Generate codes [B, K, T] autoregressively for B prompts (an empty prompt: unconditional).

        duration (seconds) or max_frames (default: the release's window); prompt: codes [B or 1, K, P]
        to continue (they come back unchanged at the start). Sampling as the reference: softmax at
        `temperature`, then top_p (when > 0) or top_k (when > 0); argmax when use_sampling is False or
        temperature is 0. progress(done, total) is called after every decoding step.
        """
        params = ARParams(use_sampling, temperature, top_k, top_p, cfg_coef).check()
        frames = self.frames_for(duration, max_frames)
        cond = self.encode_text(prompts)
        return self.generate_from_condition(cond, frames=frames, params=params, seed=seed, prompt=prompt,
                                            progress=progress)

    def generate_from_condition(self, cond: TextCondition, *, frames: int, params: ARParams | None = None,
                                seed: int | None = None, prompt: torch.Tensor | None = None,
                                progress: sampling.Progress | None = None) -> torch.Tensor:
        """The AR decoding loop on an already encoded text (T5 hidden states of `cond`)."""
        params = (params or ARParams()).check()
        self.check_condition(cond)
        if frames > self.max_frames:
            raise MagnetError(f"{frames} frames is beyond this MusicGen release's {self.segment_duration:g} s "
                              f"window ({self.max_frames} frames).")
        prompt = self.check_prompt_codes(prompt, cond.batch, frames)

        def decode(generator, _seed):
            with torch.inference_mode():
                return ar_decode(self.lm, cond.to(self.device), frames, params, prompt=prompt, generator=generator,
                                 progress=progress)
        return self.seeded(seed, decode).codes

    def logits(self, codes: torch.Tensor, cond: TextCondition, heads=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: codes [B, K, T] -> (logits [2B, K, T, card] for the conditional then the null
        rows, not mixed; valid mask [K, T]). logits[:, k, t] is the prediction of codes[:, k, t]; where the
        mask is False the prediction relied on steps past the end (the reference returns NaN there)."""
        self.check_condition(cond)
        if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or codes.is_floating_point() \
                or codes.shape[0] != cond.batch or codes.shape[1] != self.cfg.n_q:
            raise MagnetError(f"codes to score must be integer codes [{cond.batch}, {self.cfg.n_q}, frames] (one row "
                              f"per prompt), got {getattr(codes, 'shape', type(codes).__name__)}.")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > self.cfg.card):
            raise MagnetError(f"codes to score must lie in [0, {self.cfg.card}] ({self.cfg.card} = no token); they "
                              f"come from a different codec.")
        with self._autocast(), torch.inference_mode():
            mem = self.lm.memory(*(x.to(self.device) for x in (cond.hidden, cond.mask)), null_rows=cond.batch)
            out = teacher_forced_logits(self.lm, codes.to(self.device), mem, heads=heads)
        return out.float(), valid_mask(self.delays, codes.shape[-1], out.device)


# -- decoding and scoring (the loops themselves) ----------------------------------------------------

def ar_decode(lm: LM, cond: TextCondition, frames: int, params: ARParams, *, prompt: torch.Tensor | None = None,
              generator: torch.Generator | None = None, progress: sampling.Progress | None = None) -> torch.Tensor:
    """Autoregressive decoding in the delay pattern with a key/value cache -> codes [B, K, frames].

    The first forward feeds every layout step up to the first one holding an unknown frame (just the
    special step without a prompt); each later forward feeds the one step written last, so every step
    costs the same. Only positions that are unknown and valid are written; the rest keep the prompt or
    the special token."""
    cfg = lm.cfg
    dev = next(lm.parameters()).device
    B, K, delays = cond.batch, cfg.n_q, list(cfg.delays)
    special = lm.mask_id
    S = frames + max(delays)                       # last layout step; steps 0..S
    P = 0 if prompt is None else prompt.shape[-1]
    mem, guided = _text_memory(lm, cond, params.cfg_coef)
    known = torch.zeros((B, K, frames), dtype=torch.long)
    if P:
        known[..., :P] = prompt.cpu()
    seq = delay_sequence(known, delays, special).to(dev)            # [B, K, S + 1]
    # which (codebook, step) entries the loop writes: frames in [P, frames), nothing else
    t_of = torch.arange(S + 1).view(1, -1) - 1 - torch.tensor(delays).view(-1, 1)   # [K, S+1] frame per step
    write = ((t_of >= P) & (t_of < frames)).to(dev)
    start = P + 1 + min(delays)                    # first step holding an unknown frame
    cache = KVCache(cfg.num_layers, mem.batch, cfg.num_heads, S, cfg.head_dim, dev, next(lm.parameters()).dtype)
    sp = sampling.SamplingParams(use_sampling=True, top_k=params.top_k, top_p=params.top_p)
    total, prev = S + 1 - start, 0
    for i, s in enumerate(range(start, S + 1)):
        logits = lm(seq[..., prev:s], mem, cache=cache)[:, :, -1].float()     # [rows, K, card]
        if guided:
            logits = sampling.cfg_mix(logits, B, params.cfg_coef)
        if params.greedy:
            tok = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(logits / params.temperature, dim=-1)
            tok = sampling.sample_tokens(logits, probs, sp, generator)[0][..., 0]
        seq[..., s] = torch.where(write[:, s], tok, seq[..., s])
        prev = s
        if progress is not None:
            progress(i + 1, total)
    return undelay(seq, delays, frames)


def teacher_forced_logits(lm: LM, codes: torch.Tensor, mem: Memory, heads=None) -> torch.Tensor:
    """codes [B, K, T] (any B dividing the memory's rows) -> logits [rows, len(heads), T, card]:
    logits[:, h, t] predicts codes[:, heads[h], t] from the layout steps before it (one causal forward
    over T + max(delays) steps). Mask ids in `codes` are the special token: "no token here"."""
    delays = list(lm.cfg.delays)
    T = codes.shape[-1]
    heads = list(range(lm.cfg.n_q)) if heads is None else list(heads)
    seq = delay_sequence(codes, delays, lm.mask_id, steps=T + max(delays))
    out = lm(seq, mem, heads=heads)                                       # [rows, H, T + D, card]
    return undelay(out, [delays[k] for k in heads], T, shift=0)


# -- rescoring ----------------------------------------------------------------------------------------

class MusicGenRescorer:
    """Rescores MAGNeT's samples with MusicGen (`sampling.Rescorer`): after each decoding step of stage s,
    one teacher-forced MusicGen pass gives p(codes[:, s]), mixed into the span ranking as
    `weight * p_musicgen + (1 - weight) * p_magnet`. See the module docstring for what MusicGen sees of
    the codebooks still masked. `cfg_coef`: guidance of MusicGen's probabilities (1 = conditional rows
    only, half the cost); `temperature`: softmax temperature of those probabilities. `magnet`: the MAGNeT
    model it will serve, checked now for a shared codec and text encoder (`check_compatible`); without
    it only the text encoder's width can be checked, at `begin`."""

    def __init__(self, musicgen: MusicGenModel, weight: float = DEFAULT_RESCORER_WEIGHT, *, cfg_coef: float = 3.0,
                 temperature: float = 1.0, magnet: MagnetModel | None = None):
        if not isinstance(musicgen, MusicGenModel):
            raise MagnetError(f"the rescorer needs a MusicGenModel (got {type(musicgen).__name__}): load one with "
                              f"MusicGenModel.from_pretrained.")
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise MagnetError(f"rescorer weight {weight!r} must be a number between 0 and 1.") from None
        if not 0.0 <= weight <= 1.0:
            raise MagnetError(f"rescorer weight {weight} must be between 0 (MAGNeT alone) and 1 (MusicGen alone).")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise MagnetError(f"rescorer temperature {temperature} must be a finite number > 0.")
        if not math.isfinite(cfg_coef):
            raise MagnetError(f"rescorer cfg_coef {cfg_coef} must be a finite number.")
        if magnet is not None:
            check_compatible(magnet, musicgen)
        self.musicgen, self.weight = musicgen, weight
        self.cfg_coef, self.temperature = float(cfg_coef), float(temperature)
        self._mem: Memory | None = None
        self._guided = False
        self._batch = 0

    def check_compatible(self, magnet: MagnetModel) -> "MusicGenRescorer":
        check_compatible(magnet, self.musicgen)
        return self

    def begin(self, cond: TextCondition, frames: int) -> None:
        mg = self.musicgen
        if cond.text_dim != mg.cfg.text_dim:
            raise MagnetError(f"the prompts were encoded with {cond.encoder or 'a text encoder'} (width "
                              f"{cond.text_dim}), but the rescorer's MusicGen {mg.source} uses "
                              f"{mg.cfg.text_encoder} (width {mg.cfg.text_dim}). Use a MusicGen release with "
                              f"the same text encoder as the MAGNeT model.")
        if frames > mg.max_frames:
            raise MagnetError(f"the rescorer's MusicGen ({mg.source}) covers {mg.segment_duration:g} s, shorter "
                              f"than the {frames / mg.frame_rate:g} s being generated: generate at most "
                              f"{mg.segment_duration:g} s with rescoring, or use a MusicGen with a longer window.")
        with mg._autocast(), torch.inference_mode():
            c = cond.to(mg.device)
            self._mem, self._guided = _text_memory(mg.lm, c, self.cfg_coef)
        self._batch = cond.batch

    def probs(self, codes: torch.Tensor, stage: int) -> torch.Tensor:
        """codes [B, K, T] after a sampling step of `stage` (codebooks > stage = mask id) -> [B, T]."""
        if self._mem is None:
            raise MagnetError("MusicGenRescorer.probs was called before begin(): pass the rescorer to "
                              "MagnetModel.generate(..., rescorer=) rather than calling it directly.")
        mg = self.musicgen
        with mg._autocast(), torch.inference_mode():
            logits = teacher_forced_logits(mg.lm, codes.to(mg.device), self._mem, heads=[stage])[:, 0].float()
            if self._guided:
                logits = sampling.cfg_mix(logits, self._batch, self.cfg_coef)
            probs = torch.softmax(logits / self.temperature, dim=-1)
            tok = codes[:, stage].to(mg.device).clamp(max=mg.cfg.card - 1)
            p = torch.gather(probs, -1, tok.unsqueeze(-1))[..., 0]
        return p.to(codes.device)


# -- compatibility ------------------------------------------------------------------------------------

def _base(name: str) -> str:
    return str(name).rstrip("/").split("/")[-1].lower()


def check_compatible(magnet: MagnetModel, musicgen: MusicGenModel) -> None:
    """Raise MagnetError unless the two releases share the codec and the text encoder."""
    a, b = magnet, musicgen
    an, bn = f"MAGNeT {a.source or 'model'}", f"MusicGen {b.source or 'model'}"
    ca, cb = a.codec, b.codec
    sig = lambda c: (c.sample_rate, c.channels, c.frame_rate, c.n_q, c.card)  # noqa: E731
    if sig(ca) != sig(cb) or a.cfg.card != b.cfg.card or a.cfg.n_q != b.cfg.n_q:
        raise MagnetError(
            f"codec mismatch: {an} uses {ca.sample_rate} Hz, {ca.channels} channel(s), {ca.frame_rate} frames/s, "
            f"{ca.n_q} codebooks of {ca.card}; {bn} uses {cb.sample_rate} Hz, {cb.channels} channel(s), "
            f"{cb.frame_rate} frames/s, {cb.n_q} codebooks of {cb.card}. Their tokens mean different sounds: "
            f"combine a music MAGNeT (32 kHz EnCodec) with a MusicGen release of the same codec.")
    if not _same_codebooks(ca, cb):
        raise MagnetError(
            f"codec mismatch: {an} and {bn} have codecs of the same shape but different codebooks, so their "
            f"tokens mean different sounds. Use releases that share one codec (the official music releases "
            f"all use facebook/encodec_32khz).")
    ta, tb = a.cfg, b.cfg
    if ta.text_dim != tb.text_dim or _base(ta.text_encoder) != _base(tb.text_encoder):
        raise MagnetError(
            f"text encoder mismatch: {an} uses {ta.text_encoder} (width {ta.text_dim}), {bn} uses "
            f"{tb.text_encoder} (width {tb.text_dim}). The prompt encoding is shared, so both must use the "
            f"same T5: combine a music MAGNeT (t5-base) with MusicGen (t5-base).")


def _same_codebooks(a: Codec, b: Codec, rtol: float = 1e-2) -> bool:
    """Codebook vectors equal up to storage precision (fp16 copies of the same codec pass)."""
    if a is b:
        return True
    for la, lb in zip(a.model.quantizer.layers, b.model.quantizer.layers):
        ea, eb = la.codebook.embed.detach().float().cpu(), lb.codebook.embed.detach().float().cpu()
        if ea.shape != eb.shape:
            return False
        scale = max(float(ea.abs().max()), 1e-12)
        if float((ea - eb).abs().max()) > rtol * scale:
            return False
    return True


# -- hybrid generation --------------------------------------------------------------------------------

def default_ar_seconds(duration: float) -> float:
    """`DEFAULT_AR_SECONDS`, capped at `DEFAULT_AR_FRACTION` of the duration."""
    return min(DEFAULT_AR_SECONDS, DEFAULT_AR_FRACTION * duration)


def generate_hybrid(magnet: MagnetModel, musicgen: MusicGenModel, prompts: Sequence[str] | str, *,
                    duration: float | None = None, ar_seconds: float | None = None, seed: int | None = None,
                    params: sampling.SamplingParams | None = None, ar_params: ARParams | None = None,
                    prompt: torch.Tensor | None = None, progress: sampling.Progress | None = None,
                    rescorer: sampling.Rescorer | None = None, return_seed: bool = False) -> torch.Tensor | Generated:
    """Hybrid MAGNeT: MusicGen writes the first `ar_seconds` (default `default_ar_seconds(duration)`),
    MAGNeT keeps them as fixed prompt tokens and generates the rest -> codes [B, K, T] (T as MAGNeT's
    `generate` gives it). params: MAGNeT sampling (default SamplingParams(): the release's own);
    ar_params: MusicGen sampling (default ARParams()). prompt: audio codes to continue (MusicGen continues
    them). The prompts are encoded once, with MAGNeT's text encoder, and shared. One seed serves both
    models; return_seed=True returns `Generated(codes, seed)`."""
    frames = magnet.frames_for(duration)
    cond = magnet.encode_text(prompts)
    ar_frames = hybrid_prompt_frames(magnet, frames, ar_seconds)
    out = hybrid_from_condition(magnet, musicgen, cond, frames=frames, ar_frames=ar_frames, params=params,
                                ar_params=ar_params, seed=seed, prompt=prompt, progress=progress, rescorer=rescorer)
    return magnet.returned(out, return_seed)


def ar_seconds_to_frames(magnet: MagnetModel, ar_seconds) -> int:
    """Seconds MusicGen writes -> frames (whole frames, rounded down; at least one)."""
    ar_seconds = finite_arg(ar_seconds, "ar_seconds", "number of seconds")
    ar_frames = int(ar_seconds * magnet.frame_rate)
    if not ar_frames >= 1:
        raise MagnetError(f"ar_seconds {ar_seconds:g} is shorter than one frame: give at least "
                          f"{1 / magnet.frame_rate:g} s (or use MAGNeT alone).")
    return ar_frames


def hybrid_prompt_frames(magnet: MagnetModel, frames: int, ar_seconds: float | None) -> int:
    """Frames MusicGen writes for a hybrid generation of `frames` frames."""
    seconds = frames / magnet.frame_rate
    if ar_seconds is None:
        ar_seconds = default_ar_seconds(seconds)
    ar_frames = ar_seconds_to_frames(magnet, ar_seconds)
    ar_seconds = float(ar_seconds)
    if ar_frames >= frames:
        raise MagnetError(f"ar_seconds {ar_seconds:g} s leaves nothing for MAGNeT in a {seconds:g} s generation: "
                          f"give fewer AR seconds than the duration (or use MusicGen alone).")
    return ar_frames


def hybrid_from_condition(magnet: MagnetModel, musicgen: MusicGenModel, cond: TextCondition, *, frames: int,
                          ar_frames: int, params: sampling.SamplingParams | None = None,
                          ar_params: ARParams | None = None, seed: int | None = None,
                          prompt: torch.Tensor | None = None, progress: sampling.Progress | None = None,
                          rescorer: sampling.Rescorer | None = None) -> Generated:
    """`generate_hybrid` on an already encoded text (what a ComfyUI node calls) -> `Generated`."""
    params = magnet.sampling_params(params)
    seed = sampling.check_seed(seed) if seed is not None else sampling.random_seed()
    if not 1 <= ar_frames < frames:
        raise MagnetError(f"the AR prompt ({ar_frames} frames) must be at least one frame and shorter than the "
                          f"generation ({frames} frames).")
    nar_steps = sum(params.decoding_steps)
    ar_steps = ar_prompt_steps(musicgen, ar_frames, 0 if prompt is None else prompt.shape[-1])
    ar_progress = nar_progress = None
    if progress is not None:
        ar_progress = lambda d, t: progress(d, t + nar_steps)  # noqa: E731
        nar_progress = lambda d, t: progress(ar_steps + d, ar_steps + t)  # noqa: E731
    ar_codes = ar_prompt_from_condition(magnet, musicgen, cond, ar_frames=ar_frames, ar_params=ar_params, seed=seed,
                                        prompt=prompt, progress=ar_progress)
    return magnet.generate_from_condition(cond, frames=frames, params=params, seed=seed,
                                          prompt=ar_codes.to(magnet.device), progress=nar_progress,
                                          rescorer=rescorer)


def ar_prompt_steps(musicgen: MusicGenModel, ar_frames: int, prompt_frames: int = 0) -> int:
    """AR decoding steps `ar_prompt_from_condition` runs (for progress totals)."""
    ar_total = min(ar_frames + max(musicgen.delays), musicgen.max_frames)
    return ar_total + max(musicgen.delays) - prompt_frames - min(musicgen.delays)


def ar_prompt_from_condition(magnet: MagnetModel, musicgen: MusicGenModel, cond: TextCondition, *, ar_frames: int,
                             ar_params: ARParams | None = None, seed: int | None = None,
                             prompt: torch.Tensor | None = None,
                             progress: sampling.Progress | None = None) -> torch.Tensor:
    """The first `ar_frames` frames written by MusicGen, to hand to MAGNeT as fixed prompt codes.

    MusicGen runs max(delays) frames past the hand-over, so the handed-over frames of every codebook were
    predicted with real context rather than end-of-sequence tokens; the extra frames are dropped."""
    check_compatible(magnet, musicgen)
    ar_params = (ar_params or ARParams()).check()
    if ar_frames < 1:
        raise MagnetError("the AR prompt must be at least one frame long: give more AR seconds.")
    if ar_frames > musicgen.max_frames:
        raise MagnetError(f"ar_seconds {ar_frames / magnet.frame_rate:g} s is beyond the MusicGen window "
                          f"({musicgen.segment_duration:g} s): ask for fewer AR seconds.")
    P = 0 if prompt is None else prompt.shape[-1]
    if P >= ar_frames:
        raise MagnetError(f"the audio prompt ({P} frames) is already as long as the AR part ({ar_frames} frames): "
                          f"give more AR seconds, or continue the audio with MAGNeT alone.")
    ar_total = min(ar_frames + max(musicgen.delays), musicgen.max_frames)
    codes = musicgen.generate_from_condition(cond, frames=ar_total, params=ar_params, seed=seed, prompt=prompt,
                                             progress=progress)
    return codes[..., :ar_frames]
