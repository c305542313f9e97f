"""`python -m magnet generate "warm analog pad"`: text to WAV files (one per prompt); with `--prompts FILE --out
DIR`, a whole set (`magnet.batch`: one file per prompt line and take, resumable, shared among torchrun's
processes)."""
from __future__ import annotations

from pathlib import Path

from ..errors import MagnetError
from . import common, models


def add(sub) -> None:
    from ..audio import LUFS_RANGE
    g = sub.add_parser("generate", help="generate audio from text prompts and write WAV files")
    g.add_argument("prompts", nargs="*", metavar="PROMPT", help="one or more text prompts (\"\" = unconditional)")
    common.add_model_options(g)
    g.add_argument("-o", "--output", default="magnet.wav", help="WAV path; several prompts get _1, _2, ... suffixes")
    g.add_argument("--seconds", default=None,
                   help=f"duration, up to {common.MAX_SECONDS:g} s (default: the release's window); longer than the "
                        f"window, the window slides (see --overlap)")
    g.add_argument("--overlap", default=None, metavar="SECONDS",
                   help="for durations beyond the window: seconds of context each next window continues from "
                        "(default: half the window)")
    common.add_decoding_options(g)
    common.add_sampling_options(g)
    g.add_argument("--loudness", default=None, help="normalise to this LUFS target, {:g}..{:g}, e.g. -14".format(
        *LUFS_RANGE))
    common.add_device_options(g)
    s = g.add_argument_group("a set of clips (instead of PROMPT...)")
    s.add_argument("--prompts", metavar="FILE", dest="prompt_file",
                   help="a text file with one prompt per line (blank lines skipped), or JSONL with `prompt` and "
                        "optional `seconds`, `seed`, `name`: each line's clips go to --out as {line:05d}_{k}.wav (or "
                        "{name}_{k}.wav); a rerun skips the files already complete; under torchrun each process "
                        "makes its share")
    s.add_argument("--out", metavar="DIR", help="the folder for the set's files (with --prompts)")
    s.add_argument("--per-prompt", default="1", metavar="N", help="clips per prompt line (default 1)")
    s.add_argument("--format", default="wav", choices=["wav", "flac"], help="the set's file format (default wav)")
    s.add_argument("--batch", default="1", metavar="B",
                   help="accepted for scripts; each clip is generated on its own (its seed and prompt alone decide "
                        "it), so B changes neither the files nor the speed")
    g.set_defaults(run=run)


def run(a) -> int:
    if a.prompt_file is not None or a.out is not None:
        return run_set(a)
    if not a.prompts:
        raise MagnetError("give one or more prompts, e.g. python -m magnet generate \"warm analog pad\" (or a "
                          "prompts file with --prompts FILE --out DIR).")
    from .. import audio
    seconds = overlap = None
    if a.seconds is not None:
        seconds = common.number(a.seconds, "--seconds", f"give a duration in seconds, more than 0 and at most "
                                                         f"{common.MAX_SECONDS:g}, e.g. --seconds 10.",
                                lo=0, lo_open=True, hi=common.MAX_SECONDS)
    if a.overlap is not None:
        overlap = common.number(a.overlap, "--overlap", "give the seconds of context each next window continues "
                                                        "from, >= 0, e.g. --overlap 5 (default: half the window).",
                                lo=0)
    seed = common.seed(a.seed)
    steps = common.steps(a.steps)
    sampling = common.sampling(a)
    loudness = common.loudness(a.loudness)
    device = common.device(a.device)
    dtype = common.dtype(a.dtype, device)
    out = Path(a.output)
    common.output_folder(out, "-o/--output")
    loras = common.loras(a)

    model = common.with_loras(models.load(a, device=device, dtype=dtype), loras)
    progress = common.ProgressBar()
    try:
        codes, seed = model.generate(a.prompts, duration=seconds, overlap=overlap, seed=seed,
                                     use_sampling=not a.greedy, decoding_steps=steps, progress=progress,
                                     fast=a.fast, return_seed=True, **sampling)
    finally:
        progress.close()
    wav = model.decode(codes)
    if loudness is not None:
        wav = audio.normalize_loudness(wav, model.sample_rate, loudness)
    for i in range(wav.shape[0]):
        path = out if wav.shape[0] == 1 else out.with_name(f"{out.stem}_{i + 1}{out.suffix or '.wav'}")
        audio.write_wav(path, wav[i], model.sample_rate)
        print(f"wrote {path} ({wav.shape[-1] / model.sample_rate:.2f} s, {model.sample_rate} Hz)")
    common.echo(f"seed {seed}")
    return 0


def run_set(a) -> int:
    """`generate --prompts FILE --out DIR`: the set, the model loaded once."""
    from .. import batch
    if a.prompts:
        raise MagnetError("give prompts either as arguments or in --prompts FILE, not both.")
    if a.prompt_file is None or a.out is None:
        raise MagnetError("a set needs both --prompts FILE and --out DIR, e.g. --prompts prompts.txt --out set/.")
    jobs = batch.read_prompt_file(a.prompt_file)
    per = common.number(a.per_prompt, "--per-prompt", "give a number of clips per prompt, at least 1.", whole=True,
                        lo=1)
    common.number(a.batch, "--batch", "give a whole number, at least 1.", whole=True, lo=1)
    seconds = None if a.seconds is None else common.number(
        a.seconds, "--seconds", f"give a duration in seconds, more than 0 and at most {common.MAX_SECONDS:g}.",
        lo=0, lo_open=True, hi=common.MAX_SECONDS)
    overlap = None if a.overlap is None else common.number(a.overlap, "--overlap", "give seconds >= 0.", lo=0)
    seed = common.seed(a.seed)
    steps = common.steps(a.steps)
    sampling = common.sampling(a)
    loudness = common.loudness(a.loudness)
    rank, world = batch.rank_and_world()
    device = common.device(batch.local_device(a.device))
    dtype = common.dtype(a.dtype, device)
    loras = common.loras(a)
    model = common.with_loras(models.load(a, device=device, dtype=dtype), loras)

    def progress(p):
        common.echo(str(p))
    result = batch.generate_set(model, jobs, Path(a.out), per_prompt=per, seed=0 if seed is None else seed,
                                rank=rank, world=world, fmt=a.format, seconds=seconds, loudness=loudness,
                                progress=progress, overlap=overlap, use_sampling=not a.greedy,
                                decoding_steps=steps, fast=a.fast, **sampling)
    share = f" (process {rank + 1} of {world})" if world > 1 else ""
    print(f"{a.out}: wrote {len(result.written)} clip(s), {len(result.skipped)} already there, of {result.total} "
          f"in the set{share} ({result.seconds:.1f} s)")
    return 0
