"""What a piece of audio sounds like, in words: zero-shot CLAP tags, tempo and key, and the caption made of them.

    from magnet.clap import ClapScorer
    from magnet.tagging import Tagger, analyse_file, caption_text
    tagger = Tagger(ClapScorer.from_pretrained("models/clap/larger_clap_music"))
    a = analyse_file(tagger, "song.wav")        # Analysis(seconds, tags, bpm, key)
    caption_text(a)          # "ambient, calm, dreamy, piano, synthesizer, instrumental, slow, 72 bpm, A minor"

Tags. CLAP (larger_clap_music, the pack's CLAP model) compares the audio with one text per label of the
vocabulary below (`VOCABULARY`: genres, moods, instruments, vocals or instrumental, tempo words), each label
put into its category's sentence ("{} music", "music with {}", ...). A file is heard in `WINDOW_SECONDS` (10 s,
the CLAP model's own window) windows: one per window length, evenly spread from start to end (they overlap when
the length is not a multiple of the window), at most `MAX_WINDOWS` (a longer file: that many, evenly spread);
silent windows are left out. Each window is normalised to -14 LUFS first (as the CLAP score does). A label's
similarity is the mean over the windows of the cosine between the window's audio embedding and the label's
text embedding; within a category the similarities go through a softmax at the model's own temperature
(`logit_scale_a`), so a label's score is its probability among its category's labels. A category contributes
its best label, then up to `keep - 1` more whose score is at least `RELATIVE_KEEP` (half) of the best one's.

Tempo and key come from librosa, an optional extra (`pip install "magnet-audio[prepare]"`, or `pip install
librosa`); without it they are left out (None) and `Tagger.tempo_and_key` is False. Tempo: librosa's
onset-strength tempo estimate on each window at least `MIN_TEMPO_SECONDS` long (at most `MAX_TEMPO_WINDOWS`
of them, evenly chosen), the median, rounded to a whole BPM. Key: the chroma of every window, summed over the
file, correlated with the 24 rotations of the Krumhansl-Kessler major and minor key profiles; the best is the
key ("A minor", "Eb major"; flats for the black keys except C# and F#), None when the file is shorter than
`MIN_KEY_SECONDS` or has no pitched content.

Caption: the tags in the vocabulary's order (genre, moods, instruments, vocals, tempo word), then "<bpm> bpm"
and the key when known, joined by ", ". A file is read one window at a time (seeking), never whole.
"""
from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from .errors import MagnetError, first_line

MAX_WINDOWS = 30            # windows heard per file (5 minutes of a longer one, evenly spread)
MAX_TEMPO_WINDOWS = 6       # windows the tempo is estimated on (the costlier librosa step)
MIN_TEMPO_SECONDS = 4.0     # a shorter window gives no tempo (too few beats)
MIN_KEY_SECONDS = 1.0       # a shorter file gives no key
RELATIVE_KEEP = 0.5         # a further label of a category is kept when its score is >= this x the best one's
WINDOW_SECONDS = 10.0       # a file is read in windows of at least this length (the CLAP model's own: 10 s)
ANALYSIS_RATE = 22050       # librosa's rate for tempo and key
SILENCE = 1e-4              # a window whose peak is below this (-80 dBFS) is left out
LIBROSA_HINT = 'pip install "magnet-audio[prepare]" (or pip install librosa)'


@dataclass(frozen=True)
class Category:
    """A set of labels of one kind. `template` makes the text CLAP compares the audio with (`prompts` overrides it
    for single labels); at most `keep` labels of the category go into a caption."""
    name: str
    labels: tuple[str, ...]
    template: str
    keep: int = 1
    prompts: Mapping[str, str] = field(default_factory=dict)

    def prompt(self, label: str) -> str:
        return self.prompts.get(label, self.template.format(label))


