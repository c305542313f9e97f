"""A folder of audio as training data: files -> codec tokens (cached) + captions, and random training windows.

- Every format soundfile reads, at any rate and channel count (converted to the codec's).
- Captions: the folder's manifest `magnet_dataset.jsonl` first (one JSON object per line; a line whose `file`,
  the path relative to the folder, names the audio file gives its `caption`; `python -m magnet prepare` writes
  it and the user may edit it), else `<name>.txt` beside the file, else audiocraft's `<name>.json` (its
  `description` with the fields key, bpm, genre, moods, keywords and instrument appended as `field: value`,
  joined by ". " as audiocraft's music dataset merges them, in that fixed order), else the file name. An
  optional trigger word is prepended. A manifest line that is not JSON, not an object, or has no `file` or no
  text `caption` is skipped with a warning naming the line (the file's caption then comes from the next
  source); a manifest that cannot be read at all is a warning, and the captions come from the files beside.
- Loudness (`loudness=-14`, say): what is encoded for training is normalised to that integrated loudness, one
  gain per file, measured in a first streaming pass (ITU-R BS.1770 as pyloudnorm measures it; the gain is
  lowered so no sample goes above full scale); the user's files are never changed. The target is part of the
  token cache key, so another target encodes again.
- Tokens are encoded once and cached in `<folder>/.magnet_cache/` (or `cache_dir`), keyed by the file's content
  hash, the codec's identity and the loudness target: a second run, with any other training settings, does not encode again.
- Tokens in the cache are checked against the codec (codebooks, value range) and encoded again when they do
  not match. Files are read and encoded in pieces (`encode_file`), never whole: a two-hour file needs the memory
  of a minute.
- Long files give random window-length crops; short ones are padded, and the padding takes no loss.
- A file that cannot be read (whatever the reason), is silent, has a name that is not valid UTF-8 or a caption
  over the T5 limit is skipped with a warning naming it; a caption file that cannot be read counts as absent.
  A folder with no usable file is a MagnetError naming the folder.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import MagnetError, first_line
from .files import save_safetensors

CACHE_DIR = ".magnet_cache"
SILENCE = 1e-4                 # peak amplitude at or below which a file counts as silent
ENCODE_CHUNK_SECONDS = 60.0    # long files are encoded in pieces of this length (bounded memory)
META_FIELDS = ("key", "bpm", "genre", "moods", "keywords", "instrument")
MANIFEST = "magnet_dataset.jsonl"   # the folder's caption manifest (read before <name>.txt / <name>.json)


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


def audio_files(folder: Path) -> list[Path]:
    """The audio files of a folder, recursively, sorted; hidden files and folders (the token cache) skipped."""
    folder = Path(folder)
    exts = audio_extensions()
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in exts
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def manifest_key(name: str) -> str:
    """A manifest `file` (or a path relative to the folder) as the manifest compares it: posix, no leading ./"""
    key = str(name).strip().replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key


@dataclass
class ManifestLine:
    """One line of a manifest: its number (from 1), its text, and either its entry (a dict with a text `file` and
    a non-empty text `caption`) or why it cannot be used."""
    number: int
    text: str
    entry: dict | None = None
    problem: str | None = None

    @property
    def file(self) -> str | None:
        return manifest_key(self.entry["file"]) if self.entry is not None else None


def manifest_lines(path: Path) -> list[ManifestLine]:
    """Every non-blank line of a manifest file, parsed. Raises OSError when the file cannot be read."""
    raw = Path(path).read_bytes()
    out = []
    for number, line in enumerate(raw.split(b"\n"), 1):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            out.append(ManifestLine(number, line.decode("utf-8", "replace"), problem="it is not UTF-8 text"))
            continue
        out.append(ManifestLine(number, text, *_manifest_entry(text)))
    return out


def _manifest_entry(text: str) -> tuple[dict | None, str | None]:
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"it is not JSON ({e.msg} at column {e.colno})"
    except Exception as e:          # nested too deeply for the parser ...
        return None, f"it is not JSON ({type(e).__name__}: {first_line(e)})"
    if not isinstance(entry, dict):
        return None, f"it is a JSON {type(entry).__name__}, not an object"
    if not isinstance(entry.get("file"), str) or not manifest_key(entry["file"]):
        return None, 'it has no "file" (the audio file\'s path relative to the folder)'
    caption = entry.get("caption")
    if caption is None:
        return None, 'it has no "caption"'
    if not isinstance(caption, str):
        return None, f'its "caption" is a {type(caption).__name__}, not a text'
    if not caption.strip():
        return None, 'its "caption" is empty'
    return entry, None


def read_manifest(folder: Path) -> dict[str, str]:
    """{file relative to the folder (posix): caption} from `<folder>/magnet_dataset.jsonl`; {} without one. A line
    that cannot be used is skipped with a warning naming it; a second line for a file is skipped too (the first
    wins); a manifest that cannot be read at all is a warning."""
    path = Path(folder) / MANIFEST
    if not os.path.lexists(path):
        return {}
    try:
        lines = manifest_lines(path)
    except Exception as e:          # permissions, a read error ...
        warnings.warn(f"{shown(path)}: not readable ({first_line(e) or type(e).__name__}); the captions come from "
                      f"the .txt / .json files beside the audio instead.")
        return {}
    captions: dict[str, str] = {}
    for line in lines:
        if line.problem is not None:
            warnings.warn(f"{shown(path)} line {line.number} skipped: {line.problem}. Fix or delete that line.")
        elif line.file in captions:
            warnings.warn(f"{shown(path)} line {line.number} skipped: {line.file} is already listed on an earlier "
                          f"line (the first one is used). Delete one of them.")
        else:
            captions[line.file] = line.entry["caption"].strip()
    return captions


def caption_for(path: Path, trigger: str = "") -> str:
    """The caption of an audio file: <name>.txt, else <name>.json (audiocraft's), else the file name; the
    trigger word (if any) first. A caption file that cannot be read (whatever the reason) counts as absent, with
    a warning naming it."""
    path = Path(path)
    text = None
    txt, js = path.with_suffix(".txt"), path.with_suffix(".json")
    if txt.is_file():
        try:
            text = txt.read_text(encoding="utf-8", errors="replace").strip()
        except Exception as e:          # a read error, a folder named like a file ...: no caption from it
            warnings.warn(f"{txt}: not readable ({first_line(e)}); using the file name as the caption.")
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
    except Exception as e:      # unreadable, not UTF-8, not JSON, nested too deeply for the parser ...
        warnings.warn(f"{path}: not readable JSON ({type(e).__name__}: {first_line(e)}); using the file name "
                      f"as the caption.")
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
    digest: str = ""             # sha256 of the file's content (what the token cache keys on)

    @property
    def frames(self) -> int:
        return int(self.codes.shape[-1])


def encode_file(model, path: Path, loudness: float | None = None) -> torch.Tensor | None:
    """Codes [K, T] of an audio file, None (with a warning naming it) when it cannot be read, whatever the reason,
    or is silent. The file is read and encoded in pieces of ENCODE_CHUNK_SECONDS, never whole, so a two-hour
    file needs no more memory than a minute of it (each piece resampled and encoded on its own).

    `loudness` (LUFS, e.g. -14): every piece is scaled by one gain for the whole file, `loudness_gain`, measured
    in a first pass over the file; None encodes the samples as they are. The file itself is only read."""
    import numpy as np
    import soundfile as sf
    gain = 1.0
    if loudness is not None:
        try:
            gain = loudness_gain(path, loudness)
        except Exception as e:      # whatever libsndfile or the file system says
            warnings.warn(f"skipped {path}: cannot read it ({first_line(e) or type(e).__name__}).")
            return None
    parts, peak = [], 0.0
    try:
        f = sf.SoundFile(str(path))
    except Exception as e:          # whatever libsndfile or the file system says
        warnings.warn(f"skipped {path}: cannot read it ({first_line(e) or type(e).__name__}).")
        return None
    with f:
        sr = int(f.samplerate)
        chunk = max(2, int(ENCODE_CHUNK_SECONDS * sr))
        while True:
            try:
                data = f.read(chunk, dtype="float32", always_2d=True)
            except Exception as e:
                warnings.warn(f"skipped {path}: cannot read it ({first_line(e) or type(e).__name__}).")
                return None
            if data.shape[0] == 0:
                break
            piece = torch.from_numpy(np.ascontiguousarray(data.T))
            if not bool(torch.isfinite(piece).all()):
                warnings.warn(f"skipped {path}: it holds NaN or infinite samples (a damaged file).")
                return None
            peak = max(peak, float(piece.abs().max()))
            if gain != 1.0:
                piece = piece * gain
            if piece.shape[-1] >= 2:
                with torch.inference_mode():
                    parts.append(model.encode(piece[None], sr)[0].cpu())
            if data.shape[0] < chunk:
                break
    if peak <= SILENCE:
        warnings.warn(f"skipped {path}: it is silent (peak below {SILENCE:g}); it would teach nothing.")
        return None
    if not parts:
        warnings.warn(f"skipped {path}: too short to encode.")
        return None
    return torch.cat(parts, dim=-1).long()


_CHANNEL_WEIGHTS = (1.0, 1.0, 1.0, 1.41, 1.41)       # BS.1770 (L, R, C, Ls, Rs); further channels 1.0


def file_loudness(path: Path) -> tuple[float, float]:
    """(integrated loudness in LUFS, peak) of an audio file, read in pieces of ENCODE_CHUNK_SECONDS (never whole).

    ITU-R BS.1770-4 as pyloudnorm computes it: K-weighting (pyloudnorm's filters, their state carried from piece
    to piece), 400 ms blocks every 100 ms, the -70 LUFS absolute and -10 LU relative gates. The loudness is NaN
    when it cannot be measured (shorter than one block, or silent). Raises what soundfile raises."""
    import numpy as np
    import scipy.signal
    import soundfile as sf
    from pyloudnorm.iirfilter import IIRfilter
    with sf.SoundFile(str(path)) as f:
        sr = int(f.samplerate)
        filters = [IIRfilter(4.0, 1 / np.sqrt(2), 1500.0, sr, "high_shelf"), IIRfilter(0.0, 0.5, 38.0, sr, "high_pass")]
        weights = np.array([_CHANNEL_WEIGHTS[c] if c < len(_CHANNEL_WEIGHTS) else 1.0 for c in range(f.channels)])
        states = [np.zeros((max(len(fl.a), len(fl.b)) - 1, f.channels)) for fl in filters]
        chunk = max(2, int(ENCODE_CHUNK_SECONDS * sr))
        step = 0.1 * sr                                  # a block every 100 ms; a block is 4 steps
        marks, energy, done, peak, k = [0.0], 0.0, 0, 0.0, 1   # the running energy at each step boundary
        while True:
            data = f.read(chunk, dtype="float64", always_2d=True)
            if data.shape[0] == 0:
                break
            if not np.all(np.isfinite(data)):
                raise ValueError("it holds NaN or infinite samples (a damaged file)")
            peak = max(peak, float(np.abs(data).max()))
            y = data
            for i, fl in enumerate(filters):
                y, states[i] = scipy.signal.lfilter(fl.b, fl.a, y, axis=0, zi=states[i])
                y = fl.passband_gain * y
            running = energy + np.cumsum((y * y) @ weights)
            end = done + data.shape[0]
            while int(k * step) <= end:
                marks.append(running[int(k * step) - done - 1] if int(k * step) > done else energy)
                k += 1
            energy, done = float(running[-1]), end
            if data.shape[0] < chunk:
                break
    marks = np.asarray(marks)
    if len(marks) < 5:                                   # shorter than one 400 ms block
        return float("nan"), peak
    z = (marks[4:] - marks[:-4]) / (0.4 * sr)            # each block's weighted mean square
    with np.errstate(divide="ignore", invalid="ignore"):
        block = -0.691 + 10.0 * np.log10(z)
        gated = z[block >= -70.0]
        if gated.size == 0:
            return float("nan"), peak
        relative = -0.691 + 10.0 * np.log10(gated.mean()) - 10.0
        gated = z[(block > relative) & (block > -70.0)]
        lufs = -0.691 + 10.0 * np.log10(gated.mean()) if gated.size else float("nan")
    return float(lufs), peak


def loudness_gain(path: Path, target: float) -> float:
    """The gain that brings a file to `target` LUFS (`file_loudness`), lowered so its peak stays at or below full
    scale (as magnet.audio.normalize_loudness does); 1.0 when its loudness cannot be measured."""
    lufs, peak = file_loudness(path)
    if not math.isfinite(lufs):
        return 1.0
    gain = 10.0 ** ((float(target) - lufs) / 20.0)
    if peak > 0 and peak * gain > 1.0:
        gain = 1.0 / peak
    return gain


def valid_codes(codes, n_q: int, card: int) -> bool:
    """Whether cached codes are codes of this codec: integer [n_q, T >= 1], every value in [0, card)."""
    return (isinstance(codes, torch.Tensor) and not codes.is_floating_point() and codes.dim() == 2
            and codes.shape[0] == n_q and codes.shape[1] >= 1 and int(codes.min()) >= 0 and int(codes.max()) < card)


def shown(path) -> str:
    """A path as text that can always be printed (bytes that are not UTF-8 as \\xNN)."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def _name_problem(path: Path) -> str | None:
    """Why a file name cannot be used (not valid UTF-8), else None."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8: rename it"
    return None


class AudioFolder:
    """The clips of a folder (recursively; hidden files and the cache skipped), encoded and captioned.

    model: a MagnetModel (its codec encodes; its T5 tokenizer checks the captions). trigger: a word put before
    every caption. cache_dir: where tokens are cached (default `<folder>/.magnet_cache`; when that folder is not
    writable, tokens are not cached). loudness: LUFS that what is encoded is normalised to (e.g. -14; None = as
    recorded); the files are never changed. progress(done, total) is called after each file."""

    def __init__(self, folder, model, *, trigger: str = "", cache_dir=None,
                 progress: Callable[[int, int], None] | None = None, what: str = "dataset folder",
                 loudness: float | None = None):
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise MagnetError(f"{what} not found: {folder}. Give a folder of audio files (WAV, FLAC, OGG, MP3...).")
        if loudness is not None:
            from .audio import _lufs
            loudness = float(_lufs(loudness, "loudness"))
        self.folder = folder
        self.loudness = loudness
        files = audio_files(folder)
        if not files:
            exts = audio_extensions()
            raise MagnetError(f"{what} {folder} holds no audio files ({', '.join(sorted(exts)[:8])}, ...). Put "
                              f"the tracks to learn from in it (captions as <name>.txt beside each).")
        self.cache = Path(cache_dir).expanduser() if cache_dir else folder / CACHE_DIR
        codec_id = codec_identity(model.codec)
        manifest = read_manifest(folder)
        self.clips: list[Clip] = []
        self.skipped: list[tuple[Path, str]] = []
        self.codec = (int(model.codec.n_q), int(model.codec.card))
        for i, path in enumerate(files):
            why = _name_problem(path)
            if why is None:
                listed = manifest.get(path.relative_to(folder).as_posix())
                if listed is not None:
                    _warn_if_edited_beside(folder, path, listed)
                    trig = (trigger or "").strip()
                    caption = f"{trig} {listed}".strip() if trig else listed
                else:
                    caption = caption_for(path, trigger)
                why = caption_problem(model, caption, path, in_manifest=listed is not None)
            if why is not None:
                warnings.warn(f"skipped {shown(path)}: {why}.")
                self.skipped.append((path, why))
            elif (got := self._cached(model, path, codec_id)) is None:       # it said why
                self.skipped.append((path, "unreadable or silent"))
            else:
                self.clips.append(Clip(path, caption, *got))
            if progress is not None:
                progress(i + 1, len(files))
        if not self.clips:
            raise MagnetError(f"no usable audio in {what} {folder}: every file was skipped "
                              f"({'; '.join(f'{shown(p.name)}: {w}' for p, w in self.skipped[:5])}). Give readable "
                              f"audio files with captions T5 accepts.")

    def _cached(self, model, path: Path, codec_id: str) -> tuple[torch.Tensor, str] | None:
        """(codes, content hash) of a file, from the cache when an entry holds codes of this codec (else it is
        encoded again), None when the file cannot be read."""
        from safetensors.torch import load_file
        try:
            digest = file_hash(path)
        except Exception as e:
            warnings.warn(f"skipped {path}: cannot read it ({first_line(e) or type(e).__name__}).")
            return None
        ident = f"{digest}:{codec_id}" if self.loudness is None else f"{digest}:{codec_id}:lufs={self.loudness!r}"
        key = hashlib.sha256(ident.encode()).hexdigest()[:32]
        entry = self.cache / f"{key}.safetensors"
        if entry.is_file():
            try:
                codes = load_file(str(entry))["codes"]
                if valid_codes(codes, *self.codec):
                    return codes.long(), digest
            except Exception:           # a damaged cache entry: encode again
                pass
        codes = (encode_file(model, path) if self.loudness is None
                 else encode_file(model, path, loudness=self.loudness))
        if codes is None:
            return None
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            save_safetensors(entry, {"codes": codes.to(torch.int32)})
        except OSError as e:
            warnings.warn(f"could not cache the tokens of {path} in {self.cache} ({first_line(e)}); they will be "
                          f"encoded again next time.")
        return codes, digest

    @property
    def digests(self) -> list[str]:
        return [c.digest for c in self.clips]

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


def _warn_if_edited_beside(folder: Path, path: Path, listed: str) -> None:
    """The manifest's caption wins over <name>.txt: say so when the .txt was changed after the manifest."""
    txt = path.with_suffix(".txt")
    try:
        if not txt.is_file() or txt.stat().st_mtime <= (folder / MANIFEST).stat().st_mtime:
            return
        text = txt.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return
    if text and text != listed:
        warnings.warn(f"{shown(txt)} was changed after {MANIFEST}, but the manifest's caption is used for "
                      f"{shown(path.name)}: edit its line in {MANIFEST} instead (or delete that line).")


def caption_problem(model, caption: str, path: Path, *, in_manifest: bool = False) -> str | None:
    """Why a caption cannot be used (longer than T5's limit), else None."""
    from .text import MAX_PROMPT_TOKENS
    te = getattr(model, "text_encoder", None)
    if te is None:
        return None
    n = len(te.tokenizer(caption)["input_ids"])
    if n > MAX_PROMPT_TOKENS:
        where = (f"its line in {MANIFEST}" if in_manifest else path.with_suffix(".txt").name
                 if path.with_suffix(".txt").is_file() else "its caption")
        return (f"its caption is {n} T5 tokens long, over the limit of {MAX_PROMPT_TOKENS}: shorten {where} to a "
                f"sentence or two describing the sound")
    return None
