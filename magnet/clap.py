"""CLAP text-audio scoring: how well a clip matches its text, and best-of-N ranking.

The CLAP score is the cosine similarity between a CLAP model's audio embedding and text
embedding; MAGNeT's paper reports its mean over the evaluation set. This module runs it on
transformers' `ClapModel` from a local folder (e.g. `laion/larger_clap_music`, the checkpoint
audiocraft's evaluation uses, or `laion/larger_clap_general` / `laion/clap-htsat-unfused` for general sound):

    from magnet.clap import ClapScorer
    scorer = ClapScorer.from_pretrained("models/clap/larger_clap_music")
    scores = scorer.score(wav, 32000, ["lofi hip hop beat", "calm piano"])   # [B] in [-1, 1]
    scores, order = scorer.rank(wav, 32000, "lofi hip hop beat")             # best first

The protocol follows audiocraft's `CLAPTextConsistencyMetric` (what the paper's numbers come from):

1. each clip is loudness-normalised to -14 LUFS and clipped to [-1, 1] (audiocraft normalises
   generated audio this way before every metric; `loudness=None` skips it);
2. downmixed to mono and resampled to the model's rate (48 kHz) with julius;
3. a clip up to the model's window (10 s) is one window, repeated and zero-padded to the window
   ("repeatpad", as laion_clap does); the log-mel spectrogram is the one the model was trained on
   (slaney mel for non-fusion models);
4. text is tokenized to at most 77 tokens (laion_clap's setting);
5. score = cosine similarity of the two embeddings; the dataset score is the plain mean over clips.

Where we differ: a clip longer than the window is cut into ceil(L / window) full windows, evenly
spaced from start to end (they overlap when L is not a multiple of the window), and its score is
the mean of the per-window cosine similarities. laion_clap (so audiocraft) instead scores one
random window-long crop; our mean is the expectation of that random score, without the
randomness. For clips up to 10 s (the paper's MusicCaps setting) the two are the same.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch

from . import compat
from .audio import _rate, check_waveform, resample
from .deps import require
from .devices import default_device, leaf_parameters
from .errors import MagnetError, first_line

PAPER_LOUDNESS_LUFS = -14.0
"""audiocraft's evaluation normalises generated audio to -14 LUFS before computing metrics."""
TEXT_MAX_TOKENS = 77
"""laion_clap tokenizes text to 77 tokens (padding and truncation), as CLIP does."""
SILENCE_PEAK = 1e-4
"""A clip whose peak is below this (-80 dBFS) is treated as silent and refused."""
_ENERGY_FLOOR = 2e-3
"""audiocraft leaves audio with an RMS below this unscaled when normalising loudness."""
_DOWNLOAD_HINT = ("`hf download laion/larger_clap_music --revision refs/pr/1 --local-dir {folder}` (music; for "
                  "general sound laion/larger_clap_general --revision refs/pr/2; these hub branches add the "
                  "model.safetensors that the main branches lack; `huggingface-cli download` with older "
                  "huggingface_hub)")


class Ranking(NamedTuple):
    """`scores[i]` is clip i's CLAP score; `order` lists clip indices best first (ties: lower index first)."""
    scores: torch.Tensor
    order: list[int]


