"""Command line: `python -m magnet generate|vary|train|convert|download|evaluate|doctor ...` (see `python -m magnet -h`)."""
from __future__ import annotations

import argparse
import math
import os
import sys
import uuid
from pathlib import Path

from .errors import MagnetError, first_line
from .sampling import FastMode

MAX_SECONDS = 600.0     # longer asks run out of memory when the codec decodes the whole clip at once
MAX_STEPS = 1000        # per codebook; the releases use 10..60
LUFS_RANGE = (-70.0, 0.0)
DEVICE_HELP = "cpu, cuda, cuda:1, mps ... (default: cuda, else mps, else cpu)"
OWN = "default: the release's own"     # a sampling option left out takes the value the release stores (xp.cfg)


class _UsageError(MagnetError):
    """A command line argparse refused (unknown option, missing argument, not an int)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing the usage block and exiting, so `main` prints one line."""

    def error(self, message):
        raise _UsageError(f"{message}. See `{self.prog} -h`.")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m magnet", description="MAGNeT text-to-music / text-to-sound.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate audio from text prompts and write WAV files")
    g.add_argument("prompts", nargs="+", help="one or more text prompts (\"\" = unconditional)")
    g.add_argument("--model", required=True, help="release folder or converted .safetensors file")
    g.add_argument("--text-encoder", help="T5 folder (default: found beside the release, or $MAGNET_TEXT_ENCODER_DIR)")
    g.add_argument("--codec", help="transformers EnCodec folder, for releases whose codec file is a pointer")
    g.add_argument("-o", "--output", default="magnet.wav", help="WAV path; several prompts get _1, _2, ... suffixes")
    g.add_argument("--seconds", default=None,
                   help=f"duration, up to {MAX_SECONDS:g} s (default: the release's window); longer than the "
                        f"window, the window slides (see --overlap)")
    g.add_argument("--overlap", default=None, metavar="SECONDS",
                   help="for durations beyond the window: seconds of context each next window continues from "
                        "(default: half the window)")
    g.add_argument("--seed", default=None, help="random seed, a whole number (default: random, printed)")
    g.add_argument("--steps", default="auto",
                   help="decoding steps per codebook, e.g. 20,10,10,10 (default auto: the release's own, "
                        "60,10,10,10 for the 30 s music releases, else 20,10,10,10)")
    g.add_argument("--fast", action="store_true",
                   help=FastMode().summary() + " (default: exact)")
    g.add_argument("--temperature", default=None,
                   help=f"sampling temperature, annealed to 0 ({OWN}: 3.0 music, 3.5 audio-magnet)")
    g.add_argument("--top-k", default=None, help=f"sample among the k most likely tokens, 0 = off ({OWN}: 0)")
    g.add_argument("--top-p", default=None,
                   help=f"sample among the most likely tokens of this total probability, 0 = off ({OWN}: 0.9 "
                        f"music, 0.8 audio-magnet)")
    g.add_argument("--cfg", default=None, metavar="START,END",
                   help=f"classifier-free guidance, annealed from START to END ({OWN}: 10,1 music, 20,1 "
                        f"audio-magnet)")
    g.add_argument("--span-arrangement", default=None, choices=["nonoverlap", "stride1"],
                   help=f"spans re-masked: whole spans or overlapping ones ({OWN}: nonoverlap)")
    g.add_argument("--span-scoring", default=None, choices=["max", "prod"],
                   help=f"how a span's tokens score it ({OWN}: max)")
    g.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    g.add_argument("--loudness", default=None, help="normalise to this LUFS target, -70..0, e.g. -14")
    g.add_argument("--device", default=None, help=DEVICE_HELP)
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]", help=_lora_help())
    g.add_argument("--dtype", default=None, help="weights: fp32, fp16 (half), bf16 (default: fp16 on CUDA GPUs of "
                                                 "compute capability 7.0 or newer except GTX 16xx, else fp32)")
    g.add_argument("--download", action="store_true",
                   help="fetch what is missing first from the official Hugging Face repositories: --model may then "
                        "be an official name (e.g. magnet-small-10secs, into models/magnet/), and its codec and T5 "
                        "come too")

    v = sub.add_parser("vary", help="audio to audio: redraw a share of an audio file with a prompt",
                       description="Encode an audio file, redraw --strength of its spans with the prompt (the rest "
                                   "kept as context), decode to the same length.")
    v.add_argument("input", metavar="IN", help="audio file to vary (WAV, FLAC, OGG, MP3, ...)")
    v.add_argument("prompt", help="text prompt that steers the redrawn parts")
    v.add_argument("--model", required=True, help="release folder or converted .safetensors file")
    v.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]", help=_lora_help())
    v.add_argument("--text-encoder", help="T5 folder (default: found beside the release, or $MAGNET_TEXT_ENCODER_DIR)")
    v.add_argument("--codec", help="transformers EnCodec folder, for releases whose codec file is a pointer")
    v.add_argument("-o", "--output", default="magnet_vary.wav", help="WAV path (default magnet_vary.wav)")
    v.add_argument("--strength", default="0.5",
                   help="share of the clip redrawn, 0 (unchanged) to 1 (only the length kept); default 0.5")
    v.add_argument("--keep-codebooks", default="0",
                   help="codebooks kept everywhere: 0 none (default), 1 = codebook 0 (rhythm, melody)")
    v.add_argument("--seed", default=None, help="random seed, a whole number (default: random, printed)")
    v.add_argument("--steps", default="auto", help="decoding steps per codebook, e.g. 20,10,10,10 (default auto)")
    v.add_argument("--fast", action="store_true", help="fast mode (see generate --help)")
    v.add_argument("--device", default=None, help=DEVICE_HELP)
    v.add_argument("--dtype", default=None, help="weights: fp32, fp16 (half), bf16")
    v.add_argument("--download", action="store_true",
                   help="fetch what is missing first from the official Hugging Face repositories: --model may then "
                        "be an official name (e.g. magnet-small-10secs, into models/magnet/), and its codec and T5 "
                        "come too")

    d = sub.add_parser("download", help="download an official release, T5 or codec from the Hugging Face hub")
    d.add_argument("name", help="e.g. magnet-small-10secs, audio-magnet-small, musicgen-small, t5-base, t5-large, "
                                "encodec_32khz, larger_clap_music")
    d.add_argument("--dir", default=None, help="target folder (default: models/magnet/NAME, models/text_encoders/NAME "
                                               "or models/clap/NAME)")
    d.add_argument("--models-dir", default="models", help="models folder, e.g. ComfyUI/models (default: models)")

    c = sub.add_parser("convert", help="write a release as one .safetensors file (faster to load, never code)")
    c.add_argument("release", help="official release folder (state_dict.bin + compression_state_dict.bin)")
    c.add_argument("output", help="output .safetensors path")
    c.add_argument("--codec", help="transformers EnCodec folder, for releases whose codec file is a pointer")
    c.add_argument("--fp16", action="store_true", help="store LM weights in float16 (half the size)")

    e = sub.add_parser("evaluate", help="CLAP score of audio files against their prompts (text consistency)",
                       description="Print each file's CLAP score (cosine similarity of CLAP audio and text "
                                   "embeddings) and the mean, the text-consistency number of the MAGNeT paper.")
    e.add_argument("audio", nargs="+", metavar="AUDIO_FILE", help="audio files (WAV, FLAC, OGG, MP3, ...)")
    e.add_argument("--clap", required=True, metavar="DIR",
                   help="transformers CLAP folder, e.g. laion/larger_clap_music (music) or "
                        "laion/larger_clap_general (general sound)")
    p = e.add_mutually_exclusive_group(required=True)
    p.add_argument("--prompts", metavar="FILE", help="text file, one prompt per line, paired with the files in "
                                                     "order (blank lines skipped; one line = same prompt for all)")
    p.add_argument("--prompt", metavar="TEXT", help="one prompt for all files (best of N)")
    e.add_argument("--loudness", default="-14", metavar="LUFS",
                   help="normalise each clip to this loudness before scoring, as audiocraft's evaluation does "
                        "(default -14); 'off' scores the files as they are")
    e.add_argument("--sort", action="store_true", help="list the files best first")
    e.add_argument("--batch-size", default="16", help="CLAP windows per forward pass (default 16)")
    e.add_argument("--device", default=None, help=DEVICE_HELP)

    dr = sub.add_parser("doctor", help="check this machine: versions, device, kernels, correctness, speed",
                        description="Print the environment (versions, device, default dtype, kernels), check the "
                                    "decoding path on the device against the specification on a tiny random "
                                    "model (and on a release's real LM with --release), and time one decoding "
                                    "step of the small release's architecture. Ends with one verdict line; exit "
                                    "status 0 when every check passed, 1 otherwise. Paste the whole output (or "
                                    "--json) into a bug report.")
    dr.add_argument("--device", default=None, help=DEVICE_HELP)
    dr.add_argument("--dtype", default="auto", help="weights: auto (the device's default), fp32, fp16, bf16")
    dr.add_argument("--release", default=None, metavar="DIR",
                    help="also check this release's real LM (a few steps of 1 s): folder or converted .safetensors")
    dr.add_argument("--text-encoder", default=None, metavar="DIR",
                    help="T5 folder for --release (default: found beside it; none found = random text states)")
    dr.add_argument("--codec", default=None, metavar="DIR", help="EnCodec folder, for a release whose codec "
                                                                 "file is a pointer")
    dr.add_argument("--json", action="store_true", help="print one JSON object on stdout (progress on stderr)")
    dr.add_argument("--no-speed", action="store_true", help="skip the step-time measurement (on a CPU, most of "
                                                            "the doctor's time)")
    from .train import add_cli as add_train
    add_train(sub)
    return ap


