"""`MagnetModel`: a MAGNeT release (LM + codec) with its T5 text encoder, behind one small API.

    model = MagnetModel.from_pretrained("models/magnet/magnet-small-10secs",
                                        text_encoder="models/text_encoders/t5-base")
    codes = model.generate(["80s thrash metal intro riff"], seed=0)   # [B, 4, T]
    wav = model.decode(codes)                                          # [B, C, samples]

    codes = model.generate(["ambient drone"], duration=95, seed=0)    # beyond the window: slides it
    codes = model.regenerate(codes, 4.0, 6.0, ["ambient drone"])      # redo seconds 4 to 6 only
    wav = model.decode(codes, duration=95)                            # exactly round(95 * sample_rate)
"""
from __future__ import annotations

import copy
import dataclasses
import math
import operator
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from . import edit, longform, sampling
from .arguments import (  # noqa: F401  (also importable from here)
    MAX_SECONDS, Generated, available_bytes, check_fits, codes_arg, finite_arg, seconds_arg)
from .audio import fit_length, seconds_to_samples
from .checkpoints import CONTENTS, Release, build_lm, content_of_text_encoder, load_release, training_settings
from .codec import Codec
from .devices import autocast_for, codec_device, parse_device, parse_dtype
from .errors import MagnetError
from .sampling import SamplingParams, SpanArrangement
from .stage_forward import DecodingSettings
from .text import TextCondition, TextEncoder
from .transformer import LM

TEXT_ENCODER_ENV = "MAGNET_TEXT_ENCODER_DIR"


def find_text_encoder(name: str, near: Path | None = None, search_dirs: Iterable = ()) -> Path | None:
    """Where a T5 folder named `name` (e.g. 't5-base') is: $MAGNET_TEXT_ENCODER_DIR (the folder itself or
    a folder holding it), then beside or inside the release, then `search_dirs`."""
    base = name.rstrip("/").split("/")[-1]
    places = []
    if os.environ.get(TEXT_ENCODER_ENV):
        env = Path(os.environ[TEXT_ENCODER_ENV])
        places += [env, env / base]
    if near is not None:
        near = Path(near).resolve()
        d = near if near.is_dir() else near.parent
        places += [d / base, d.parent / base]
    places += [Path(s) / base for s in search_dirs]
    for p in places:
        if (p / "config.json").is_file():
            return p
    return None


def load_parts(release, kind: str, kind_error: str, *, text_encoder=None, device=None, dtype=None, codec=None,
               search_dirs: Sequence = ()):
    """(lm, codec, text encoder or None, Release) of a release of `kind` ('magnet' or 'musicgen'), on
    `device`. `kind_error` (with {source} and {kind}) is raised for a release of the other kind.
    text_encoder: a folder or TextEncoder; None = look for it; False = none."""
    device = parse_device(device)
    dtype = parse_dtype(dtype, device)
    r: Release = load_release(release, codec_dir=codec, search_dirs=search_dirs)
    if r.lm_config.kind != kind:
        raise MagnetError(kind_error.format(source=r.source, kind=r.lm_config.kind))
    lm = build_lm(r.lm_config, r.lm_state, str(r.source), device=device, dtype=dtype)
    del r.lm_state
    te = None if text_encoder is False else text_encoder
    if text_encoder is None:
        te = find_text_encoder(r.lm_config.text_encoder, Path(release), search_dirs)
    if te is not None and not isinstance(te, TextEncoder):
        te = TextEncoder(te, device=device)
    elif isinstance(te, TextEncoder):
        te.to(device)
    return lm, r.codec.to(codec_device(device)), te, r   # EnCodec on the CPU when the LM is on MPS


def _one_per_row(prompts: int, rows: int) -> None:
    if prompts != rows:
        raise MagnetError(f"{prompts} text prompts for {rows} rows of codes: give one prompt per row "
                          f"(or one for all).")