class ClapScorer:
    """A transformers CLAP model (ClapModel + ClapProcessor) that scores audio against text."""

    def __init__(self, model, processor, device=None, name: str = "clap"):
        self.model = leaf_parameters(model.eval())   # every weight in a module of its own (ComfyUI moves those)
        self.feature_extractor = processor.feature_extractor
        self.tokenizer = processor.tokenizer
        self.name = name
        self.fusion = bool(getattr(model.config.audio_config, "enable_fusion", False))
        self.sample_rate = int(self.feature_extractor.sampling_rate)
        self.window = int(self.feature_extractor.nb_max_samples)
        if device is not None:
            self.model.to(device)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, folder: str | Path, device=None) -> "ClapScorer":
        """Load a transformers CLAP folder (config.json, model.safetensors, processor and tokenizer files).

        Weights are read from safetensors only; nothing is downloaded. `device`: None = CUDA, else MPS, else the CPU.
        """
        transformers = require("transformers")
        folder = Path(folder).expanduser()
        weights = _check_folder(folder)
        fix = f"Download the whole folder again with {_DOWNLOAD_HINT.format(folder=folder)}."
        compat.check_safetensors(weights, "CLAP weights", fix)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, info = transformers.ClapModel.from_pretrained(
                    str(folder), use_safetensors=True, local_files_only=True, trust_remote_code=False,
                    output_loading_info=True, **compat.dtype_kwargs(torch.float32))
        except MagnetError:
            raise
        except Exception as e:
            raise MagnetError(f"CLAP folder {folder} could not be loaded as a CLAP model ({first_line(e)}). "
                              f"The download may be incomplete: get it again with "
                              f"{_DOWNLOAD_HINT.format(folder=folder)}.") from None
        params = {n for n, _ in model.named_parameters()}
        missing = sorted(k for k in info.get("missing_keys", ()) if k in params)
        if missing:
            raise MagnetError(f"CLAP folder {folder}: model.safetensors lacks {len(missing)} weights of the model "
                              f"its config.json describes (e.g. {missing[:3]}). The files do not belong "
                              f"together: download the whole model folder again.")
        compat.check_finite(model.state_dict(), str(weights[0] if len(weights) == 1 else folder))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                processor = transformers.ClapProcessor.from_pretrained(str(folder), local_files_only=True,
                                                                       trust_remote_code=False)
        except MagnetError:
            raise
        except Exception as e:
            raise MagnetError(f"CLAP folder {folder} has no usable processor/tokenizer files ({first_line(e)}). "
                              f"It needs preprocessor_config.json and the tokenizer (tokenizer.json or "
                              f"vocab.json + merges.txt) beside the weights: download the whole folder with "
                              f"{_DOWNLOAD_HINT.format(folder=folder)}.") from None
        fe, tok = getattr(processor, "feature_extractor", None), getattr(processor, "tokenizer", None)
        if fe is None or tok is None or not hasattr(fe, "nb_max_samples"):
            raise MagnetError(f"CLAP folder {folder} lacks its audio feature extractor or tokenizer. Download "
                              f"the whole folder with {_DOWNLOAD_HINT.format(folder=folder)}.")
        mel_bins = int(model.config.audio_config.num_mel_bins)
        if int(fe.feature_size) != mel_bins:
            raise MagnetError(f"CLAP folder {folder}: the feature extractor makes {fe.feature_size} mel bands but "
                              f"the model expects {mel_bins}. The files do not belong together: download the "
                              f"whole model folder again.")
        if device is None:
            device = default_device()
        return cls(model, processor, device=device, name=folder.name)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "ClapScorer":
        self.model.to(device)
        return self

    # ------------------------------------------------------------------ embeddings
    @torch.inference_mode()
    def text_embeddings(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Texts -> unit-norm embeddings [T, D] (float32, CPU)."""
        texts = [_check_text(t, i) for i, t in enumerate(_text_list(texts))]
        if not texts:
            raise MagnetError("no text given: pass at least one prompt to score against.")
        tok = self.tokenizer(texts, padding="max_length", truncation=True, max_length=TEXT_MAX_TOKENS,
                             return_tensors="pt")
        dev = self.device
        out = self.model.get_text_features(input_ids=tok["input_ids"].to(dev),
                                           attention_mask=tok["attention_mask"].to(dev))
        return _unit(out)

    @torch.inference_mode()
    def audio_embeddings(self, wavs, sample_rate: int | Sequence[int], *,
                         loudness: float | None = PAPER_LOUDNESS_LUFS, batch_size: int = 16) -> list[torch.Tensor]:
        """Clips -> one [n_windows, D] tensor of unit-norm window embeddings per clip (float32, CPU).

        `wavs`: a tensor [B, C, S] or [C, S], or a list of [C, S] tensors of any lengths.
        `sample_rate`: one rate for all clips, or one per clip.
        """
        return self._embed_clips(self._prepare(wavs, sample_rate, loudness), batch_size)

    def _embed_clips(self, clips: list[np.ndarray], batch_size: int) -> list[torch.Tensor]:
        windows, owner = [], []
        for i, x in enumerate(clips):
            for w in _windows(x, self.window):
                windows.append(w)
                owner.append(i)
        embs = []
        batch_size = max(1, int(batch_size))
        for start in range(0, len(windows), batch_size):
            embs.append(self._embed_windows(windows[start:start + batch_size]))
        embs = torch.cat(embs)
        owner = torch.tensor(owner)
        return [embs[owner == i] for i in range(len(clips))]

    def _embed_windows(self, windows: list[np.ndarray]) -> torch.Tensor:
        feats = self.feature_extractor(windows, sampling_rate=self.sample_rate, padding="repeatpad",
                                       max_length=self.window,
                                       truncation="fusion" if self.fusion else "rand_trunc", return_tensors="pt")
        dev = self.device
        # every window fits the model's window, so none is "longer" (the extractor would otherwise mark
        # a random one as longer in fusion mode, a training-time trick)
        is_longer = torch.zeros(len(windows), 1, dtype=torch.bool, device=dev)
        out = self.model.get_audio_features(input_features=feats["input_features"].to(dev, torch.float32),
                                            is_longer=is_longer)
        return _unit(out)

    # ------------------------------------------------------------------ scores
    @torch.inference_mode()
    def score(self, wavs, sample_rate: int | Sequence[int], texts: str | Sequence[str], *,
              loudness: float | None = PAPER_LOUDNESS_LUFS, batch_size: int = 16) -> torch.Tensor:
        """CLAP score of each (clip, text) pair -> float32 tensor [B] in [-1, 1], on the CPU.

        `texts`: one text per clip, or a single text for all clips. `loudness`: LUFS target each clip is
        normalised to first, as in audiocraft's evaluation (-14); None scores the audio as it is.
        A clip longer than the model's window scores the mean over its windows.
        """
        texts = [_check_text(t, i) for i, t in enumerate(_text_list(texts))]
        clips = self._prepare(wavs, sample_rate, loudness)
        n = len(clips)
        if len(texts) == 1 and n > 1:
            texts = texts * n
        if len(texts) != n:
            raise MagnetError(f"{n} audio clips but {len(texts)} texts: give one text per clip, or a single "
                              f"text for all of them.")
        unique = list(dict.fromkeys(texts))
        text_emb = self.text_embeddings(unique)
        index = {t: i for i, t in enumerate(unique)}
        audio_emb = self._embed_clips(clips, batch_size)
        scores = [(a @ text_emb[index[t]]).mean() for a, t in zip(audio_emb, texts)]
        return torch.stack(scores).clamp(-1.0, 1.0)

    def rank(self, wavs, sample_rate: int | Sequence[int], text: str, *,
             loudness: float | None = PAPER_LOUDNESS_LUFS, batch_size: int = 16) -> Ranking:
        """Score a batch of variations against one prompt -> Ranking(scores [B], order best first)."""
        if not isinstance(text, str):
            raise MagnetError(f"rank takes one prompt (a string), got {type(text).__name__}. To score each clip "
                              f"against its own text, use score().")
        scores = self.score(wavs, sample_rate, text, loudness=loudness, batch_size=batch_size)
        order = torch.sort(scores, descending=True, stable=True).indices.tolist()
        return Ranking(scores, order)

    # ------------------------------------------------------------------ input
    def _prepare(self, wavs, sample_rate, loudness) -> list[np.ndarray]:
        """Check, loudness-normalise, downmix and resample -> list of float32 mono arrays at the model rate."""
        if isinstance(wavs, torch.Tensor):
            check_waveform(wavs, "audio to score")
            items = list(wavs) if wavs.dim() == 3 else [wavs]
        elif isinstance(wavs, (list, tuple)):
            items = list(wavs)
            if not items:
                raise MagnetError("no audio given: pass at least one clip to score.")
            for i, w in enumerate(items):
                check_waveform(w, f"audio clip {i}")
                if w.dim() != 2:
                    raise MagnetError(f"audio clip {i} has shape {tuple(w.shape)}; in a list each clip is "
                                      f"[channels, samples]. Pass a batch as one [B, C, S] tensor instead.")
        else:
            raise MagnetError(f"audio to score must be a tensor [B, C, S] / [C, S] or a list of [C, S] tensors, "
                              f"got {type(wavs).__name__}.")
        if isinstance(sample_rate, (list, tuple)):
            if len(sample_rate) != len(items):
                raise MagnetError(f"{len(items)} audio clips but {len(sample_rate)} sample rates: give one rate "
                                  f"for all clips or one per clip.")
            rates = [_rate(r, "sample_rate") for r in sample_rate]
        else:
            rates = [_rate(sample_rate, "sample_rate")] * len(items)
        out = []
        for i, (w, sr) in enumerate(zip(items, rates)):
            w = w.detach().to("cpu", torch.float32)
            peak = float(w.abs().max())
            if peak < SILENCE_PEAK:
                level = "digital silence" if peak == 0 else f"peak {20 * math.log10(peak):.0f} dBFS"
                raise MagnetError(f"audio clip {i} is silent ({level}): a CLAP score says how well sound matches "
                                  f"a text, and silence has none. Check that the right audio was passed.")
            if loudness is not None:
                w = _normalize_like_audiocraft(w, sr, loudness)
            mono = resample(w.mean(dim=0), sr, self.sample_rate)
            if mono.numel() == 0:
                raise MagnetError(f"audio clip {i} is too short to score ({w.shape[-1]} samples at {sr} Hz). "
                                  f"Give at least a few milliseconds of audio.")
            out.append(mono.numpy().astype(np.float32, copy=False))
        return out


# ---------------------------------------------------------------------- helpers
def _windows(x: np.ndarray, window: int) -> list[np.ndarray]:
    """A clip -> itself if it fits one window, else ceil(L / window) full windows evenly spaced over it."""
    length = x.shape[0]
    if length <= window:
        return [x]
    n = math.ceil(length / window)
    starts = np.round(np.linspace(0, length - window, n)).astype(np.int64)
    return [x[s:s + window] for s in starts]


def _normalize_like_audiocraft(wav: torch.Tensor, sample_rate: int, lufs: float) -> torch.Tensor:
    """audiocraft's `normalize_audio(strategy='loudness')`: gain to `lufs`, then clip to [-1, 1].

    Audio with an RMS below 2e-3, or whose loudness cannot be measured, is left as it is.
    """
    from .audio import normalize_loudness

    if float(wav.pow(2).mean().sqrt()) < _ENERGY_FLOOR:
        return wav
    # no peak guard: audiocraft clips instead of lowering the gain
    return normalize_loudness(wav, sample_rate, lufs, peak=float("inf")).clamp(-1.0, 1.0)


def _unit(out) -> torch.Tensor:
    """get_*_features output (a tensor in transformers 4, a model output in 5) -> unit-norm float32 CPU."""
    emb = out if isinstance(out, torch.Tensor) else out.pooler_output
    return torch.nn.functional.normalize(emb.float(), dim=-1).cpu()


def _text_list(texts) -> list:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (list, tuple)):
        return list(texts)
    raise MagnetError(f"texts must be a string or a list of strings, got {type(texts).__name__}.")


def _check_text(t, i: int) -> str:
    if not isinstance(t, str):
        raise MagnetError(f"text {i} ({t!r}) is not a string: CLAP scores audio against text prompts.")
    if not t.strip():
        raise MagnetError(f"text {i} is empty: a CLAP score needs the prompt the audio should match. "
                          f"Give the description used to generate it.")
    return t


def _check_folder(folder: Path) -> list[Path]:
    """The folder's safetensors weights, after checking config.json (a CLAP model, no custom code)."""
    if not folder.exists():
        raise MagnetError(f"CLAP model folder not found: {folder}. Download one there, e.g. "
                          f"{_DOWNLOAD_HINT.format(folder=folder)}.")
    if not folder.is_dir():
        raise MagnetError(f"{folder} is a file; give the CLAP model folder (holding config.json, "
                          f"model.safetensors and the processor files).")
    fix = f"Download a CLAP folder such as laion/larger_clap_music with {_DOWNLOAD_HINT.format(folder=folder)}."
    if not (folder / "config.json").is_file():
        raise MagnetError(f"{folder} has no config.json: it is not a transformers CLAP model folder. Point to the "
                          f"folder holding config.json, model.safetensors and the processor files, or download "
                          f"one with {_DOWNLOAD_HINT.format(folder=folder)}.")
    compat.read_config(folder, "CLAP model folder", ("clap",), "CLAP", fix)
    weights = compat.safetensors_files(folder)
    if not weights:
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        extra = (f" It holds only pickle weights ({', '.join(sorted(pickles)[:2])}), which are never loaded: "
                 f"get the model.safetensors of the same model (the laion repositories have it on a pull-request "
                 f"branch, not on main)." if pickles else "")
        raise MagnetError(f"{folder} has no model.safetensors.{extra} Download the safetensors weights, e.g. "
                          f"{_DOWNLOAD_HINT.format(folder=folder)}.")
    return weights