def _lora_help() -> str:
    from .lora import LORA_OPTION_HELP
    return LORA_OPTION_HELP


# -- option checks: each names the option and the fix -------------------------------------------------

def _number(value: str, option: str, fix: str, *, lo=None, hi=None, lo_open=False) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x) or (lo is not None and (x <= lo if lo_open else x < lo)) or (hi is not None and x > hi):
        raise MagnetError(f"{option} {value!r}: {fix}")
    return x


def _whole(value: str, option: str, fix: str, *, lo=None, hi=None) -> int:
    try:
        x = int(str(value).strip())
    except (TypeError, ValueError):
        raise MagnetError(f"{option} {value!r} is not a whole number: {fix}") from None
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        raise MagnetError(f"{option} {value!r}: {fix}")
    return x


def _loudness(value: str) -> float:
    lo, hi = LUFS_RANGE
    return _number(value, "--loudness", f"give a loudness target in LUFS from {lo:g} to {hi:g}, e.g. -14 "
                                        f"(streaming) or -23 (broadcast).", lo=lo, hi=hi)


def _steps(value: str) -> list[int] | None:
    text = str(value).replace(" ", "")
    if text.lower() in ("auto", ""):
        return None
    fix = (f"give one whole number of steps from 1 to {MAX_STEPS} per codebook, e.g. --steps 20,10,10,10, "
           f"or --steps auto for the release's own.")
    parts = text.split(",")
    try:
        steps = [int(p) for p in parts]
    except ValueError:
        raise MagnetError(f"--steps {value!r}: {fix}") from None
    if not all(1 <= n <= MAX_STEPS for n in steps):
        raise MagnetError(f"--steps {value!r}: {fix}")
    return steps


