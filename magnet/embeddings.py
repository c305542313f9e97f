"""Embeddings of audio sets, the FAD between two sets, and the CLAP score of a generated set.

    from magnet import embeddings
    r = embeddings.fad_between("musiccaps/", "out/", embedding="clap", clap="models/clap/larger_clap_music")
    r["fad"], r.get("fad_inf"), r.get("outliers")
    r = embeddings.fad_between("musiccaps.npz", "out/", embedding="encodec",
                               model="models/magnet/magnet-small-10secs")
    s = embeddings.clap_score_outputs("out/", "prompts.txt", "models/clap/larger_clap_music")
    s["mean"], s["std"], s["per_file"]

The entry points (what `python -m magnet evaluate` calls):

- `fad_between(ref, gen, embedding="clap", *, model=None, clap=None, codec_dir=None, loudness=-14.0,
  device=None, save_ref_stats=None, save_gen_stats=None, outliers=5, progress=None) -> dict` for
  `evaluate --fad REF GEN [--embedding clap|encodec] [--model DIR] [--clap DIR] [--save-stats FILE]`:
  REF and GEN are each a folder of audio or a .npz statistics file (`metrics.save_stats`). The dict:
  `fad`, `embedding` (the identity both sets share), `ref_count` / `gen_count` (clips), `ref_rows` /
  `gen_rows` (embedding rows), `skipped` (unreadable files); `fad_inf` (a number) with `fad_inf_fit`
  (slope, r2, sizes, fads) when GEN is a folder and both sets have >= 50 clips; `outliers`
  ([{"file", "distance"}], farthest first) when GEN is a folder. JSON-ready (plain numbers, strings, lists).
- `clap_score_outputs(folder, prompts, clap, *, loudness=-14.0, batch_size=16, device=None) -> dict` for
  `evaluate --clap GEN --prompts FILE`: the clips of a set made by `batch.generate_set`, paired with their
  prompts by the same names (`batch.pair_outputs`); `clap_score_set(files, prompts, clap, ...)` for any
  files with one prompt each. The dict: `mean`, `std` (over clips, divisor N), `count`, `per_file`
  ([{"file", "prompt", "score"}]), `skipped` ([{"file", "reason"}]), `clap` (the model's folder name).
- `folder_stats(folder, embedding, ...) -> SetStats`, `embed_folder(folder, embedder) -> (clips, names)`
  and `make_embedder(embedding, ...)` for scripts.

The embeddings:

- `clap`: a transformers CLAP model's audio embeddings (`magnet.clap.ClapScorer`, unit norm), one per 10 s
  window of each clip (the scorer's windows: a clip up to the window is one window, repeat-padded; longer
  ones ceil(L / window) evenly spaced windows), after the scorer's preparation: loudness-normalised as
  audiocraft does (to `loudness`, default -14 LUFS; None = as is), mono, at CLAP's rate (48 kHz). A silent
  clip is embedded as silence (the CLAP score refuses it, a distance between sets counts it).
- `encodec`: the release codec's encoder output (the latents before quantization, one row per 20 ms frame
  at 50 frames/s; width 128 for the released codecs), after the same loudness normalisation, converted to
  the codec's rate and channels. The model argument: a release folder or converted file (only its codec is
  read), a transformers EnCodec folder, a loaded `MagnetModel` or `Codec`.

A set's embeddings are all rows of all its clips (`metrics.set_stats`). Each embedding has an identity
string, "clap:<hash>@-14LUFS" / "encodec:<hash>@-14LUFS" (a hash of the model's configuration and weights
and of how the audio is prepared, and the loudness): statistics are compared only under the same identity.
Files of a folder: its top-level files with an audio extension soundfile reads, in name order (hidden files,
e.g. temporary ones, skipped); a file that cannot be read is skipped with a warning naming it.

These numbers compare settings on the same sets; the paper's table uses VGGish (FAD), PaSST (KL) and LAION
CLAP on MusicCaps, so ours are not to be quoted beside it.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from . import metrics
from .errors import MagnetError, first_line

EMBEDDINGS = ("clap", "encodec")
DEFAULT_LOUDNESS = -14.0
"""As `clap.PAPER_LOUDNESS_LUFS`: audiocraft normalises audio to -14 LUFS before every metric."""
_READ_CHUNK = 16           # files read and embedded together
_PROTOCOL = "v1"           # bump when the preparation of the audio changes: old statistics are then refused


def _tag(loudness) -> str:
    return "@as-is" if loudness is None else f"@{float(loudness):g}LUFS"


def _weights_hash(h, named: Sequence[tuple[str, torch.Tensor]]) -> None:
    for name, t in named:
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())


class EncodecEmbedding:
    """The codec encoder's latents per frame: `embed(wav [C, S], sample_rate) -> [frames, D]` float32."""
    kind = "encodec"

    def __init__(self, codec, loudness: float | None = DEFAULT_LOUDNESS):
        self.codec = codec
        self.loudness = _check_loudness(loudness)
        self._identity = None

    @property
    def identity(self) -> str:
        if self._identity is None:
            h = hashlib.sha256(f"encodec-encoder-latents:{_PROTOCOL}".encode())
            h.update(self.codec.model.config.to_json_string().encode())
            _weights_hash(h, sorted(self.codec.model.encoder.state_dict().items()))
            self._identity = f"encodec:{h.hexdigest()[:16]}{_tag(self.loudness)}"
        return self._identity

    def embed(self, wav: torch.Tensor, sample_rate: int) -> np.ndarray:
        from .audio import check_waveform, convert_audio
        from .clap import _normalize_like_audiocraft
        wav = check_waveform(wav, "audio to embed").float()
        if self.loudness is not None:
            wav = _normalize_like_audiocraft(wav, sample_rate, self.loudness)
        x = convert_audio(wav, sample_rate, self.codec.sample_rate, self.codec.channels)
        param = next(self.codec.model.parameters())
        with torch.inference_mode():
            z = self.codec.model.encoder(x[None].to(param.device, param.dtype))     # [1, D, frames]
        return z[0].float().cpu().numpy().T.copy()

    def embed_many(self, clips: Sequence[tuple[torch.Tensor, int]]) -> list[np.ndarray]:
        return [self.embed(w, sr) for w, sr in clips]


