"""Preparing a folder of audio for LoRA training: captions from CLAP tags, tempo and key, and an editable manifest.

    from magnet.prepare import prepare_folder
    result = prepare_folder("my_tracks/", clap="models/clap/larger_clap_music")
    print(result.summary())

The command line runs the same function: `python -m magnet prepare DATA_DIR [--clap DIR] [--overwrite]
[--loudness LUFS]` is `prepare_folder(DATA_DIR, clap=DIR or None, overwrite=..., loudness=LUFS or -14,
progress=..., log=<print to stderr>)`, then prints `result.summary()`.

What it does, for every audio file of the folder (found as training finds them, `dataset.audio_files`:
recursively, the formats soundfile reads, hidden files and folders skipped):

- A file without a caption (no `<name>.txt`, no `<name>.json` and no line in the manifest) is heard by CLAP and,
  when librosa is installed, by librosa (`magnet.tagging`), and gets `<name>.txt` with a caption such as
  `ambient, calm, dreamy, piano, synthesizer, instrumental, slow, 72 bpm, A minor`: the tags of each category
  of `tagging.VOCABULARY` (genre, up to 2 moods, up to 3 instruments, vocals or instrumental, a tempo word),
  then the tempo in BPM and the key. Without librosa the tempo and key are left out, and the log says so once.
- An existing caption is never replaced unless `overwrite=True`: a file with a `.txt` or `.json` keeps it (it is
  still analysed, for the manifest's tags, tempo and key); a file already listed in the manifest keeps its line
  as it is and is not analysed again (delete the line to analyse it again).
- The manifest `DATA_DIR/magnet_dataset.jsonl` gets one JSON object per line per file: `file` (the path relative
  to DATA_DIR, with /), `caption`, `seconds` (the file's length), `tags` ({category: {label: score}}, the labels
  in the caption with their probability among their category's labels), `bpm` and `key` (null when unknown).
  Training reads it before `.txt` / `.json` (`dataset.read_manifest`), so edit a caption there. Lines the run
  does not replace are kept as they are, where they are (lines of files no longer in the folder, lines that
  cannot be used, which the log names); new lines go at the end. It is written when the run ends, also when it
  stops early (an error, Cancel): files analysed by then keep their line.
- Files are only read, never changed; every file written goes to a temporary name first and is renamed, so none
  is ever half-written, and a caption file that appears during the run is not replaced.
- A file that cannot be read, holds NaN samples or is silent is skipped (`result.skipped`, and the log).

`clap`: a `ClapScorer`, a CLAP folder, or None for `larger_clap_music` under $MAGNET_CLAP_DIR or models/clap
(loaded only when a file needs analysing). `loudness`: the LUFS each window is normalised to before CLAP hears
it (-14, as the CLAP score; None: as recorded). `progress(done, total)` after each file; `log(message)` gets
every message (the librosa note, skipped files, manifest lines that cannot be used); without it they go to
Python's logging ("magnet.prepare", warnings at WARNING level).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .dataset import (CACHE_DIR, MANIFEST, ManifestLine, _name_problem, audio_files, caption_for, manifest_lines,
                      shown)
from .errors import MagnetError, first_line
from .files import current_umask, temporary_name
from .tagging import LIBROSA_HINT, Analysis, Tagger, analyse_file, caption_text

DEFAULT_CLAP = "larger_clap_music"
PAPER_LOUDNESS = -14.0
logger = logging.getLogger("magnet.prepare")


@dataclass
class PrepareResult:
    """What a run did. `written`: caption files written (new, or replaced with overwrite); `kept`: audio files
    whose caption was kept (a .txt, .json or manifest line); `skipped`: (file, why); `analysed`: files heard by
    CLAP; `tempo_and_key`: whether librosa gave tempo and key (None when nothing was analysed)."""
    folder: Path
    manifest: Path
    files: int = 0
    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    analysed: int = 0
    seconds: float = 0.0
    elapsed: float = 0.0
    tempo_and_key: bool | None = None
    bad_lines: list[int] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.files} audio files in {shown(self.folder)}: {len(self.written)} captions written, "
                 f"{len(self.kept)} kept, {len(self.skipped)} skipped."]
        if self.analysed:
            rate = f", {self.seconds / self.elapsed:.0f}x real time" if self.elapsed > 0 else ""
            lines.append(f"{self.analysed} files analysed ({self.seconds / 60:.1f} min of audio in "
                         f"{self.elapsed:.1f} s{rate}); tempo and key "
                         f"{'included' if self.tempo_and_key else 'left out (librosa is not installed)'}.")
        for path, why in self.skipped[:5]:
            lines.append(f"skipped {shown(path.relative_to(self.folder))}: {why}")
        if len(self.skipped) > 5:
            lines.append(f"... and {len(self.skipped) - 5} more skipped")
        if self.bad_lines:
            lines.append(f"{MANIFEST} lines that cannot be used (kept as they are; fix or delete them): "
                         f"{', '.join(map(str, self.bad_lines[:10]))}{' ...' if len(self.bad_lines) > 10 else ''}")
        lines.append(f"manifest: {shown(self.manifest)} (edit the captions there: training reads it first)")
        return "\n".join(lines)

    @property
    def manifest_text(self) -> str:
        try:
            return self.manifest.read_text(encoding="utf-8")
        except OSError:
            return ""


def prepare_folder(folder, clap=None, *, overwrite: bool = False, loudness: float | None = PAPER_LOUDNESS,
                   progress: Callable[[int, int], None] | None = None,
                   log: Callable[[str], None] | None = None) -> PrepareResult:
    """Caption a folder's audio files and write its manifest (see the module notes). Returns a PrepareResult."""
    started = time.perf_counter()
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MagnetError(f"dataset folder not found: {folder}. Give a folder of audio files (WAV, FLAC, OGG, MP3...).")
    if not isinstance(overwrite, bool):
        raise MagnetError(f"overwrite {overwrite!r} must be True or False.")
    if loudness is not None:
        from .audio import _lufs
        loudness = float(_lufs(loudness, "loudness"))
    say = _Messages(log)
    files = audio_files(folder)
    if not files:
        raise MagnetError(f"dataset folder {folder} holds no audio files (WAV, FLAC, OGG, MP3, ...). Put the tracks "
                          f"to learn from in it.")
    manifest = folder / MANIFEST
    old = _old_manifest(manifest)
    result = PrepareResult(folder=folder, manifest=manifest, files=len(files))
    listed: dict[str, ManifestLine] = {}
    for line in old:
        if line.problem is not None:
            result.bad_lines.append(line.number)
            say.warn(f"{MANIFEST} line {line.number}: {line.problem}; kept as it is (fix or delete it)")
        elif line.file not in listed:
            listed[line.file] = line
    replaced: dict[int, dict] = {}          # old line number -> its new entry
    added: list[dict] = []
    tagger = None
    try:
        for i, path in enumerate(files):
            rel = path.relative_to(folder).as_posix()
            line = listed.get(rel)
            why = _name_problem(path)
            if why is not None:
                result.skipped.append((path, why))
                say.warn(f"skipped {shown(path.relative_to(folder))}: {why}")
            elif line is not None and not overwrite:
                result.kept.append(path)
            else:
                if tagger is None:
                    tagger = _tagger(clap, loudness, say)
                    result.tempo_and_key = tagger.tempo_and_key
                try:
                    analysis = analyse_file(tagger, path)
                except MagnetError as e:
                    result.skipped.append((path, str(e)))
                    say.warn(f"skipped {rel}: {e}")
                else:
                    if analysis.problem:
                        say.warn(f"{rel}: no tempo and key: {analysis.problem}")
                    result.analysed += 1
                    result.seconds += analysis.seconds
                    entry = _entry(rel, analysis, _caption(path, analysis, overwrite, result))
                    if line is not None:
                        replaced[line.number] = entry
                    else:
                        added.append(entry)
            if progress is not None:
                progress(i + 1, len(files))
    finally:
        if replaced or added:
            _write_manifest(manifest, old, replaced, added)
        result.elapsed = time.perf_counter() - started
    return result