def _device(value):
    from .devices import parse_device
    return parse_device(value, "--device")


def _output_folder(path: Path, option: str) -> None:
    """Fail before any work when `path`'s folder cannot be made or written to."""
    if path.is_dir():
        raise MagnetError(f"cannot write {path}: it is a folder. Give a file name for {option}, e.g. "
                          f"{path / ('out' + (path.suffix or '.wav'))}.")
    blocker = next((d for d in path.parents if d.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise MagnetError(f"cannot write {path}: {blocker} is a file, not a folder. Choose a writable folder "
                          f"with enough free space.")
    probe = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.probe"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise MagnetError(f"cannot write {path}: {_reason(e)}. Choose a writable folder with enough free "
                          f"space.") from None


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = first_line(e)
    if "I/O error: " in text:                    # safetensors: 'Error while serializing: I/O error: X at path "..."'
        text = text.split("I/O error: ", 1)[1].split(" at path ")[0]
    return text


def _generate(a) -> int:
    from . import audio
    from .devices import parse_dtype
    from .model import MagnetModel
    if a.seconds is not None:
        a.seconds = _number(a.seconds, "--seconds", f"give a duration in seconds, more than 0 and at most "
                                                    f"{MAX_SECONDS:g}, e.g. --seconds 10.", lo=0, lo_open=True,
                            hi=MAX_SECONDS)
    if a.overlap is not None:
        a.overlap = _number(a.overlap, "--overlap", "give the seconds of context each next window continues "
                                                    "from, >= 0, e.g. --overlap 5 (default: half the window).",
                            lo=0)
    if a.seed is not None:
        a.seed = _whole(a.seed, "--seed", "give an integer such as 42, or leave --seed out for a random seed.")
    steps = _steps(a.steps)
    sampling = _sampling(a)
    loudness = None if a.loudness is None else _loudness(a.loudness)
    device = _device(a.device)
    dtype = parse_dtype(a.dtype, device, "--dtype")
    out = Path(a.output)
    _output_folder(out, "-o/--output")
    loras = _loras(a)

    print(f"loading {a.model} ...", file=sys.stderr)
    model = MagnetModel.from_pretrained(a.model, text_encoder=a.text_encoder, device=device, dtype=dtype,
                                        codec=a.codec, download=a.download)
    model = _with_loras(model, loras)
    progress = _ProgressBar()
    try:
        codes, seed = model.generate(a.prompts, duration=a.seconds, overlap=a.overlap, seed=a.seed,
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
    print(f"seed {seed}", file=sys.stderr)
    return 0


def _sampling(a) -> dict:
    """generate's sampling options as SamplingParams fields: each one left out is None, the release's own."""
    out = dict(temperature=None, top_k=None, top_p=None, max_cfg_coef=None, min_cfg_coef=None,
               span_arrangement=a.span_arrangement, span_scoring=a.span_scoring)
    if a.temperature is not None:
        out["temperature"] = _number(a.temperature, "--temperature", "give a number >= 0, e.g. 3.", lo=0)
    if a.top_k is not None:
        out["top_k"] = _whole(a.top_k, "--top-k", "give 0 (off) or a number of tokens >= 1, e.g. 250.", lo=0)
    if a.top_p is not None:
        out["top_p"] = _number(a.top_p, "--top-p", "give a probability from 0 (off) to 1, e.g. 0.9.", lo=0, hi=1)
    if a.cfg is not None:
        try:
            out["max_cfg_coef"], out["min_cfg_coef"] = (float(x) for x in a.cfg.split(","))
            if not (math.isfinite(out["max_cfg_coef"]) and math.isfinite(out["min_cfg_coef"])):
                raise ValueError
        except ValueError:
            raise MagnetError(f"--cfg {a.cfg!r} must be two numbers, start,end (e.g. 10,1), or left out for the "
                              f"release's own.") from None
    return out


def _vary(a) -> int:
    from . import audio, edit
    from .devices import parse_dtype
    from .model import MagnetModel
    strength = _number(a.strength, "--strength", "give a share from 0 (unchanged) to 1 (only the length kept), "
                                                 "e.g. --strength 0.4.", lo=0, hi=1)
    keep = _whole(a.keep_codebooks, "--keep-codebooks", "give 0 (redraw everything) or the number of first "
                                                        "codebooks to keep, e.g. 1 (rhythm and melody).", lo=0)
    if a.seed is not None:
        a.seed = _whole(a.seed, "--seed", "give an integer such as 42, or leave --seed out for a random seed.")
    steps = _steps(a.steps)
    device = _device(a.device)
    dtype = parse_dtype(a.dtype, device, "--dtype")
    out = Path(a.output)
    _output_folder(out, "-o/--output")
    wav, sr = audio.read_audio(a.input)
    seconds = wav.shape[-1] / sr
    loras = _loras(a)
    print(f"loading {a.model} ...", file=sys.stderr)
    model = MagnetModel.from_pretrained(a.model, text_encoder=a.text_encoder, device=device, dtype=dtype,
                                        codec=a.codec, download=a.download)
    model = _with_loras(model, loras)
    if keep >= model.cfg.n_q:
        raise MagnetError(f"--keep-codebooks {keep}: this model has {model.cfg.n_q} codebooks; give at most "
                          f"{model.cfg.n_q - 1} (keeping all would change nothing).")
    progress = _ProgressBar()
    try:
        codes, seed = edit.vary(model, model.encode(wav, sr), a.prompt, strength=strength, keep_codebooks=keep,
                                seed=a.seed, decoding_steps=steps, progress=progress, fast=a.fast,
                                return_seed=True)
    finally:
        progress.close()
    result = model.decode(codes, duration=seconds)
    audio.write_wav(out, result[0], model.sample_rate)
    print(f"wrote {out} ({result.shape[-1] / model.sample_rate:.2f} s, {model.sample_rate} Hz)")
    print(f"seed {seed}", file=sys.stderr)
    return 0


def _loras(a) -> list:
    from .lora import parse_lora_spec
    return [parse_lora_spec(spec) for spec in a.lora]


def _with_loras(model, loras):
    from .lora import apply_specs
    return apply_specs(model, loras)


def _train(a) -> int:
    from .train import run_cli
    return run_cli(a)


def _convert(a) -> int:
    import torch

    from .checkpoints import convert_release, converted_path
    out = converted_path(a.output)
    _output_folder(out, "the output")
    partial = out.with_name(out.name + ".partial")      # what convert_release writes, then renames
    try:
        out = convert_release(a.release, out, codec_dir=a.codec, dtype=torch.float16 if a.fp16 else None)
    except BaseException as e:
        partial.unlink(missing_ok=True)
        if _is_write_error(e, out, partial):
            raise MagnetError(f"cannot write {out}: {_reason(e)}. Choose a writable folder with enough free "
                              f"space.") from None
        raise
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def _is_write_error(e: BaseException, out: Path, partial: Path) -> bool:
    """An OSError about the output (or with no file named), or safetensors failing to serialize."""
    if isinstance(e, OSError):
        names = [Path(os.fsdecode(f)) for f in (e.filename, e.filename2) if f is not None]
        return not names or any(n in (out, partial) or n in out.parents for n in names)
    return type(e).__name__ == "SafetensorError" and "serializ" in str(e)


def _read_prompts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise MagnetError(f"prompts file not found: {p}. Give a text file with one prompt per line.")
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MagnetError(f"cannot read prompts file {p} ({e}). Save it as UTF-8 text, one prompt per line.") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise MagnetError(f"prompts file {p} has no prompts. Write one prompt per line.")
    return prompts


def _evaluate(a) -> int:
    from . import audio
    from .clap import ClapScorer

    if a.loudness.strip().lower() in ("off", "none", "no"):
        loudness = None
    else:
        loudness = _number(a.loudness, "--loudness", f"give a loudness target in LUFS from {LUFS_RANGE[0]:g} "
                                                     f"to {LUFS_RANGE[1]:g}, e.g. -14, or 'off'.",
                           lo=LUFS_RANGE[0], hi=LUFS_RANGE[1])
    batch_size = _whole(a.batch_size, "--batch-size", "give a number of windows >= 1, e.g. 16.", lo=1)
    device = _device(a.device)
    prompts = [a.prompt] if a.prompt is not None else _read_prompts(a.prompts)
    if len(prompts) == 1:
        prompts = prompts * len(a.audio)
    if len(prompts) != len(a.audio):
        raise MagnetError(f"{len(a.audio)} audio files but {len(prompts)} prompts in {a.prompts}: give one "
                          f"prompt per file (in the same order), or a single prompt for all files.")
    clips = [audio.read_audio(f) for f in a.audio]  # every file is checked before the model loads
    print(f"loading {a.clap} ...", file=sys.stderr)
    scorer = ClapScorer.from_pretrained(a.clap, device=device)
    scores = scorer.score([w for w, _ in clips], [sr for _, sr in clips], prompts, loudness=loudness,
                          batch_size=batch_size).tolist()
    rows = list(range(len(a.audio)))
    if a.sort:
        rows.sort(key=lambda i: -scores[i])
    width = max(len("file"), *(len(f) for f in a.audio))
    shown = [p if len(p) <= 60 else p[:59] + "\u2026" for p in prompts]
    pwidth = max(len("prompt"), *(len(p) for p in shown))
    print(f"{'file':<{width}}  {'prompt':<{pwidth}}  CLAP")
    for i in rows:
        print(f"{a.audio[i]:<{width}}  {shown[i]:<{pwidth}}  {scores[i]:.4f}")
    mean = sum(scores) / len(scores)
    norm = "as is" if loudness is None else f"at {loudness:g} LUFS"
    print(f"mean CLAP score: {mean:.4f} over {len(scores)} file{'s' * (len(scores) != 1)} "
          f"({scorer.name}, audio {norm})")
    return 0


def _doctor(a) -> int:
    from . import doctor
    if a.codec is not None and a.release is None:
        raise MagnetError("--codec needs --release: give the release folder whose codec file points to it.")
    echo = (lambda line: print(line, file=sys.stderr, flush=True)) if a.json else (lambda line: print(line, flush=True))
    report = doctor.run(a.device, a.dtype, release=a.release, text_encoder=a.text_encoder, codec=a.codec,
                        speed=not a.no_speed, echo=echo)
    if a.json:
        print(doctor.to_json(report), flush=True)
    return 0 if report["ok"] else 1


def _download(a) -> int:
    from .hub import download
    bar = _ProgressBar("downloading", unit="B", unit_scale=True)
    try:
        path = download(a.name, a.dir, a.models_dir, progress=bar,
                        echo=lambda line: print(line, file=sys.stderr, flush=True))
    finally:
        bar.close()
    print(f"downloaded into {path}")
    return 0


class _ProgressBar:
    """progress(done, total) as a tqdm bar on stderr, made at the first step (a refused argument prints no
    empty bar); close() ends its line, so an error then prints on a line of its own."""

    def __init__(self, desc: str = "decoding", **tqdm_kw):
        self.bar = None
        self.desc, self.tqdm_kw = desc, tqdm_kw or {"unit": "step"}

    def __call__(self, done, total):
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=self.desc, file=sys.stderr, **self.tqdm_kw)
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 a user error, 1 out of memory, 130 interrupted).
    Every error is one line on stderr, never a traceback."""
    try:
        a = _parser().parse_args(argv)
        return {"generate": _generate, "download": _download, "convert": _convert, "evaluate": _evaluate,
                "vary": _vary, "doctor": _doctor, "train": _train}[a.cmd](a)
    except SystemExit as e:          # -h / --help
        return e.code if isinstance(e.code, int) else 0
    except MagnetError as e:
        return _fail(f"error: {e}", 2)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except MemoryError:
        return _fail(_OOM, 1)
    except OSError as e:             # a file the engine did not expect to fail (permissions, disk, network drive)
        where = f" {os.fsdecode(e.filename)}" if e.filename is not None else ""
        return _fail(f"error: {e.strerror or e}{':' + where if where else ''}. Check the path, its permissions "
                     f"and the free space.", 2)
    except RuntimeError as e:
        from .audio import is_out_of_memory
        if is_out_of_memory(e):
            return _fail(_OOM, 1)
        raise


_OOM = ("error: ran out of memory: ask for a shorter duration (--seconds) or a smaller batch (fewer prompts at "
        "once), or use --dtype fp16 on a GPU.")


def _fail(message: str, code: int) -> int:
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