VOCABULARY: tuple[Category, ...] = (
    Category("genre", ("ambient", "blues", "cinematic", "classical", "country", "disco", "drum and bass", "dubstep",
                       "electronic", "folk", "funk", "hip hop", "house", "jazz", "latin", "lo-fi", "metal", "pop",
                       "punk", "r&b", "reggae", "rock", "soul", "techno", "trance"),
             "{} music", keep=1),
    Category("mood", ("aggressive", "calm", "dark", "dreamy", "energetic", "epic", "happy", "melancholic",
                      "mysterious", "peaceful", "playful", "romantic", "sad", "tense", "uplifting"),
             "{} music", keep=2),
    Category("instrument", ("acoustic guitar", "electric guitar", "bass guitar", "piano", "electric piano", "organ",
                            "synthesizer", "strings", "violin", "cello", "brass", "trumpet", "saxophone", "flute",
                            "drums", "drum machine", "percussion", "harp", "bells"),
             "music with {}", keep=3),
    Category("vocals", ("instrumental", "male vocals", "female vocals", "choir"),
             "music with {}", keep=1, prompts={"instrumental": "instrumental music without vocals"}),
    Category("tempo", ("slow", "medium tempo", "fast"),
             "{} music", keep=1, prompts={"medium tempo": "music at a medium tempo"}),
)

KEY_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
# Krumhansl & Kessler (1982) probe-tone ratings, tonic first
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


@dataclass
class Analysis:
    """What one file sounds like: its length, the tags kept per category ({label: score}), tempo and key."""
    seconds: float
    tags: dict[str, dict[str, float]]
    bpm: int | None = None
    key: str | None = None
    problem: str | None = None          # why tempo and key are missing although librosa is installed


def caption_text(a: Analysis) -> str:
    """The caption of an analysis: the tags in vocabulary order, then '<bpm> bpm' and the key when known."""
    words = [label for labels in a.tags.values() for label in labels]
    if a.bpm is not None:
        words.append(f"{a.bpm} bpm")
    if a.key:
        words.append(a.key)
    return ", ".join(words)


# ---------------------------------------------------------------------- librosa (optional)
def load_librosa():
    """(librosa, None), or (None, why) when it cannot be imported (not installed, or broken)."""
    try:
        import librosa
        librosa.onset.onset_strength        # noqa: B018  (lazy submodules: fail here, not mid-run)
        return librosa, None
    except ImportError:
        return None, "librosa is not installed"
    except Exception as e:                  # a broken install (numba, llvmlite ...)
        return None, f"librosa cannot be imported ({type(e).__name__}: {first_line(e)})"


def _tempo_fn(librosa):
    feature = getattr(librosa, "feature", None)
    fn = getattr(feature, "tempo", None) or getattr(getattr(feature, "rhythm", None), "tempo", None)
    return fn or librosa.beat.tempo         # librosa < 0.10


def estimate_tempo(librosa, windows: list[np.ndarray]) -> int | None:
    """Median of librosa's tempo estimates over the windows (mono float32 at ANALYSIS_RATE), a whole BPM."""
    long = [w for w in windows if len(w) >= MIN_TEMPO_SECONDS * ANALYSIS_RATE]
    if not long:
        return None
    pick = np.unique(np.round(np.linspace(0, len(long) - 1, min(len(long), MAX_TEMPO_WINDOWS))).astype(int))
    tempo = _tempo_fn(librosa)
    found = []
    for i in pick:
        env = librosa.onset.onset_strength(y=long[i], sr=ANALYSIS_RATE, hop_length=256)
        if not np.any(env > 0):
            continue
        bpm = float(np.asarray(tempo(onset_envelope=env, sr=ANALYSIS_RATE, hop_length=256)).reshape(-1)[0])
        if math.isfinite(bpm) and bpm > 0:
            found.append(bpm)
    return int(round(float(np.median(found)))) if found else None


def key_of_chroma(chroma: np.ndarray) -> str | None:
    """The Krumhansl-Schmuckler key of a 12-bin pitch-class profile (C first): the rotation of the major or minor
    profile it correlates with best. None for a flat (unpitched) profile."""
    chroma = np.asarray(chroma, dtype=np.float64).reshape(12)
    if not np.all(np.isfinite(chroma)) or np.ptp(chroma) <= 1e-9 * max(1.0, float(np.abs(chroma).max())):
        return None
    best, name = -2.0, None
    for mode, profile in (("major", MAJOR_PROFILE), ("minor", MINOR_PROFILE)):
        for tonic in range(12):
            r = float(np.corrcoef(chroma, np.roll(profile, tonic))[0, 1])
            if r > best:
                best, name = r, f"{KEY_NAMES[tonic]} {mode}"
    return name


