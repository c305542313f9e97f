"""Batch generation: a prompt file -> a folder of clips, resumable and shardable over processes.

    from magnet import MagnetModel, batch
    model = MagnetModel.from_pretrained("models/magnet/magnet-small-10secs", text_encoder="...")
    jobs = batch.read_prompt_file("prompts.txt")
    rank, world = batch.rank_and_world()            # torchrun's RANK / WORLD_SIZE (0, 1 without torchrun)
    result = batch.generate_set(model, jobs, "out/", per_prompt=4, seed=0, rank=rank, world=world,
                                progress=print, decoding_steps=[20, 10, 10, 10])

The entry points (what `python -m magnet generate --prompts FILE --out DIR` calls):

- `read_prompt_file(path) -> list[Job]`
- `generate_set(model, jobs, out_dir, *, per_prompt=1, seed=0, batch=1, rank=0, world=1, fmt="wav",
  seconds=None, loudness=None, progress=None, **generate_kwargs) -> SetResult`
- `rank_and_world() -> (rank, world)`; `local_device(device) -> device` (cuda:LOCAL_RANK under torchrun);
  `plan(jobs, per_prompt, seed, fmt) -> list[Item]` (the whole set, the
  same list in every process); `pair_outputs(jobs, folder) -> list[(path, Job, k)]` (the files of a set
  with their prompts, for `evaluate --clap GEN --prompts FILE`).

Prompt files. A text file: one prompt per line; blank lines are skipped and do not count, so a prompt's
`index` is its position among the non-blank lines, from 0 (error messages name the file's own line
numbers). A JSONL file (a `.jsonl` name, or a file with any line a JSON object): one object per line with
`prompt` (a string; "" generates unconditionally) and optionally `seconds` (> 0), `seed` (a whole number) and
`name` (a file-name stem); other keys are ignored. A line that is neither is a MagnetError naming its number
and the fix. Names may not hold path separators, start with a dot or be a reserved device name; two
prompts may not give the same name.

Output names: `{index:05d}_{k}.{fmt}` (e.g. `00007_2.wav`), or `{name}_{k}.{fmt}` for a JSONL line with a
`name`, for k = 0 .. per_prompt - 1. The `_k` is there even with one clip per prompt, so names do not depend
on `per_prompt`: asking for more clips per prompt later adds `_1`, `_2`, ... beside the existing `_0`.

Seeds. Clip k of prompt `index` is generated with the seed sha256("magnet-batch:{S}:{index}:{k}") (its
first 8 bytes, as a 63-bit number), S being the set's seed; a JSONL line with its own `seed` uses seed + k
instead. A clip therefore depends only on (S, index, k) and the settings: never on `batch`, the number of
processes, which process made it, or what was made before. It is the clip `MagnetModel.generate([prompt],
duration=seconds, seed=item.seed, ...)` gives, decoded without cutting (as the `generate` command writes
one). A subset of a file's jobs (e.g. `jobs[10:20]`) makes the same files as the whole list would.

Batches. Each clip is generated in a generation call of its own: the decoding loop draws a whole batch's
tokens from one generator, and the text memory is padded to the batch's longest prompt (padding takes part
in cross-attention, as in the reference), so a row's tokens would depend on the other rows of its batch.
`batch` is accepted (the CLI's --batch) and checked, but rows are not run together: it changes neither
the files nor the speed.

Resuming and crashes. A clip whose file exists is done and is skipped. Every file is written under a
temporary name in the same folder and renamed into place (`audio.write_wav`), and each clip is written as
soon as it is decoded: a crash or Ctrl-C loses at most the clip in progress, and a rerun of the same
command makes exactly the missing files. A temporary file left by a killed process (`.{stem}.XXXXXXXX.tmp.wav`)
is removed when a process whose share holds that clip starts again.

Several processes (torchrun --nproc_per_node N, or N commands with RANK/WORLD_SIZE set): process `rank`
of `world` makes the clips whose item index (the job's position in the list * per_prompt + k) modulo world
equals its
rank. No process group is needed. Together they write exactly the files one process writes, byte for
byte on the CPU (on GPUs, as far as the device's kernels are deterministic). Progress counts the files of
the whole set present in the folder, so each process reports the whole set's progress.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .errors import MagnetError, first_line

FORMATS = ("wav", "flac")
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_BAD_CHARS = set('/\\:*?"<>|')
MAX_NAME = 120
OWNED_KWARGS = ("prompts", "prompt", "duration", "seed", "return_seed", "progress")


@dataclass(frozen=True)
class Job:
    """One prompt of a prompt file. `index`: its position among the file's prompts (from 0), which names
    and seeds its clips (unique in a set); `lineno`: its line in the file (from 1), for messages."""
    index: int
    prompt: str
    seconds: float | None = None
    seed: int | None = None
    name: str | None = None
    lineno: int = 0

    @property
    def stem(self) -> str:
        return self.name if self.name is not None else f"{self.index:05d}"


@dataclass(frozen=True)
class Item:
    """Clip k of a job: `index` is its position in the whole set (job position * per_prompt + k)."""
    index: int
    job: Job
    k: int
    seed: int
    filename: str


@dataclass
class SetProgress:
    """The whole set's progress, after each clip this process writes (and once at the start).
    done/total: files of the set present / expected; made: clips this process wrote; clips_per_minute and
    eta_seconds: from the files that appeared since this process started (other processes' included;
    None until the first); last: the file just written."""
    done: int
    total: int
    made: int
    elapsed: float
    clips_per_minute: float | None
    eta_seconds: float | None
    last: Path | None = None

    def __str__(self) -> str:
        rate = "" if self.clips_per_minute is None else f", {self.clips_per_minute:.1f} clips/min"
        eta = "" if self.eta_seconds is None else f", about {_duration(self.eta_seconds)} left"
        return f"{self.done}/{self.total} clips{rate}{eta}"


@dataclass
class SetResult:
    """What one process did: `written` (files it made), `skipped` (files of its share already there),
    `share` (clips in its share), `total` (clips in the whole set), `seconds` (wall time)."""
    written: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    share: int = 0
    total: int = 0
    seconds: float = 0.0


# ---------------------------------------------------------------------- prompt files
def read_prompt_file(path: str | Path) -> list[Job]:
    """A text (one prompt per line) or JSONL prompt file -> its jobs, in order (see the module)."""
    p = Path(path)
    if not p.is_file():
        raise MagnetError(f"prompts file not found: {p}. Give a text file with one prompt per line, or a .jsonl "
                          f"file with one {{\"prompt\": ...}} object per line." if not p.exists() else
                          f"{p} is not a file: give a prompts file (text or .jsonl).")
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MagnetError(f"cannot read prompts file {p} ({first_line(e)}). Save it as UTF-8 text.") from None
    rows = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not rows:
        raise MagnetError(f"prompts file {p} has no prompts. Write one prompt per line.")
    parsed = [(n, _json_object(line)) for n, line in rows]
    objects = [n for n, obj in parsed if obj is not None]
    if p.suffix.lower() == ".jsonl" or objects:
        if len(objects) != len(rows):
            n = next(n for n, obj in parsed if obj is None)
            raise MagnetError(f"{p}, line {n}: not a JSON object, but "
                              f"{'the file is named .jsonl' if p.suffix.lower() == '.jsonl' else f'line {objects[0]} is one'}. "
                              f"In a JSONL prompts file write every line as an object such as "
                              f"{{\"prompt\": \"lofi hip hop beat\", \"seconds\": 10}}; in a text file write plain "
                              f"prompts, one per line.")
        jobs = [_job_of_object(p, n, i, obj) for i, (n, obj) in enumerate(parsed)]
    else:
        jobs = [Job(i, line.strip(), lineno=n) for i, (n, line) in enumerate(rows)]
    check_jobs(jobs, str(p))
    return jobs


def _json_object(line: str):
    s = line.strip()
    if not s.startswith("{"):
        return None
    try:
        obj = json.loads(s)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _job_of_object(p: Path, n: int, index: int, obj: dict) -> Job:
    where = f"{p}, line {n}"
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        found = ", ".join(sorted(map(str, obj))) or "none"
        raise MagnetError(f"{where}: needs a \"prompt\" string (keys found: {found}), e.g. "
                          f"{{\"prompt\": \"lofi hip hop beat\"}} (\"\" generates unconditionally).")
    seconds = obj.get("seconds")
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
                or seconds <= 0:
            raise MagnetError(f"{where}: \"seconds\" {seconds!r} must be a number of seconds > 0, e.g. 10 (or left "
                              f"out for the default).")
        seconds = float(seconds)
    seed = obj.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise MagnetError(f"{where}: \"seed\" {seed!r} must be a whole number >= 0 (or left out: the set's "
                          f"seed then gives each clip its own).")
    name = obj.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise MagnetError(f"{where}: \"name\" {name!r} must be a string (a file name without extension).")
        problem = name_problem(name)
        if problem:
            raise MagnetError(f"{where}: \"name\" {name!r} {problem}. Give a plain file name such as \"piano_01\".")
    return Job(index, prompt.strip(), seconds, seed, name, n)


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a file-name stem of the set (None when it can)."""
    if not name.strip():
        return "is empty"
    if name != name.strip():
        return "starts or ends with a space"
    if any(c in _BAD_CHARS for c in name) or any(ord(c) < 32 for c in name):
        return "holds a path separator or a character file names cannot hold (/ \\ : * ? \" < > | or a control " \
               "character)"
    if name.startswith("."):
        return "starts with a dot (a hidden file; '..' would leave the folder)"
    if name.endswith("."):
        return "ends with a dot"
    if name.split(".")[0].lower() in _RESERVED:
        return "is a reserved device name on Windows"
    if len(name) > MAX_NAME:
        return f"is longer than {MAX_NAME} characters"
    return None