# ---------------------------------------------------------------------- the pieces
class _Messages:
    def __init__(self, log):
        self.log = log

    def warn(self, message: str) -> None:
        if self.log is not None:
            self.log(message)
        else:
            logger.warning("%s", message)

    def info(self, message: str) -> None:
        if self.log is not None:
            self.log(message)
        else:
            logger.info("%s", message)


def _tagger(clap, loudness, say: _Messages) -> Tagger:
    scorer = load_clap(clap)
    tagger = Tagger(scorer, loudness=loudness)
    if not tagger.tempo_and_key:
        say.warn(f"tempo (BPM) and key are left out of the captions: {tagger.librosa_problem}. To include them: "
                 f"{LIBROSA_HINT}")
    return tagger


def load_clap(clap):
    """A ClapScorer from what was given: a scorer (used as it is), a CLAP folder, or None for larger_clap_music
    under $MAGNET_CLAP_DIR (os.pathsep-separated) or models/clap."""
    from .clap import ClapScorer
    if clap is not None and not isinstance(clap, (str, os.PathLike)):
        if hasattr(clap, "audio_embeddings") and hasattr(clap, "text_embeddings"):
            return clap
        raise MagnetError(f"clap must be a CLAP model folder or a ClapScorer, got {type(clap).__name__}.")
    if clap is None:
        roots = [Path(p) for p in os.environ.get("MAGNET_CLAP_DIR", "").split(os.pathsep) if p]
        roots.append(Path("models") / "clap")
        found = next((r / DEFAULT_CLAP for r in roots if (r / DEFAULT_CLAP).is_dir()), None)
        if found is None:
            raise MagnetError(f"no CLAP model given, and {DEFAULT_CLAP} is not in "
                              f"{', '.join(str(r) for r in roots)}. Get it with `python -m magnet download "
                              f"{DEFAULT_CLAP} --dir models/clap/{DEFAULT_CLAP}`, or give the folder of a CLAP model.")
        clap = found
    return ClapScorer.from_pretrained(clap)