def estimate_key(librosa, windows: list[np.ndarray]) -> str | None:
    """The key of the windows (mono float32 at ANALYSIS_RATE) from their chroma summed over time."""
    if sum(len(w) for w in windows) < MIN_KEY_SECONDS * ANALYSIS_RATE:
        return None
    total = np.zeros(12)
    for w in windows:
        n_fft = 4096 if len(w) >= 4096 else 1 << max(8, int(math.log2(max(len(w), 256))))
        c = librosa.feature.chroma_stft(y=w, sr=ANALYSIS_RATE, n_fft=n_fft, hop_length=n_fft // 2)
        total += np.nan_to_num(c).sum(axis=1)
    return key_of_chroma(total)


# ---------------------------------------------------------------------- the tagger
_TEXT_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class Tagger:
    """Tags, tempo and key of audio windows with one CLAP scorer (magnet.clap.ClapScorer) and the vocabulary.

    `loudness`: the LUFS each window is normalised to before CLAP hears it (-14, as the CLAP score; None: as
    recorded). `librosa`: True = use it when installed (tempo and key), False = never."""

    def __init__(self, scorer, vocabulary: tuple[Category, ...] = VOCABULARY, *, loudness: float | None = -14.0,
                 librosa: bool = True, batch_size: int = 8):
        self.scorer = scorer
        self.vocabulary = tuple(vocabulary)
        self.loudness = loudness
        self.batch_size = max(1, int(batch_size))
        self.librosa, self.librosa_problem = load_librosa() if librosa else (None, "librosa is turned off")
        scale = getattr(getattr(scorer, "model", None), "logit_scale_a", None)
        self.scale = float(torch.as_tensor(scale).detach().float().exp().clamp(1.0, 100.0)) if scale is not None \
            else 100.0
        self._text = self._text_embeddings()

    @property
    def tempo_and_key(self) -> bool:
        return self.librosa is not None

    def _text_embeddings(self) -> list[torch.Tensor]:
        """One [labels, D] tensor per category (computed once per scorer and vocabulary)."""
        key = tuple((c.name, tuple(c.prompt(lb) for lb in c.labels)) for c in self.vocabulary)
        try:
            cache = _TEXT_CACHE.setdefault(self.scorer, {})
        except TypeError:                   # a scorer that cannot be weakly referenced
            cache = {}
        if key not in cache:
            prompts = [p for _, ps in key for p in ps]
            emb = _short_text_embeddings(self.scorer, prompts)
            sizes = [len(ps) for _, ps in key]
            cache[key] = list(torch.split(emb, sizes))
        return cache[key]

    def window_frames(self, sample_rate: int) -> int:
        """Samples at `sample_rate` in one analysis window: a whole number of the model's windows, at least
        WINDOW_SECONDS (one window of the real models; a model with shorter windows hears several per analysis
        window), and never more once resampled to the model's rate."""
        n = max(1, math.ceil(WINDOW_SECONDS * self.scorer.sample_rate / self.scorer.window - 1e-9))
        return max(1, int(n * self.scorer.window * int(sample_rate) // int(self.scorer.sample_rate)))

    def tags(self, windows: list[np.ndarray], sample_rate: int) -> dict[str, dict[str, float]]:
        """{category: {label: score}} of mono windows at `sample_rate` (the labels kept, best first)."""
        total, count = None, 0
        for start in range(0, len(windows), self.batch_size):
            batch = [torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))[None]
                     for w in windows[start:start + self.batch_size]]
            for emb in self.scorer.audio_embeddings(batch, sample_rate, loudness=self.loudness,
                                                    batch_size=self.batch_size):
                s = emb.sum(dim=0)
                total = s if total is None else total + s
                count += emb.shape[0]
        audio = total / max(count, 1)                    # mean embedding: its dot products are the mean cosines
        out = {}
        for cat, text in zip(self.vocabulary, self._text):
            probs = torch.softmax(self.scale * (text @ audio), dim=0)
            order = torch.argsort(probs, descending=True, stable=True).tolist()
            best = float(probs[order[0]])
            kept = [order[0]] + [i for i in order[1:cat.keep] if float(probs[i]) >= RELATIVE_KEEP * best]
            out[cat.name] = {cat.labels[i]: round(float(probs[i]), 3) for i in kept}
        return out

    def analyse(self, windows: list[np.ndarray], sample_rate: int, seconds: float) -> Analysis:
        """Tags, tempo and key of a file's windows (mono float32 at `sample_rate`)."""
        tags = self.tags(windows, sample_rate)
        bpm = key = problem = None
        if self.librosa is not None:
            lr = self.librosa
            try:
                with warnings.catch_warnings(), np.errstate(all="ignore"):
                    warnings.simplefilter("ignore")
                    low = [lr.resample(np.ascontiguousarray(w, dtype=np.float32), orig_sr=int(sample_rate),
                                       target_sr=ANALYSIS_RATE, res_type="soxr_hq") if sample_rate != ANALYSIS_RATE
                           else np.ascontiguousarray(w, dtype=np.float32) for w in windows]
                    bpm = estimate_tempo(lr, low)
                    key = estimate_key(lr, low)
            except Exception as e:          # librosa failing on this audio: the tags still stand
                bpm = key = None
                problem = f"librosa failed on it ({type(e).__name__}: {first_line(e)})"
        return Analysis(seconds=seconds, tags=tags, bpm=bpm, key=key, problem=problem)


@torch.inference_mode()
def _short_text_embeddings(scorer, texts: list[str]) -> torch.Tensor:
    """scorer.text_embeddings(texts), padded to the longest text instead of laion's 77 tokens: the vocabulary's
    texts are a few tokens each, and the padding (masked out of the attention) changes nothing but the cost.
    A scorer without a tokenizer and model of its own is asked as it is."""
    from .clap import TEXT_MAX_TOKENS, _unit
    model, tokenizer = getattr(scorer, "model", None), getattr(scorer, "tokenizer", None)
    if model is None or tokenizer is None or not hasattr(model, "get_text_features"):
        return scorer.text_embeddings(texts)
    tok = tokenizer(texts, padding="longest", truncation=True, max_length=TEXT_MAX_TOKENS, return_tensors="pt")
    dev = scorer.device
    return _unit(model.get_text_features(input_ids=tok["input_ids"].to(dev),
                                         attention_mask=tok["attention_mask"].to(dev)))


# ---------------------------------------------------------------------- files
def read_windows(path: Path, window_frames, max_windows: int = MAX_WINDOWS) -> tuple[list[np.ndarray], int, float]:
    """(mono float32 windows of `window_frames(rate)` samples, the file's rate, its length in seconds): one window
    per window length, evenly spread from start to end, at most `max_windows`; a file up to one window long is one window.
    Each window is read by seeking (the file is never read whole). Silent windows are left out.
    Raises MagnetError when the file cannot be read, holds NaN/inf, or is silent."""
    import soundfile as sf
    try:
        f = sf.SoundFile(str(path))
    except Exception as e:                  # whatever libsndfile or the file system says
        raise MagnetError(f"cannot read it ({first_line(e) or type(e).__name__})") from None
    with f:
        sr, total = int(f.samplerate), int(f.frames)
        seconds = total / sr if sr > 0 else 0.0
        frames = int(window_frames(sr))
        if total <= 0:
            raise MagnetError("it holds no samples")
        if total <= frames:
            starts = [0]
            frames = total
        else:
            n = min(math.ceil(total / frames), max(1, int(max_windows)))
            starts = np.unique(np.round(np.linspace(0, total - frames, n)).astype(np.int64)).tolist()
        out = []
        for start in starts:
            try:
                f.seek(int(start))
                data = f.read(frames, dtype="float32", always_2d=True)
            except Exception as e:
                raise MagnetError(f"cannot read it ({first_line(e) or type(e).__name__})") from None
            if data.shape[0] == 0:
                continue
            mono = data.mean(axis=1, dtype=np.float32)
            if not np.all(np.isfinite(mono)):
                raise MagnetError("it holds NaN or infinite samples (a damaged file)")
            if float(np.abs(mono).max()) >= SILENCE:
                out.append(mono)
    if not out:
        raise MagnetError(f"it is silent (peak below {SILENCE:g})")
    return out, sr, seconds


def analyse_file(tagger: Tagger, path: str | Path) -> Analysis:
    """Tags, tempo and key of an audio file (see the module notes). MagnetError when it cannot be used."""
    windows, sr, seconds = read_windows(Path(path), tagger.window_frames)
    return tagger.analyse(windows, sr, seconds)