class ClapEmbedding:
    """CLAP audio embeddings per window: `embed(wav [C, S], sample_rate) -> [windows, D]` float32."""
    kind = "clap"

    def __init__(self, scorer, loudness: float | None = DEFAULT_LOUDNESS, batch_size: int = 16):
        self.scorer = scorer
        self.loudness = _check_loudness(loudness)
        self.batch_size = max(1, int(batch_size))
        self._identity = None

    @property
    def identity(self) -> str:
        if self._identity is None:
            h = hashlib.sha256(f"clap-audio-windows:{_PROTOCOL}".encode())
            h.update(self.scorer.model.config.to_json_string().encode())
            h.update(self.scorer.feature_extractor.to_json_string().encode())
            _weights_hash(h, sorted((k, v) for k, v in self.scorer.model.state_dict().items()
                                    if k.startswith("audio")))
            self._identity = f"clap:{h.hexdigest()[:16]}{_tag(self.loudness)}"
        return self._identity

    def embed(self, wav: torch.Tensor, sample_rate: int) -> np.ndarray:
        return self.embed_many([(wav, sample_rate)])[0]

    def embed_many(self, clips: Sequence[tuple[torch.Tensor, int]]) -> list[np.ndarray]:
        from .audio import check_waveform
        from .clap import SILENCE_PEAK
        scorer = self.scorer
        mono = []
        for wav, sr in clips:
            wav = check_waveform(wav, "audio to embed").float()
            if float(wav.abs().max()) < SILENCE_PEAK:       # the scorer refuses silence; a set counts it
                n = max(1, round(wav.shape[-1] * scorer.sample_rate / int(sr)))
                mono.append(np.zeros(n, dtype=np.float32))
            else:
                mono.extend(scorer._prepare([wav], sr, self.loudness))
        with torch.inference_mode():
            embs = scorer._embed_clips(mono, self.batch_size)
        return [e.numpy().astype(np.float32) for e in embs]