def check_jobs(jobs: Sequence[Job], where: str = "the prompts") -> list[Job]:
    """Jobs handed in: a non-empty list of Job with distinct indices >= 0 (names and seeds are made from
    them), safe names and distinct stems."""
    if not isinstance(jobs, (list, tuple)) or not jobs:
        raise MagnetError(f"{where}: no prompts. Give at least one (read_prompt_file reads a prompts file).")
    seen: dict[str, Job] = {}
    indices: set[int] = set()
    for pos, job in enumerate(jobs):
        if not isinstance(job, Job):
            raise MagnetError(f"{where}: item {pos} is a {type(job).__name__}, not a batch.Job.")
        if isinstance(job.index, bool) or not isinstance(job.index, int) or job.index < 0 or job.index in indices:
            raise MagnetError(f"{where}: job {pos} has index {job.index!r}: each job needs an index of its own, a "
                              f"whole number >= 0 (names and seeds are made from it).")
        indices.add(job.index)
        if job.name is not None and name_problem(job.name):
            raise MagnetError(f"{where}: name {job.name!r} {name_problem(job.name)}.")
        other = seen.get(job.stem.casefold())      # one file on case-insensitive file systems too
        if other is not None:
            raise MagnetError(f"{where}: the prompts at lines {other.lineno or other.index} and "
                              f"{job.lineno or job.index} would both write {job.stem}_*: give each a name of its "
                              f"own.")
        seen[job.stem.casefold()] = job
    return list(jobs)


