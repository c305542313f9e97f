"""`python -m magnet vary IN "prompt"`: audio to audio, a share of a file redrawn with a prompt."""
from __future__ import annotations

from pathlib import Path

from ..errors import MagnetError
from . import common, models


def add(sub) -> None:
    v = sub.add_parser("vary", help="audio to audio: redraw a share of an audio file with a prompt",
                       description="Encode an audio file, redraw --strength of its spans with the prompt (the rest "
                                   "kept as context), decode to the same length.")
    v.add_argument("input", metavar="IN", help="audio file to vary (WAV, FLAC, OGG, MP3, ...)")
    v.add_argument("prompt", help="text prompt that steers the redrawn parts")
    common.add_model_options(v)
    v.add_argument("-o", "--output", default="magnet_vary.wav", help="WAV path (default magnet_vary.wav)")
    v.add_argument("--strength", default="0.5",
                   help="share of the clip redrawn, 0 (unchanged) to 1 (only the length kept); default 0.5")
    v.add_argument("--keep-codebooks", default="0",
                   help="codebooks kept everywhere: 0 none (default), 1 = codebook 0 (rhythm, melody)")
    common.add_decoding_options(v)
    common.add_device_options(v)
    v.set_defaults(run=run)


def run(a) -> int:
    from .. import audio, edit
    strength = common.number(a.strength, "--strength", "give a share from 0 (unchanged) to 1 (only the length "
                                                       "kept), e.g. --strength 0.4.", lo=0, hi=1)
    keep = common.number(a.keep_codebooks, "--keep-codebooks", "give 0 (redraw everything) or the number of first "
                                                              "codebooks to keep, e.g. 1 (rhythm and melody).",
                         whole=True, lo=0)
    seed = common.seed(a.seed)
    steps = common.steps(a.steps)
    device = common.device(a.device)
    dtype = common.dtype(a.dtype, device)
    out = Path(a.output)
    common.output_folder(out, "-o/--output")
    wav, sr = audio.read_audio(a.input)
    seconds = wav.shape[-1] / sr
    loras = common.loras(a)
    model = common.with_loras(models.load(a, device=device, dtype=dtype), loras)
    if keep >= model.cfg.n_q:
        raise MagnetError(f"--keep-codebooks {keep}: this model has {model.cfg.n_q} codebooks; give at most "
                          f"{model.cfg.n_q - 1} (keeping all would change nothing).")
    progress = common.ProgressBar()
    try:
        codes, seed = edit.vary(model, model.encode(wav, sr), a.prompt, strength=strength, keep_codebooks=keep,
                                seed=seed, decoding_steps=steps, progress=progress, fast=a.fast,
                                return_seed=True)
    finally:
        progress.close()
    result = model.decode(codes, duration=seconds)
    audio.write_wav(out, result[0], model.sample_rate)
    print(f"wrote {out} ({result.shape[-1] / model.sample_rate:.2f} s, {model.sample_rate} Hz)")
    common.echo(f"seed {seed}")
    return 0
