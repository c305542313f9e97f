"""`python -m magnet generate "warm analog pad"`: text to WAV files (one per prompt)."""
from __future__ import annotations

from pathlib import Path

from . import common, models


def add(sub) -> None:
    from ..audio import LUFS_RANGE
    g = sub.add_parser("generate", help="generate audio from text prompts and write WAV files")
    g.add_argument("prompts", nargs="+", help="one or more text prompts (\"\" = unconditional)")
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
    g.set_defaults(run=run)


def run(a) -> int:
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