def make_embedder(embedding: str = "clap", *, model=None, clap=None, codec_dir=None,
                  loudness: float | None = DEFAULT_LOUDNESS, device=None, batch_size: int = 16):
    """An embedder by name. clap: `clap` is a ClapScorer or a transformers CLAP folder. encodec: `model`
    is a release folder / converted file, a transformers EnCodec folder, a MagnetModel or a Codec."""
    name = _embedding_name(embedding)
    if name == "clap":
        if clap is None:
            raise MagnetError("the clap embedding needs a CLAP model: give its folder (--clap DIR, e.g. "
                              "models/clap/larger_clap_music), or use --embedding encodec with --model.")
        from .clap import ClapScorer
        scorer = clap if isinstance(clap, ClapScorer) else ClapScorer.from_pretrained(clap, device=device)
        return ClapEmbedding(scorer, loudness, batch_size)
    if model is None:
        raise MagnetError("the encodec embedding needs the release whose codec embeds the audio: give its folder "
                          "(--model DIR), or use --embedding clap with --clap.")
    return EncodecEmbedding(load_codec(model, codec_dir=codec_dir, device=device), loudness)


def load_codec(model, *, codec_dir=None, device=None):
    """The Codec of `model` (see `make_embedder`); loaded from a path onto `device` (default: CUDA if
    present, else the CPU; the CPU for MPS)."""
    from .codec import Codec
    if isinstance(model, Codec):
        return model
    if isinstance(getattr(model, "codec", None), Codec):
        return model.codec
    if not isinstance(model, (str, os.PathLike)):
        raise MagnetError(f"model must be a release folder, an EnCodec folder or a loaded model, got "
                          f"{type(model).__name__}.")
    from .checkpoints import CODEC_FILE, load_release
    from .devices import codec_device, parse_device
    p = Path(model).expanduser()
    if p.is_dir() and (p / CODEC_FILE).is_file():
        codec = Codec.from_release_file(p / CODEC_FILE, codec_dir=codec_dir)
    elif p.is_dir() and (p / "config.json").is_file():
        codec = Codec.from_transformers_folder(p)
    else:
        codec = load_release(p, codec_dir=codec_dir).codec
    return codec.to(codec_device(parse_device(device)))


# ---------------------------------------------------------------------- folders
def audio_files(folder: str | Path) -> list[Path]:
    """The audio files directly in `folder`, in name order (hidden files skipped)."""
    from .dataset import audio_extensions
    folder = Path(folder)
    if not folder.is_dir():
        raise MagnetError(f"{folder} is not a folder: give a folder of audio files"
                          f"{'' if folder.exists() else ' (it does not exist)'}.")
    exts = audio_extensions()
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts)
    if not files:
        raise MagnetError(f"{folder} holds no audio files ({', '.join(sorted(exts)[:6])}, ...): give the folder "
                          f"of the clips (its own files; sub-folders are not read).")
    return files


def embed_files(files: Sequence[Path], embedder, *, skipped: list | None = None,
                progress: Callable[[int, int], None] | None = None) -> tuple[list[np.ndarray], list[str]]:
    """Embed each readable file: (one [rows, D] float32 array per clip, their file names). A file that
    cannot be read (or embedded) is skipped with a warning and listed in `skipped` as {file, reason}."""
    from .audio import read_audio
    clips, names = [], []
    files = list(files)
    for start in range(0, len(files), _READ_CHUNK):
        chunk = []
        for f in files[start:start + _READ_CHUNK]:
            try:
                wav, sr = read_audio(f)
                chunk.append((Path(f), wav, sr))
            except MagnetError as e:
                _skip(f, first_line(e), skipped)
        try:
            embs = embedder.embed_many([(w, sr) for _, w, sr in chunk])
        except (MagnetError, RuntimeError):
            embs = []                          # find the file the model refused, one at a time
            for f, w, sr in chunk:
                try:
                    embs.append(embedder.embed(w, sr))
                except (MagnetError, RuntimeError) as e:
                    _skip(f, first_line(e), skipped)
                    embs.append(None)
        for (f, _, _), e in zip(chunk, embs):
            if e is not None:
                clips.append(e)
                names.append(f.name)
        if progress is not None:
            progress(min(start + _READ_CHUNK, len(files)), len(files))
    return clips, names


def embed_folder(folder: str | Path, embedding="clap", *, skipped: list | None = None,
                 progress: Callable[[int, int], None] | None = None, **embedder_kwargs
                 ) -> tuple[list[np.ndarray], list[str]]:
    """(one [rows, D] array per clip, file names) of a folder's audio (see the module). `embedding`: an
    embedder, or its name with `make_embedder`'s keywords."""
    embedder = embedding if hasattr(embedding, "embed_many") else make_embedder(embedding, **embedder_kwargs)
    return embed_files(audio_files(folder), embedder, skipped=skipped, progress=progress)


