"""A folder of audio as training data: files -> codec tokens (cached) + captions, and random training windows.

- Every format soundfile reads, at any rate and channel count (converted to the codec's).
- Captions: `<name>.txt` beside the file, else audiocraft's `<name>.json` (its `description` with the fields
  key, bpm, genre, moods, keywords and instrument appended as `field: value`, joined by ". " as audiocraft's
  music dataset merges them, in that fixed order), else the file name. An optional trigger word is prepended.
- Tokens are encoded once and cached in `<folder>/.magnet_cache/` (or `cache_dir`), keyed by the file's content
  hash and the codec's identity: a second run, with any other training settings, does not encode again.
- Long files give random window-length crops; short ones are padded, and the padding takes no loss.
- An unreadable or silent file is skipped with a warning naming it; an empty folder or a caption over the T5
  limit is a MagnetError naming the folder / file.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import MagnetError, first_line

CACHE_DIR = ".magnet_cache"
SILENCE = 1e-4                 # peak amplitude at or below which a file counts as silent
ENCODE_CHUNK_SECONDS = 60.0    # long files are encoded in pieces of this length (bounded memory)
META_FIELDS = ("key", "bpm", "genre", "moods", "keywords", "instrument")


def audio_extensions() -> set[str]:
    """Extensions of the formats the installed soundfile (libsndfile) reads."""
    import soundfile as sf
    exts = {"." + k.lower() for k in sf.available_formats()}
    exts.discard(".raw")            # headerless: needs a rate and format soundfile cannot guess
    if ".aiff" in exts:
        exts.add(".aif")
    if ".ogg" in exts:
        exts |= {".oga", ".opus"}
    return exts


def caption_for(path: Path, trigger: str = "") -> str:
    """The caption of an audio file: <name>.txt, else <name>.json (audiocraft's), else the file name; the
    trigger word (if any) first."""
    path = Path(path)
    text = None
    txt, js = path.with_suffix(".txt"), path.with_suffix(".json")
    if txt.is_file():
        text = txt.read_text(encoding="utf-8", errors="replace").strip()
    elif js.is_file():
        text = json_caption(js)
    if not text:
        text = path.stem.replace("_", " ").replace("-", " ").strip()
    trigger = (trigger or "").strip()
    return f"{trigger} {text}".strip() if trigger else text


def json_caption(path: Path) -> str | None:
    """audiocraft's `<name>.json`: description, then `field: value` for key, bpm, genre, moods, keywords,
    instrument (lists joined with ", "), joined by ". "."""
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        warnings.warn(f"{path}: not readable JSON ({first_line(e)}); using the file name as the caption.")
        return None
    if not isinstance(info, dict):
        return None
    pairs = []
    for name in META_FIELDS:
        v = info.get(name)
        if isinstance(v, list):
            v = ", ".join(str(x) for x in v)
        if v is not None and isinstance(v, (int, float, str)) and str(v) != "":
            pairs.append(f"{name}: {v}")
    meta = ". ".join(pairs)
    desc = info.get("description")
    if not isinstance(desc, str) or not desc.strip():
        return meta or None
    return ". ".join([desc.rstrip("."), meta]).strip() if meta else desc.strip()


def codec_identity(codec) -> str:
    """A short hash of the codec: its configuration and its quantizer codebooks (what decides the tokens)."""
    h = hashlib.sha256()
    cfg = getattr(getattr(codec, "model", None), "config", None)
    h.update((cfg.to_json_string() if hasattr(cfg, "to_json_string") else repr(cfg)).encode())
    for name, t in sorted(codec.state_dict().items()):
        if "quantizer" in name:
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Clip:
    path: Path
    caption: str
    codes: torch.Tensor          # long [K, T] on the CPU

    @property
    def frames(self) -> int:
        return int(self.codes.shape[-1])


def encode_file(model, path: Path) -> torch.Tensor | None:
    """Codes [K, T] of an audio file, None (with a warning naming it) when unreadable or silent."""
    from .audio import read_audio
    try:
        wav, sr = read_audio(path)
    except MagnetError as e:
        warnings.warn(f"skipped {path}: {e}")
        return None
    if not bool(torch.isfinite(wav).all()):
        warnings.warn(f"skipped {path}: it holds NaN or infinite samples (a damaged file).")
        return None
    if float(wav.abs().max()) <= SILENCE:
        warnings.warn(f"skipped {path}: it is silent (peak below {SILENCE:g}); it would teach nothing.")
        return None
    chunk = int(ENCODE_CHUNK_SECONDS * sr)
    parts = []
    with torch.inference_mode():
        for a in range(0, wav.shape[-1], chunk):
            piece = wav[:, a:a + chunk]
            if piece.shape[-1] < 2:
                continue
            parts.append(model.encode(piece[None], sr)[0].cpu())
    if not parts:
        warnings.warn(f"skipped {path}: too short to encode.")
        return None
    return torch.cat(parts, dim=-1).long()


class AudioFolder:
    """The clips of a folder (recursively; hidden files and the cache skipped), encoded and captioned.

    model: a MagnetModel (its codec encodes; its T5 tokenizer checks the captions). trigger: a word put before
    every caption. cache_dir: where tokens are cached (default `<folder>/.magnet_cache`; when that folder is not
    writable, tokens are not cached). progress(done, total) is called after each file."""

    def __init__(self, folder, model, *, trigger: str = "", cache_dir=None,
                 progress: Callable[[int, int], None] | None = None, what: str = "dataset folder"):
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise MagnetError(f"{what} not found: {folder}. Give a folder of audio files (WAV, FLAC, OGG, MP3...).")
        self.folder = folder
        exts = audio_extensions()
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in exts
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        if not files:
            raise MagnetError(f"{what} {folder} holds no audio files ({', '.join(sorted(exts)[:8])}, ...). Put "
                              f"the tracks to learn from in it (captions as <name>.txt beside each).")
        self.cache = Path(cache_dir).expanduser() if cache_dir else folder / CACHE_DIR
        codec_id = codec_identity(model.codec)
        self.clips: list[Clip] = []
        self.skipped: list[tuple[Path, str]] = []
        for i, path in enumerate(files):
            caption = caption_for(path, trigger)
            check_caption(model, caption, path)
            codes = self._cached(model, path, codec_id)
            if codes is None:
                self.skipped.append((path, "unreadable or silent"))
            else:
                self.clips.append(Clip(path, caption, codes))
            if progress is not None:
                progress(i + 1, len(files))
        if not self.clips:
            raise MagnetError(f"no usable audio in {what} {folder}: every file was unreadable or silent "
                              f"({', '.join(p.name for p, _ in self.skipped[:5])}). Give readable audio files.")

    def _cached(self, model, path: Path, codec_id: str) -> torch.Tensor | None:
        from safetensors.torch import load_file, save_file
        key = hashlib.sha256(f"{file_hash(path)}:{codec_id}".encode()).hexdigest()[:32]
        entry = self.cache / f"{key}.safetensors"
        if entry.is_file():
            try:
                return load_file(str(entry))["codes"].long()
            except Exception:           # a damaged cache entry: encode again
                pass
        codes = encode_file(model, path)
        if codes is None:
            return None
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f".{entry.name}.{os.getpid()}.partial")
            save_file({"codes": codes.to(torch.int32).contiguous()}, str(tmp), metadata={"file": path.name})
            os.replace(tmp, entry)
        except OSError as e:
            warnings.warn(f"could not cache the tokens of {path} in {self.cache} ({first_line(e)}); they will be "
                          f"encoded again next time.")
        return codes

    @property
    def captions(self) -> list[str]:
        return [c.caption for c in self.clips]

    def __len__(self) -> int:
        return len(self.clips)

    def window(self, index: int, frames: int, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [K, frames], valid bool [frames]) of clip `index`: a random crop when it is longer, else the
        clip padded at the end (padding: code 0, valid False)."""
        codes = self.clips[index].codes
        T = codes.shape[-1]
        if T >= frames:
            start = int(torch.randint(0, T - frames + 1, (1,), generator=generator)) if T > frames else 0
            return codes[:, start:start + frames], torch.ones(frames, dtype=torch.bool)
        out = torch.zeros((codes.shape[0], frames), dtype=torch.long)
        out[:, :T] = codes
        valid = torch.zeros(frames, dtype=torch.bool)
        valid[:T] = True
        return out, valid


def check_caption(model, caption: str, path: Path) -> None:
    """A caption must fit T5's limit (the text encoder refuses longer prompts)."""
    from .text import MAX_PROMPT_TOKENS
    te = getattr(model, "text_encoder", None)
    if te is None:
        return
    n = len(te.tokenizer(caption)["input_ids"])
    if n > MAX_PROMPT_TOKENS:
        raise MagnetError(f"the caption of {path} is {n} T5 tokens long; the limit is {MAX_PROMPT_TOKENS}. Shorten "
                          f"{path.with_suffix('.txt').name if path.with_suffix('.txt').is_file() else 'it'} to a "
                          f"sentence or two describing the sound.")