# ---------------------------------------------------------------------- the set
def item_seed(seed: int, index: int, k: int) -> int:
    """The seed of clip k of prompt `index` in a set of seed `seed`: 63 bits of sha256."""
    digest = hashlib.sha256(f"magnet-batch:{int(seed)}:{int(index)}:{int(k)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def plan(jobs: Sequence[Job], per_prompt: int = 1, seed: int = 0, fmt: str = "wav") -> list[Item]:
    """Every clip of the set, in item order (the same list in every process)."""
    jobs = check_jobs(jobs)
    per_prompt = _whole(per_prompt, "per_prompt", "clips per prompt", 1)
    seed = _whole(seed, "seed", "the set's seed", None)
    fmt = _format(fmt)
    items = []
    for pos, job in enumerate(jobs):
        for k in range(per_prompt):
            s = (job.seed + k) % 2 ** 64 if job.seed is not None else item_seed(seed, job.index, k)
            items.append(Item(pos * per_prompt + k, job, k, s, f"{job.stem}_{k}.{fmt}"))
    return items


def rank_and_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) from the environment as torchrun sets them; (0, 1) when unset."""
    def read(name, default):
        raw = os.environ.get(name, "").strip()
        if not raw:
            return default
        try:
            return int(raw)
        except ValueError:
            raise MagnetError(f"${name} is {raw!r}: it must be a whole number (torchrun sets it).") from None
    rank, world = read("RANK", 0), read("WORLD_SIZE", 1)
    if world < 1 or not 0 <= rank < world:
        raise MagnetError(f"$RANK {rank} and $WORLD_SIZE {world} do not fit: need 0 <= RANK < WORLD_SIZE. Start "
                          f"the processes with torchrun, or unset both for one process.")
    return rank, world


def local_device(device=None):
    """The device of this process: with torchrun's LOCAL_RANK set and `device` left to choose (None, 'auto'
    or 'cuda') on a machine with CUDA, GPU number LOCAL_RANK ('cuda:<LOCAL_RANK>'); else `device` as given."""
    import torch
    raw = os.environ.get("LOCAL_RANK", "").strip()
    wants_cuda = device is None or (isinstance(device, str) and device.strip().lower() in ("", "auto", "cuda"))
    if not raw or not wants_cuda or not torch.cuda.is_available():
        return device
    try:
        local = int(raw)
    except ValueError:
        raise MagnetError(f"$LOCAL_RANK is {raw!r}: it must be a whole number (torchrun sets it).") from None
    count = torch.cuda.device_count()
    if not 0 <= local < count:
        raise MagnetError(f"$LOCAL_RANK {local} but this machine has {count} CUDA device(s): start at most {count} "
                          f"processes per machine (torchrun --nproc_per_node {count}).")
    return f"cuda:{local}"


def generate_set(model, jobs: Sequence[Job], out_dir: str | Path, *, per_prompt: int = 1, seed: int = 0,
                 batch: int = 1, rank: int = 0, world: int = 1, fmt: str = "wav", seconds: float | None = None,
                 loudness: float | None = None, progress: Callable[[SetProgress], None] | None = None,
                 **generate_kwargs) -> SetResult:
    """Generate this process's share of the set into `out_dir` (see the module for names, seeds,
    sharding and resuming); `model` is a loaded MagnetModel (nothing is loaded here).

    seconds: each clip's duration when its job gives none (None: the release's window). loudness: LUFS
    each clip is normalised to before writing (None: as generated). progress(SetProgress) after each
    clip. generate_kwargs: what `MagnetModel.generate` takes besides prompts, duration, seed and
    progress (sampling fields such as decoding_steps, temperature, fast; params; overlap; rescorer).
    """
    from .audio import normalize_loudness, write_wav

    items = plan(jobs, per_prompt, seed, fmt)
    _whole(batch, "batch", "clips per generation call", 1)
    world = _whole(world, "world", "the number of processes", 1)
    rank = _whole(rank, "rank", "this process's rank", 0)
    if rank >= world:
        raise MagnetError(f"rank {rank} of {world} processes: the rank must be below the number of processes.")
    owned = sorted(set(generate_kwargs) & set(OWNED_KWARGS))
    if owned:
        raise MagnetError(f"generate_set sets {', '.join(owned)} itself (prompts from the jobs, seconds per job, "
                          f"a seed per clip, progress per clip): leave them out.")
    # every setting checked before any work: the sampling fields, each distinct duration, the loudness
    sampling = {k: v for k, v in generate_kwargs.items() if k not in ("params", "overlap", "rescorer")}
    params = model.sampling_params(generate_kwargs.get("params"), **sampling)
    rest = {k: generate_kwargs[k] for k in ("overlap", "rescorer") if k in generate_kwargs}
    if rest.get("overlap") is not None:
        model.overlap_frames(rest["overlap"], params.span_arrangement)
    for job in {it.job.seconds: it.job for it in items}.values():
        try:
            model.frames_for(job.seconds if job.seconds is not None else seconds)
        except MagnetError as e:
            where = f"line {job.lineno}: " if job.seconds is not None and job.lineno else ""
            raise MagnetError(f"{where}{e}") from None
    if loudness is not None:
        from .audio import _lufs
        _lufs(loudness, "loudness")
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise MagnetError(f"output folder {folder} is a file: give a folder for the set's clips.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MagnetError(f"cannot make output folder {folder} ({first_line(e)}): choose one you can write to.") from None

    mine = [it for it in items if it.index % world == rank]
    for it in mine:
        _remove_leftovers(folder, it.filename)
    paths = [folder / it.filename for it in items]
    result = SetResult(share=len(mine), total=len(items))
    start = time.monotonic()
    done_at_start = _count(paths)

    def report(last=None):
        if progress is None:
            return
        done, elapsed = _count(paths), time.monotonic() - start
        new = done - done_at_start
        rate = new / elapsed * 60.0 if new > 0 and elapsed > 0 else None
        eta = (len(items) - done) / rate * 60.0 if rate else None
        progress(SetProgress(done, len(items), len(result.written), elapsed, rate, eta, last))

    report()
    for it in mine:
        path = folder / it.filename
        if path.exists():
            result.skipped.append(path)
            continue
        duration = it.job.seconds if it.job.seconds is not None else seconds
        codes = model.generate([it.job.prompt], duration=duration, seed=it.seed, params=params, **rest)
        wav = model.decode(codes)
        if loudness is not None:
            wav = normalize_loudness(wav, model.sample_rate, loudness)
        write_wav(path, wav[0], model.sample_rate)
        result.written.append(path)
        report(path)
    result.seconds = time.monotonic() - start
    return result


def pair_outputs(jobs: Sequence[Job], folder: str | Path) -> list[tuple[Path, Job, int]]:
    """The clips of a set present in `folder`, named as `generate_set` names them, with their job and k:
    [(path, job, k)] in item order. Files of other names are ignored."""
    jobs = check_jobs(jobs)
    folder = Path(folder)
    if not folder.is_dir():
        raise MagnetError(f"{folder} is not a folder: give the folder the set was generated into.")
    by_stem = {job.stem: job for job in jobs}
    found = []
    for entry in os.scandir(folder):
        m = re.fullmatch(r"(.+)_(\d+)\.(" + "|".join(FORMATS) + r")", entry.name)
        if not m or entry.name.startswith(".") or not entry.is_file():
            continue
        job = by_stem.get(m.group(1))
        if job is not None:
            found.append((Path(entry.path), job, int(m.group(2))))
    found.sort(key=lambda t: (t[1].index, t[2], t[0].suffix))
    return found


# ---------------------------------------------------------------------- helpers
def _remove_leftovers(folder: Path, filename: str) -> None:
    """Temporary files of `filename` a killed process left (audio.write_wav's `.{stem}.XXXXXXXX.tmp{suffix}`)."""
    stem, suffix = os.path.splitext(filename)
    for leftover in glob.glob(os.path.join(glob.escape(str(folder)), f".{glob.escape(stem)}.{'?' * 8}.tmp{suffix}")):
        try:
            os.unlink(leftover)
        except OSError:
            pass


def _count(paths: Sequence[Path]) -> int:
    return sum(1 for p in paths if p.exists())


def _whole(value, name: str, what: str, least: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (least is not None and value < least):
        bound = "" if least is None else f" >= {least}"
        raise MagnetError(f"{name} {value!r} must be a whole number{bound} ({what}).")
    return int(value)


def _format(fmt) -> str:
    f = str(fmt).lower().lstrip(".")
    if f not in FORMATS:
        raise MagnetError(f"format {fmt!r}: write {' or '.join(FORMATS)}.")
    return f


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