def folder_stats(folder: str | Path, embedding="clap", **kwargs) -> metrics.SetStats:
    """The statistics of a folder's embeddings (for `metrics.save_stats`)."""
    embedder = embedding if hasattr(embedding, "embed_many") else make_embedder(
        embedding, **{k: v for k, v in kwargs.items() if k not in ("skipped", "progress")})
    clips, _ = embed_folder(folder, embedder, skipped=kwargs.get("skipped"), progress=kwargs.get("progress"))
    return metrics.set_stats(clips, embedder.identity, f"{folder}")


def fad_between(ref, gen, embedding: str = "clap", *, model=None, clap=None, codec_dir=None,
                loudness: float | None = DEFAULT_LOUDNESS, device=None, save_ref_stats=None, save_gen_stats=None,
                outliers: int = 5, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """FAD between REF and GEN, each a folder of audio or a .npz statistics file (see the module).
    progress(which, done, total) while a folder is embedded ('REF' or 'GEN')."""
    name = _embedding_name(embedding)
    sides = {"REF": _side(ref, "REF"), "GEN": _side(gen, "GEN")}
    for label, path in (("REF", save_ref_stats), ("GEN", save_gen_stats)):
        if path is not None and sides[label][0] != "folder":
            raise MagnetError(f"{label} is already a statistics file ({sides[label][1]}): only a folder's statistics "
                              f"can be saved.")
        if path is not None and Path(path).suffix.lower() != ".npz":
            raise MagnetError(f"statistics file {path}: give a name ending in .npz.")
    embedder = None
    if any(kind == "folder" for kind, _ in sides.values()):
        embedder = make_embedder(name, model=model, clap=clap, codec_dir=codec_dir, loudness=loudness,
                                 device=device)
    stats, clips, names, skipped = {}, {}, {}, []
    for label, (kind, path) in sides.items():        # statistics files first: a mismatch fails before any work
        if kind == "stats":
            s = metrics.load_stats(path, embedder.identity if embedder is not None else None)
            if s.embedding.split(":")[0] != name:
                raise MagnetError(f"{label} ({path}) holds statistics of the {s.embedding.split(':')[0]} embedding "
                                  f"({s.embedding}), not {name}: choose --embedding "
                                  f"{s.embedding.split(':')[0]}, or make the file again with {name}.")
            stats[label] = s
    for label, (kind, path) in sides.items():
        if kind == "folder":
            tick = (lambda d, t, lab=label: progress(lab, d, t)) if progress is not None else None
            clips[label], names[label] = embed_folder(path, embedder, skipped=skipped, progress=tick)
            stats[label] = metrics.set_stats(clips[label], embedder.identity, f"{label} ({path})")
    ref_s, gen_s = stats["REF"], stats["GEN"]
    metrics.check_same_embedding(ref_s, gen_s)
    if save_ref_stats is not None:
        metrics.save_stats(save_ref_stats, ref_s)
    if save_gen_stats is not None:
        metrics.save_stats(save_gen_stats, gen_s)
    out = {"fad": metrics.fad(ref_s, gen_s), "embedding": ref_s.embedding, "ref_count": ref_s.clips,
           "gen_count": gen_s.clips, "ref_rows": ref_s.count, "gen_rows": gen_s.count, "skipped": skipped}
    if "GEN" in clips:
        if min(ref_s.clips, gen_s.clips) >= metrics.FAD_INF_MIN_CLIPS:
            inf = metrics.fad_inf(ref_s, clips["GEN"])
            out["fad_inf"] = inf.score
            out["fad_inf_fit"] = {"slope": inf.slope, "r2": inf.r2, "sizes": inf.sizes, "fads": inf.fads}
        if outliers:
            out["outliers"] = [{"file": f, "distance": d}
                               for f, d in metrics.farthest_clips(ref_s, clips["GEN"], names["GEN"], outliers)]
    return out


# ---------------------------------------------------------------------- CLAP score of a set
def clap_score_set(files: Sequence, prompts: Sequence[str], clap, *, loudness: float | None = DEFAULT_LOUDNESS,
                   batch_size: int = 16, device=None) -> dict:
    """CLAP score of each file against its prompt, and their mean and standard deviation (see the module).
    `clap`: a ClapScorer or a transformers CLAP folder. Unreadable or silent files and empty prompts are
    skipped with a warning (listed in `skipped`)."""
    from .audio import read_audio
    from .clap import SILENCE_PEAK, ClapScorer
    files = [Path(f) for f in files]
    if isinstance(prompts, str):
        prompts = [prompts] * len(files)
    prompts = list(prompts)
    if len(prompts) != len(files):
        raise MagnetError(f"{len(files)} files but {len(prompts)} prompts: give one prompt per file (or one for all).")
    if not files:
        raise MagnetError("no files to score: give at least one generated clip.")
    _check_loudness(loudness)
    scorer = clap if isinstance(clap, ClapScorer) else ClapScorer.from_pretrained(clap, device=device)
    per_file, skipped = [], []
    for start in range(0, len(files), _READ_CHUNK):
        wavs, rates, texts, which = [], [], [], []
        for f, text in zip(files[start:start + _READ_CHUNK], prompts[start:start + _READ_CHUNK]):
            if not isinstance(text, str) or not text.strip():
                _skip(f, "no prompt to score against (generated unconditionally)", skipped)
                continue
            try:
                wav, sr = read_audio(f)
            except MagnetError as e:
                _skip(f, first_line(e), skipped)
                continue
            if not bool(torch.isfinite(wav).all()) or float(wav.abs().max()) < SILENCE_PEAK:
                _skip(f, "silent or damaged audio: it has no CLAP score", skipped)
                continue
            wavs.append(wav)
            rates.append(sr)
            texts.append(text)
            which.append(f)
        if wavs:
            scores = scorer.score(wavs, rates, texts, loudness=loudness, batch_size=batch_size).tolist()
            per_file += [{"file": f.name, "prompt": t, "score": s} for f, t, s in zip(which, texts, scores)]
    if not per_file:
        raise MagnetError(f"none of the {len(files)} files could be scored ({skipped[0]['reason'] if skipped else ''}): "
                          f"give readable, non-silent clips with their prompts.")
    values = np.array([p["score"] for p in per_file], dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std()), "count": len(per_file), "per_file": per_file,
            "skipped": skipped, "clap": scorer.name}