class CodecLM:
    """What a MAGNeT and a MusicGen release share: `lm`, `codec`, `text_encoder` (may be None until given),
    their rates and window, text encoding, codec encode/decode and the autocast policy."""

    def __init__(self, lm: LM, codec: Codec, text_encoder: TextEncoder | None = None, *,
                 device=None, dtype=None, source: str = "", generation: dict | None = None,
                 training: dict | None = None, content: str | None = None):
        self.lm, self.codec, self.text_encoder = lm, codec, text_encoder
        self.source = source
        # what the release's config says beyond the architecture, read once at load (checkpoints.Release)
        self.generation_defaults = generation or {}
        self.content = content if content in CONTENTS else content_of_text_encoder(lm.cfg.text_encoder)
        self.training_defaults = training_settings(training, self.content)
        self.decoding = DecodingSettings()        # how MAGNeT's forward runs (magnet.stage_forward)
        self._seed_record = threading.local()
        self.check_text_encoder(text_encoder)

    def check_text_encoder(self, text_encoder) -> None:
        """A T5 of another width than the release's (t5-large on a music release) is a MagnetError."""
        lm = self.lm
        if text_encoder is not None and text_encoder.dim != lm.cfg.text_dim:
            raise MagnetError(f"text encoder {text_encoder.folder} has width {text_encoder.dim}, but this model "
                              f"expects {lm.cfg.text_dim} ({lm.cfg.text_encoder}). Use the "
                              f"{lm.cfg.text_encoder} folder.")

    def _sharing(self, **changes):
        """A new model object sharing this one's modules and settings, with `changes` (attribute: value)."""
        new = copy.copy(self)
        new._seed_record = threading.local()
        for name, value in changes.items():
            setattr(new, name, value)
        return new

    def with_text_encoder(self, text_encoder):
        """This model with another T5 (checked: `check_text_encoder`); this one is not changed."""
        self.check_text_encoder(text_encoder)
        return self._sharing(text_encoder=text_encoder)

    def with_lm(self, lm: LM):
        """This model running another LM of the same architecture (e.g. one with trainable adapters, for
        previews while training); this one is not changed."""
        from .lora import fingerprint
        if fingerprint(lm) != fingerprint(self.lm):
            raise MagnetError("the LM has another architecture than this model's: use an LM of this release.")
        return self._sharing(lm=lm)

    @property
    def last_seed(self) -> int | None:
        """The seed of this thread's last generation (its own record per thread: two generations running
        at once in two threads each read their own)."""
        return getattr(self._seed_record, "seed", None)

    @last_seed.setter
    def last_seed(self, seed: int | None):
        self._seed_record.seed = seed

    @property
    def device(self) -> torch.device:
        """Where the LM is now (a memory manager such as ComfyUI's may move it between calls)."""
        return next(self.lm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.lm.parameters()).dtype

    @property
    def cfg(self):
        return self.lm.cfg

    @property
    def sample_rate(self) -> int:
        return self.codec.sample_rate

    @property
    def channels(self) -> int:
        return self.codec.channels

    @property
    def frame_rate(self) -> int:
        return int(round(self.codec.frame_rate))

    @property
    def segment_duration(self) -> float:
        """The window the release was trained on, in seconds (10 or 30 for the official MAGNeT ones)."""
        return self.lm.cfg.segment_duration

    @property
    def max_frames(self) -> int:
        return int(self.segment_duration * self.frame_rate)

    # -- loading ------------------------------------------------------------------------------------
    KIND = "magnet"          # the release kind this class loads (xp.cfg lm_model)
    KIND_ERROR = "{source} is a {kind} release: load it with the class for that kind."

    @classmethod
    def from_pretrained(cls, release: str | Path, text_encoder: str | Path | TextEncoder | bool | None = None, *,
                        device=None, dtype=None, codec: str | Path | None = None, search_dirs: Sequence = (),
                        download: bool = False):
        """Load an official release folder (`state_dict.bin` + `compression_state_dict.bin`) or a file
        made by `python -m magnet convert`; a release of the other kind (MAGNeT / MusicGen) is refused.

        text_encoder: a transformers T5 folder (or a loaded TextEncoder). When None, a folder named after
            the release's T5 (`t5-base`, `t5-large`) is looked for in $MAGNET_TEXT_ENCODER_DIR, beside the
            release and in `search_dirs`; False: none (generation needs one, encode/decode do not).
        codec: for releases whose codec file is a pointer (`{'pretrained': 'facebook/encodec_32khz'}`),
            the transformers EnCodec folder; else it is looked for in $MAGNET_CODEC_DIR, in and beside
            the release folder and in `search_dirs`.
        device/dtype: default CUDA with fp16 weights when available, else CPU float32.
        download: fetch what is missing from the official Hugging Face repositories first (`hub.prepare`): an
            official name such as 'magnet-small-10secs' (into models/magnet/), its codec and its T5.
        """
        if download:
            from .hub import prepare
            release, text_encoder = prepare(release, text_encoder, codec, search_dirs,
                                            find_text_encoder=find_text_encoder)
        lm, codec_mod, te, r = load_parts(release, cls.KIND, cls.KIND_ERROR, text_encoder=text_encoder,
                                          device=device, dtype=dtype, codec=codec, search_dirs=search_dirs)
        return cls(lm, codec_mod, te, source=str(r.source), generation=r.generation, training=r.training,
                   content=r.content)

    # -- checks of what callers hand in ---------------------------------------------------------------
    def check_condition(self, cond: TextCondition) -> TextCondition:
        """The conditioning must be a TextCondition from this release's T5 (its width)."""
        if not isinstance(cond, TextCondition):
            raise MagnetError(f"the conditioning must be encoded text (a TextCondition from model.encode_text, or "
                              f"the Text Encode node), got {type(cond).__name__}.")
        if cond.text_dim != self.cfg.text_dim:
            raise MagnetError(f"the conditioning comes from a text encoder of width {cond.text_dim} "
                              f"({cond.encoder}), but {self.source or 'this model'} expects {self.cfg.text_dim} "
                              f"({self.cfg.text_encoder}). Encode the prompts with {self.cfg.text_encoder}.")
        return cond

    def condition_rows(self, cond: TextCondition, rows: int) -> TextCondition:
        """The conditioning of plain prompts checked (`check_condition`) with one row per row of codes: one
        prompt serves every row, else there must be one per row."""
        if getattr(cond, "timeline", None):
            raise MagnetError("a prompt timeline conditions a whole generation (the Sampler, generate_timeline): "
                              "here give plain prompts (Text Encode).")
        self.check_condition(cond)
        if cond.batch == 1 and rows > 1:
            cond = cond.select([0] * rows)
        _one_per_row(cond.batch, rows)
        return cond

    def prompt_list(self, prompts, rows: int | None = None) -> list:
        """A caller's prompts as a list, checked before the text encoder runs: a string is one prompt; with
        `rows` (rows of codes), one prompt serves every row, else there must be one per row. None, an empty
        list and anything but a string or a list/tuple are refused (an empty string generates
        unconditionally)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise MagnetError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}. "
                              f"Pass e.g. ['lofi hip hop beat'] (an empty string generates unconditionally).")
        if not prompts:
            raise MagnetError("no prompt given: pass at least one prompt (an empty string generates "
                              "unconditionally).")
        prompts = list(prompts)
        if rows is not None:
            prompts = prompts * rows if len(prompts) == 1 else prompts
            _one_per_row(len(prompts), rows)
        return prompts

    def check_codes(self, codes) -> torch.Tensor:
        """Finished codes handed in (from `generate` or `encode`): integer [B, K, T] or [K, T] of this model's
        codec, B and T at least 1 -> long [B, K, T]; else a MagnetError (`codes_arg`)."""
        return codes_arg(codes, self.cfg.n_q, self.cfg.card)

    def check_prompt_codes(self, prompt, batch: int, frames: int) -> torch.Tensor | None:
        """Prompt codes [batch or 1, K, P] (P < frames, codes of this codec) -> [batch, K, P]; None when absent
        or empty."""
        if prompt is None or (isinstance(prompt, torch.Tensor) and prompt.shape[-1] == 0):
            return None
        n_q, card = self.cfg.n_q, self.cfg.card
        if not isinstance(prompt, torch.Tensor) or prompt.is_floating_point():
            raise MagnetError("prompt must be integer codes [batch, codebooks, frames] (from model.encode).")
        if prompt.dim() == 2:
            prompt = prompt[None]
        if prompt.dim() != 3 or prompt.shape[1] != n_q:
            raise MagnetError(f"prompt codes have shape {tuple(prompt.shape)}; expected [batch, {n_q}, frames] "
                              f"from model.encode.")
        if prompt.shape[0] == 1 and batch > 1:
            prompt = prompt.expand(batch, -1, -1)
        if prompt.shape[0] != batch:
            raise MagnetError(f"{prompt.shape[0]} prompt audio clips for {batch} text prompts: give one clip, or "
                              f"one per text prompt.")
        if prompt.shape[-1] >= frames:
            raise MagnetError(f"the prompt audio ({prompt.shape[-1]} frames) is as long as the requested generation "
                              f"({frames} frames): ask for a longer duration or a shorter prompt.")
        if int(prompt.min()) < 0 or int(prompt.max()) >= card:
            raise MagnetError(f"prompt codes must lie in [0, {card}); they come from a different codec.")
        return prompt

    def encode_text(self, prompts: Sequence[str] | str) -> TextCondition:
        if self.text_encoder is None:
            raise MagnetError(f"no text encoder: pass text_encoder=<folder of {self.cfg.text_encoder}> to "
                              f"{type(self).__name__}.from_pretrained (or set ${TEXT_ENCODER_ENV}).")
        return self.text_encoder.encode(prompts)

    def _autocast(self):
        return autocast_for(self.device, self.dtype)

    # -- the generation boundary ----------------------------------------------------------------------
    # Every generation (generate, regenerate and the editing functions of magnet.edit) is a public method
    # taking prompts and seconds, a thin wrapper over its *_from_condition form taking an encoded text and
    # frames. Each form checks what its caller handed in once, before any work (the checks above, the
    # sampling parameters through `sampling_params`); then `seeded` makes the one seeded generator, records
    # the seed and enters autocast, and the decoding runs on the checked inputs without checking them again.
    # The *_from_condition forms return `Generated`; the public methods return its codes (`returned`).
    def seeded(self, seed, decode: Callable[[torch.Generator, int], torch.Tensor]) -> Generated:
        """Run `decode(generator, seed)` under the model's autocast, with one generator on the model's device
        seeded with `seed` (a fresh random seed when None; any whole number, wrapped to [0, 2^64)); the seed
        used comes back with the codes and is also kept as `last_seed`."""
        generator, used = sampling.make_generator(seed, self.device)
        self.last_seed = used
        with self._autocast():
            return Generated(decode(generator, used), used)

    @staticmethod
    def returned(out: Generated, return_seed: bool = False):
        """What a public generation method returns: the codes, or with return_seed=True the `Generated`."""
        return out if return_seed else out.codes

    def decode(self, codes: torch.Tensor, *, duration: float | None = None) -> torch.Tensor:
        """Codes [B, K, T] -> float32 waveform [B, C, samples] on the CPU (T * hop length samples).

        duration: seconds; the waveform is then made exactly round(duration * sample_rate) samples long
        (trimmed, or padded with silence at the end), e.g. to fit a video.
        """
        samples = None if duration is None else seconds_to_samples(duration, self.sample_rate)
        if samples is not None:
            check_fits(samples * self.channels * 4 * max(1, int(getattr(codes, "shape", [1])[0])),
                       f"a {duration:g} s waveform", torch.device("cpu"))
        if isinstance(codes, torch.Tensor) and codes.dim() == 3:
            # the decoder's last stage holds ~3 float32 buffers of num_filters channels at the full sample rate
            width = int(getattr(getattr(self.codec.model, "config", None), "num_filters", 64) or 64)
            nbytes = codes.shape[0] * codes.shape[-1] * self.codec.hop_length * width * 4 * 3
            check_fits(nbytes, f"decoding {codes.shape[-1] / self.frame_rate:g} s of codes (batch {codes.shape[0]})",
                       next(self.codec.parameters()).device)
        wav = self.codec.decode(codes).float().cpu()
        return wav if samples is None else fit_length(wav, samples)

    def encode(self, wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """Waveform [B, C, S] or [C, S] at any rate and channel count -> codes [B, K, T]
        (resampled to the codec's rate and mixed to its channels first)."""
        return self.codec.encode_audio(wav, sample_rate)


class MagnetModel(CodecLM):
    """A MAGNeT release ready to generate: `lm` (the transformer), `codec` (EnCodec) and
    `text_encoder` (T5, may be None until given).

    Besides `generate` and `regenerate`, a MagnetModel has the editing methods `vary`, `generate_loop`,
    `loopify`, `decode_loop` and `generate_timeline`: each runs the function of the same name in
    `magnet.edit` with this model (see there for the details)."""

    KIND = "magnet"
    KIND_ERROR = "{source} is a {kind} release, not MAGNeT: load it with MusicGenModel (or the MusicGen loader node)."

    # -- checks of what callers hand in ---------------------------------------------------------------
    def frames_for(self, duration: float | None) -> int:
        """Frames for `duration` seconds: int(duration * frame_rate), the release's window when None.

        Up to `max_frames` it is one window (the `nonoverlap` arrangement then trims the result to a
        multiple of the span length); beyond, `generate` slides the window and returns exactly this many.
        """
        if duration is None:
            return self.max_frames
        duration = seconds_arg(duration)
        frames = int(duration * self.frame_rate)
        if frames < max(2, self.cfg.span_len):
            raise MagnetError(f"duration {duration:g} s is too short: ask for at least "
                              f"{max(2, self.cfg.span_len) / self.frame_rate:g} s.")
        return frames

    def check_frames(self, frames) -> int:
        """A frame count handed to a *_from_condition form: a whole number from the shortest generation
        (2 frames, or one span) to MAX_SECONDS of frames."""
        least, most = max(2, self.cfg.span_len), int(MAX_SECONDS * self.frame_rate)
        try:
            if isinstance(frames, bool):
                raise TypeError
            n = operator.index(frames)
        except TypeError:
            raise MagnetError(f"frames {frames!r} must be a whole number of frames ({self.frame_rate} a "
                              f"second).") from None
        if not least <= n <= most:
            raise MagnetError(f"frames {n} must be from {least} to {most} ({least / self.frame_rate:g} s to "
                              f"{MAX_SECONDS:g} s at {self.frame_rate} frames a second).")
        return n

    def overlap_frames(self, overlap: float | None, span_arrangement: str = "nonoverlap") -> int:
        """Frames of context each window of a long generation continues from: `overlap` seconds
        (rounded to frames), or half the window when None. It must leave each window at least one span
        (3 frames) of new audio."""
        spans = SpanArrangement(span_arrangement, self.cfg.span_len)
        if overlap is None:
            return longform.default_overlap(spans.usable_window(self.max_frames))
        try:
            seconds = float(overlap)
        except (TypeError, ValueError):
            raise MagnetError(f"overlap {overlap!r} must be a number of seconds.") from None
        room = spans.room(self.max_frames)
        most = room / self.frame_rate
        if not (math.isfinite(seconds) and seconds >= 0):
            raise MagnetError(f"overlap {overlap!r} must be a number of seconds >= 0 (default: half the "
                              f"{self.segment_duration:g} s window).")
        frames = int(round(seconds * self.frame_rate))
        if frames > room:
            raise MagnetError(f"overlap {seconds:g} s leaves no new audio in this release's "
                              f"{self.segment_duration:g} s window: use at most {most:g} s (default: half "
                              f"the window, {self.segment_duration / 2:g} s).")
        return frames

    def sampling_params(self, params: SamplingParams | None = None, **fields) -> SamplingParams:
        """`params` (default: `SamplingParams()`, the release's own settings) with any of its fields given
        as keywords (temperature=..., decoding_steps=..., fast=...), checked (once: a checked object comes
        back as it is)."""
        names = {f.name for f in dataclasses.fields(SamplingParams) if f.init}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise MagnetError(f"unknown sampling argument(s) {', '.join(unknown)}: the sampling keywords are the "
                              f"fields of SamplingParams ({', '.join(sorted(names))}).")
        if params is None:
            params = SamplingParams()
        elif not isinstance(params, SamplingParams):
            raise MagnetError(f"params must be a SamplingParams, got {type(params).__name__}.")
        if fields:
            params = replace(params, **fields)
        return params.check(self.cfg.n_q, self.generation_defaults)

    def _region_frames(self, start, end, total: int, span_arrangement: str) -> tuple[int, int]:
        """Seconds [start, end) -> frames, widened outwards to whole frames, checked against the clip."""
        fr = self.frame_rate
        start, end = (finite_arg(v, f"region {name}", "number of seconds") for name, v in (("start", start),
                                                                                          ("end", end)))
        clip = total / fr
        if not start < end:
            raise MagnetError(f"region start {start:g} s must be before its end {end:g} s.")
        if start < 0 or end > clip + 1e-9:
            raise MagnetError(f"region {start:g}-{end:g} s is outside the clip (0-{clip:g} s): give a start "
                              f">= 0 and an end <= {clip:g} s.")
        a = int(math.floor(start * fr + 1e-6))
        b = min(int(math.ceil(end * fr - 1e-6)), total)
        room = SpanArrangement(span_arrangement, self.cfg.span_len).room(min(self.max_frames, total))
        if b - a > room:
            raise MagnetError(f"region {start:g}-{end:g} s ({(b - a) / fr:g} s) is longer than the window minus "
                              f"context: with this {'clip' if total < self.max_frames else 'release'} at most "
                              f"{max(room, 0) / fr:g} s can be regenerated at once; regenerate it in parts.")
        return a, b

    # -- generation ---------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str] | str, *, duration: float | None = None,
                 overlap: float | None = None, seed: int | None = None, prompt: torch.Tensor | None = None,
                 progress: sampling.Progress | None = None, rescorer: sampling.Rescorer | None = None,
                 params: SamplingParams | None = None, return_seed: bool = False,
                 **sampling_fields) -> torch.Tensor | Generated:
        """Generate codes [B, K, T] for B prompts (an empty prompt generates unconditionally).

        duration: seconds (default: the release's window). Within the window, one decoding; with
        span_arrangement='nonoverlap', T is then trimmed to a multiple of the span length (3 frames),
        exactly as the reference does. Beyond the window, the window slides: each next window continues
        from the last `overlap` seconds (default: half the window) of what exists, as prompt tokens, and
        T is exactly int(duration * frame_rate). See `magnet.longform`.
        prompt: codes [B or 1, K, P] kept unchanged at the start (continuation; see `encode`).
        progress(done, total) is called after every step, with one total over all windows; raising
        from it cancels. rescorer: an external model whose probabilities are mixed into the span ranking
        (see `sampling.Rescorer`).
        Sampling: `params` (a `SamplingParams`) and/or its fields as keywords: use_sampling, temperature,
        top_k, top_p, max_cfg_coef, min_cfg_coef, decoding_steps, span_arrangement, span_scoring (each left
        out: the release's own, as its xp.cfg stores it; see `SamplingParams`), fast (False = the exact
        mode, token-identical to the reference in greedy decoding; True or a `sampling.FastMode`: see
        `FastMode`).
        The seed used is kept as `last_seed`; return_seed=True returns `Generated(codes, seed)`.
        """
        params = self.sampling_params(params, **sampling_fields)
        frames = self.frames_for(duration)
        prompts = self.prompt_list(prompts)
        ov = self.overlap_frames(overlap, params.span_arrangement)       # a bad overlap fails before any work
        prompt = self.check_prompt_codes(prompt, len(prompts), frames)
        out = self._generate(self.encode_text(prompts), frames, params, ov, prompt, seed, progress, rescorer)
        return self.returned(out, return_seed)

    def generate_from_condition(self, cond: TextCondition, *, frames: int, params: SamplingParams | None = None,
                                seed: int | None = None, prompt: torch.Tensor | None = None,
                                progress: sampling.Progress | None = None,
                                rescorer: sampling.Rescorer | None = None,
                                overlap: float | None = None) -> Generated:
        """`generate` on an already encoded text and a frame count (what the ComfyUI sampler node calls).

        frames beyond the window (`max_frames`) slide it with `overlap` seconds of context (see `generate`);
        one seeded generator serves every window. A prompt timeline (a condition with a `timeline`:
        `edit.TimelineCondition`, from the Prompt Timeline node or `edit.encode_timeline`) runs
        `edit.generate_timeline_from_condition`.
        """
        if getattr(cond, "timeline", None):
            return edit.generate_timeline_from_condition(self, cond, frames=frames, params=params, seed=seed,
                                                         prompt=prompt, progress=progress, rescorer=rescorer,
                                                         overlap=overlap)
        cond = self.check_condition(cond)
        frames = self.check_frames(frames)
        params = self.sampling_params(params)
        ov = self.overlap_frames(overlap, params.span_arrangement)
        prompt = self.check_prompt_codes(prompt, cond.batch, frames)
        return self._generate(cond, frames, params, ov, prompt, seed, progress, rescorer)

    def _generate(self, cond, frames: int, params: SamplingParams, overlap: int, prompt, seed, progress,
                  rescorer) -> Generated:
        """The decoding of a checked generation (`overlap` in frames): one window, or the window slid."""
        def decode(generator, _seed):
            if frames <= self.max_frames:
                return sampling.generate(self.lm, cond, frames, params, prompt=prompt, generator=generator,
                                         progress=progress, rescorer=rescorer, decoding=self.decoding)
            return longform.generate_long(self.lm, cond, frames, params, window=self.max_frames, overlap=overlap,
                                          prompt=prompt, generator=generator, progress=progress,
                                          rescorer=rescorer, decoding=self.decoding)
        return self.seeded(seed, decode)

    def regenerate(self, codes: torch.Tensor, start: float, end: float, prompts: Sequence[str] | str, *,
                   seed: int | None = None, progress: sampling.Progress | None = None,
                   rescorer: sampling.Rescorer | None = None, params: SamplingParams | None = None,
                   return_seed: bool = False, **sampling_fields) -> torch.Tensor | Generated:
        """Regenerate seconds [start, end) of `codes` [B, K, T] (from `generate` or `encode`) and return
        new codes [B, K, T]: that range is masked in every codebook and decoded again conditioned on the
        audio on both sides (the model is bidirectional); every code outside it is returned bit-identical.

        start, end: seconds from the beginning of the clip, widened outwards to whole frames
        (1 / frame_rate = 20 ms). The region must lie inside the clip and be shorter than the window by at
        least one span (3 frames) of context; when the clip is longer than the window, the window is
        centred on the region and uses the context around it that fits. prompts: the text, one per row of
        `codes` (or one for all). `seed`, `progress`, `rescorer`, `return_seed` and the sampling (`params`
        and/or its fields as keywords, `fast` included) are as in `generate`.
        """
        params = self.sampling_params(params, **sampling_fields)
        codes, region = self._regeneration(codes, start, end, params)     # bad ranges fail before T5 runs
        cond = self.encode_text(self.prompt_list(prompts, codes.shape[0]))
        return self.returned(self._regenerate(cond, codes, region, params, seed, progress, rescorer), return_seed)

    def regenerate_from_condition(self, cond: TextCondition, codes: torch.Tensor, start: float, end: float, *,
                                  params: SamplingParams | None = None, seed: int | None = None,
                                  progress: sampling.Progress | None = None,
                                  rescorer: sampling.Rescorer | None = None) -> Generated:
        """`regenerate` on an already encoded text (one prompt for all rows, or one per row)."""
        params = self.sampling_params(params)
        codes, region = self._regeneration(codes, start, end, params)
        cond = self.condition_rows(cond, codes.shape[0])
        return self._regenerate(cond, codes, region, params, seed, progress, rescorer)

    def _regeneration(self, codes, start, end, params: SamplingParams) -> tuple[torch.Tensor, tuple[int, int]]:
        """The checks of a regeneration: the codes, and the region in frames."""
        codes = self.check_codes(codes)
        return codes, self._region_frames(start, end, codes.shape[-1], params.span_arrangement)

    def _regenerate(self, cond, codes, region: tuple[int, int], params, seed, progress, rescorer) -> Generated:
        a, b = region
        return self.seeded(seed, lambda generator, _seed: longform.regenerate_region(
            self.lm, cond, codes, a, b, params, window=self.max_frames, generator=generator, progress=progress,
            rescorer=rescorer, decoding=self.decoding))

    # -- LoRA (magnet/lora.py) ------------------------------------------------------------------------------
    def with_lora(self, lora, strength: float = 1.0) -> "MagnetModel":
        """A new model with a LoRA (a `.safetensors` path from `python -m magnet train`, or `lora.LoraWeights`)
        applied at `strength` (1 = as trained, 0 = the base exactly). It shares every weight the LoRA does not
        adapt with this model, which stays unchanged; call it again on the result to stack LoRAs. A LoRA made
        for another architecture, a damaged file or a non-finite strength raise MagnetError."""
        from . import lora as lora_mod
        return lora_mod.apply_lora(self, lora, strength)

    # -- editing (magnet.edit) ------------------------------------------------------------------------------
    def vary(self, codes: torch.Tensor, prompts: Sequence[str] | str, *, strength: float, keep_codebooks: int = 0,
             seed: int | None = None, params: SamplingParams | None = None, overlap: float | None = None,
             progress: sampling.Progress | None = None, rescorer: sampling.Rescorer | None = None,
             fast: bool | sampling.FastMode | None = None, return_seed: bool = False,
             **sampling_kwargs) -> torch.Tensor | Generated:
        """Audio to audio: `strength` (0..1) of the spans of `codes` drawn again with `prompts`, the rest kept
        as context (`edit.vary`)."""
        return edit.vary(self, codes, prompts, strength=strength, keep_codebooks=keep_codebooks, seed=seed,
                         params=params, overlap=overlap, progress=progress, rescorer=rescorer, fast=fast,
                         return_seed=return_seed, **sampling_kwargs)

    def generate_loop(self, prompts: Sequence[str] | str, *, duration: float | None = None,
                      bars: float | None = None, bpm: float | None = None, beats_per_bar: float = 4,
                      seed: int | None = None, params: SamplingParams | None = None,
                      progress: sampling.Progress | None = None, rescorer: sampling.Rescorer | None = None,
                      fast: bool | sampling.FastMode | None = None, return_seed: bool = False,
                      **sampling_kwargs) -> torch.Tensor | Generated:
        """A seamless loop of `duration` seconds (or `bars` bars at `bpm`) (`edit.generate_loop`)."""
        return edit.generate_loop(self, prompts, duration=duration, bars=bars, bpm=bpm,
                                  beats_per_bar=beats_per_bar, seed=seed, params=params, progress=progress,
                                  rescorer=rescorer, fast=fast, return_seed=return_seed, **sampling_kwargs)

    def loopify(self, codes: torch.Tensor, prompts: Sequence[str] | str, *, seed: int | None = None,
                params: SamplingParams | None = None, progress: sampling.Progress | None = None,
                rescorer: sampling.Rescorer | None = None, fast: bool | sampling.FastMode | None = None,
                return_seed: bool = False, **sampling_kwargs) -> torch.Tensor | Generated:
        """`codes` made into a seamless loop: the wrap-around join regenerated with both sides as context
        (`edit.loopify`)."""
        return edit.loopify(self, codes, prompts, seed=seed, params=params, progress=progress, rescorer=rescorer,
                            fast=fast, return_seed=return_seed, **sampling_kwargs)

    def decode_loop(self, codes: torch.Tensor, *, duration: float | None = None, repeats: int = 1) -> torch.Tensor:
        """The waveform of loop `codes`, decoded circularly, `repeats` times without a click
        (`edit.decode_loop`)."""
        return edit.decode_loop(self, codes, duration=duration, repeats=repeats)

    def generate_timeline(self, timeline, *, duration: float, seed: int | None = None,
                          overlap: float | None = None, params: SamplingParams | None = None,
                          prompt: torch.Tensor | None = None, progress: sampling.Progress | None = None,
                          rescorer: sampling.Rescorer | None = None, fast: bool | sampling.FastMode | None = None,
                          return_seed: bool = False, **sampling_kwargs) -> torch.Tensor | Generated:
        """Codes of `duration` seconds whose prompt changes along `timeline` ([(seconds, prompt)] or
        '0:00 prompt' lines) (`edit.generate_timeline`)."""
        return edit.generate_timeline(self, timeline, duration=duration, seed=seed, overlap=overlap, params=params,
                                      prompt=prompt, progress=progress, rescorer=rescorer, fast=fast,
                                      return_seed=return_seed, **sampling_kwargs)