def _caption(path: Path, analysis: Analysis, overwrite: bool, result: PrepareResult) -> str:
    """The file's caption for the manifest: a new one (written to <name>.txt) when it has none or with
    overwrite, else the one it has."""
    txt, js = path.with_suffix(".txt"), path.with_suffix(".json")
    if not overwrite and (txt.exists() or js.exists()):
        result.kept.append(path)
        return caption_for(path)
    caption = caption_text(analysis)
    if _write_text(txt, caption + "\n", replace=overwrite):
        result.written.append(txt)
    else:                                       # appeared during the run: it is the user's
        result.kept.append(path)
        return caption_for(path)
    return caption


def _entry(rel: str, a: Analysis, caption: str) -> dict:
    return {"file": rel, "caption": caption, "seconds": round(float(a.seconds), 3), "tags": a.tags,
            "bpm": a.bpm, "key": a.key}


def _old_manifest(path: Path) -> list[ManifestLine]:
    if not path.exists():
        return []
    try:
        return manifest_lines(path)
    except Exception as e:
        raise MagnetError(f"{path} exists but cannot be read ({first_line(e) or type(e).__name__}); it is not "
                          f"replaced. Make it readable, or move it away to start a new one.") from None


def _write_manifest(path: Path, old: list[ManifestLine], replaced: dict[int, dict], added: list[dict]) -> None:
    lines = [json.dumps(replaced[line.number], ensure_ascii=False) if line.number in replaced else line.text
             for line in old]
    lines += [json.dumps(entry, ensure_ascii=False) for entry in added]
    _write_text(path, "".join(line + "\n" for line in lines), replace=True)


def _write_text(path: Path, text: str, *, replace: bool) -> bool:
    """Write a UTF-8 text file atomically (a temporary name, then renamed), with the umask's permissions. With
    replace=False an existing file is left alone (False is returned)."""
    tmp = temporary_name(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o666 & ~current_umask())
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)              # fails when the name exists: never replaces
        except FileExistsError:
            return False
        except OSError:                     # a file system without hard links
            if path.exists():
                return False
            os.replace(tmp, path)
        return True
    except OSError as e:
        raise MagnetError(f"cannot write {path} ({first_line(e) or type(e).__name__}). Make the folder writable."
                          ) from None
    finally:
        tmp.unlink(missing_ok=True)


def folder_state(folder) -> str:
    """A short hash of the names, sizes and times of a folder's files (the token cache left out): it changes when
    a file is added, removed or changed (what a ComfyUI node re-runs on)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for here, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d != CACHE_DIR)
        for name in sorted(names):
            p = Path(here, name)
            try:
                st = p.stat()
            except OSError:
                continue
            h.update(f"{p.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8",
                                                                                                     "backslashreplace"))
    return h.hexdigest()[:16]