def clap_score_outputs(folder: str | Path, prompts, clap, **kwargs) -> dict:
    """`clap_score_set` on the clips of a set generated by `batch.generate_set` into `folder`, each paired
    with its prompt by its name. `prompts`: the prompts file (or its jobs, `batch.read_prompt_file`)."""
    from . import batch
    jobs = batch.read_prompt_file(prompts) if isinstance(prompts, (str, os.PathLike)) else prompts
    pairs = batch.pair_outputs(jobs, folder)
    if not pairs:
        raise MagnetError(f"{folder} holds no clips named as generate --prompts names them ({jobs[0].stem}_0.wav, "
                          f"...): give the folder the set was generated into, with the same prompts file.")
    return clap_score_set([p for p, _, _ in pairs], [job.prompt for _, job, _ in pairs], clap, **kwargs)


# ---------------------------------------------------------------------- helpers
def _embedding_name(embedding) -> str:
    name = str(embedding).strip().lower()
    if name not in EMBEDDINGS:
        raise MagnetError(f"embedding {embedding!r}: choose {' or '.join(EMBEDDINGS)}.")
    return name


def _side(x, label: str) -> tuple[str, Path]:
    if not isinstance(x, (str, os.PathLike)):
        raise MagnetError(f"{label} must be a folder of audio or a .npz statistics file, got {type(x).__name__}.")
    p = Path(x).expanduser()
    if p.is_dir():
        return "folder", p
    if p.is_file() and p.suffix.lower() == ".npz":
        return "stats", p
    if p.is_file():
        raise MagnetError(f"{label} {p} is a file but not a .npz statistics file: give a folder of audio or a "
                          f".npz made with --save-stats.")
    raise MagnetError(f"{label} {p} does not exist: give a folder of audio or a .npz statistics file.")


def _check_loudness(loudness):
    if loudness is None:
        return None
    from .audio import _lufs
    return _lufs(loudness, "loudness")


def _skip(f, reason: str, skipped: list | None) -> None:
    warnings.warn(f"skipped {f}: {reason}")
    if skipped is not None:
        skipped.append({"file": str(f), "reason": reason})

