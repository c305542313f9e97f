"""What the subcommands share: the parser that fails in one line, the options several of them take (model,
device, seed, steps, fast mode, sampling, LoRAs), the one number check every option goes through, the output
check and the progress bar."""
from __future__ import annotations

import argparse
import math
import sys
import uuid
from pathlib import Path

from ..defaults import DEFAULT_STEPS, MAX_STEPS, fallback, per_release
from ..errors import MagnetError, first_line
from ..hub import DEFAULT_RELEASE

PROG = "python -m magnet"
MAX_SECONDS = 600.0     # longer asks run out of memory when the codec decodes the whole clip at once
DEVICE_HELP = "cpu, cuda, cuda:1, mps ... (default: cuda, else mps, else cpu)"
OWN = "default: the release's own"     # a sampling option left out takes the value the release stores (xp.cfg)


class UsageError(MagnetError):
    """A command line argparse refused (unknown option, missing argument, not an int)."""


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing the usage block and exiting, so `main` prints one line."""

    def error(self, message):
        raise UsageError(f"{message}. See `{self.prog} -h`.")


# -- the one number check: each refusal names the option, the value and the fix -----------------------

def number(value, option: str, fix: str, *, whole: bool = False, lo=None, hi=None, lo_open: bool = False):
    """`value` as a finite float (an int with `whole`) within [lo, hi] (lo itself refused with `lo_open`);
    else a MagnetError: '<option> <value> is not a [whole] number: <fix>' or '<option> <value>: <fix>'."""
    try:
        x = int(str(value).strip()) if whole else float(value)
        if not math.isfinite(x):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise MagnetError(f"{option} {value!r} is not a {'whole ' if whole else ''}number: {fix}") from None
    if (lo is not None and (x <= lo if lo_open else x < lo)) or (hi is not None and x > hi):
        raise MagnetError(f"{option} {value!r}: {fix}")
    return x


def seed(value):
    """--seed: None (a random seed) or a whole number."""
    if value is None:
        return None
    return number(value, "--seed", "give an integer such as 42, or leave --seed out for a random seed.", whole=True)


def steps(value) -> list[int] | None:
    """--steps: `sampling.parse_steps` (auto -> None, the release's own), each count within 1..MAX_STEPS."""
    from ..sampling import parse_steps
    fix = (f"give one whole number of steps from 1 to {MAX_STEPS} per codebook, e.g. --steps "
           f"{','.join(map(str, DEFAULT_STEPS))}, or --steps auto for the release's own.")
    try:
        out = parse_steps(value)
    except MagnetError:
        raise MagnetError(f"--steps {value!r}: {fix}") from None
    if out is not None and not (out and all(1 <= n <= MAX_STEPS for n in out)):
        raise MagnetError(f"--steps {value!r}: {fix}")
    return out


def loudness(value, *, off: bool = False) -> float | None:
    """--loudness: a LUFS target within audio.LUFS_RANGE; with `off`, also 'off' (None)."""
    from ..audio import LUFS_RANGE
    if value is None or (off and str(value).strip().lower() in ("off", "none", "no")):
        return None
    lo, hi = LUFS_RANGE
    fix = (f"give a loudness target in LUFS from {lo:g} to {hi:g}, e.g. -14, or 'off'." if off else
           f"give a loudness target in LUFS from {lo:g} to {hi:g}, e.g. -14 (streaming) or -23 (broadcast).")
    return number(value, "--loudness", fix, lo=lo, hi=hi)


def device(value):
    from ..devices import parse_device
    return parse_device(value, "--device")


def dtype(value, dev):
    from ..devices import parse_dtype
    return parse_dtype(value, dev, "--dtype")


# -- options several subcommands take ----------------------------------------------------------------

def add_model_options(p, *, required: bool = False) -> None:
    """--model (an official name, fetched into the models folder when missing, or a folder / converted file
    used as it is), --text-encoder, --codec, --models-dir, --no-download (and the older --download)."""
    default = "" if required else f" (default: {DEFAULT_RELEASE})"
    p.add_argument("--model", required=required, default=None,
                   help=f"an official release name such as {DEFAULT_RELEASE} (looked for in the models folder, "
                        f"downloaded there when missing), or a release folder or converted .safetensors file, "
                        f"used as it is{default}")
    p.add_argument("--text-encoder", help="T5 folder (default: found beside the release, in the models folder or "
                                          "$MAGNET_TEXT_ENCODER_DIR; an official release's own T5 is downloaded "
                                          "into the models folder when missing)")
    p.add_argument("--codec", help="transformers EnCodec folder, for releases whose codec file is a pointer "
                                   "(default: found beside the release or in the models folder, else downloaded)")
    p.add_argument("--models-dir", default=None, metavar="DIR",
                   help="models folder, e.g. ComfyUI/models: releases in DIR/magnet, T5s in DIR/text_encoders "
                        "(default: $MAGNET_MODELS_DIR, else the per-user folder: ~/.cache/magnet/models on Linux, "
                        "~/Library/Caches/magnet/models on macOS, %%LOCALAPPDATA%%\\magnet\\models on Windows)")
    fetch = p.add_mutually_exclusive_group()
    fetch.add_argument("--no-download", action="store_true",
                       help="never contact the hub: a model missing from the models folder is an error naming the "
                            "command that fetches it")
    fetch.add_argument("--download", action="store_true",
                       help="fetch what is missing (the default; kept for older scripts): with it, a --model path "
                            "ending in an official name is also downloaded into that path")


def add_device_options(p, *, with_dtype: bool = True) -> None:
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    if with_dtype:
        p.add_argument("--dtype", default=None, help="weights: fp32, fp16 (half), bf16 (default: fp16 on CUDA GPUs "
                                                     "of compute capability 7.0 or newer except GTX 16xx, else fp32)")


def add_decoding_options(p) -> None:
    """--seed, --steps, --fast and --lora: what every subcommand that decodes takes."""
    from ..lora import LORA_OPTION_HELP
    from ..sampling import FastMode
    p.add_argument("--seed", default=None, help="random seed, a whole number (default: random, printed)")
    p.add_argument("--steps", default="auto",
                   help=f"decoding steps per codebook, e.g. {','.join(map(str, DEFAULT_STEPS))} (default auto: "
                        f"the release's own: {per_release('decoding_steps')}; "
                        f"{fallback('decoding_steps')} for a release that stores none)")
    p.add_argument("--fast", action="store_true", help=FastMode().summary() + " (default: exact)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]", help=LORA_OPTION_HELP)


def add_sampling_options(p) -> None:
    """The sampling options: each left out is the release's own (quoted from `defaults.KINDS`)."""
    p.add_argument("--temperature", default=None,
                   help=f"sampling temperature, annealed to 0 ({OWN}: {per_release('temperature')})")
    p.add_argument("--top-k", default=None,
                   help=f"sample among the k most likely tokens, 0 = off ({OWN}: {per_release('top_k')})")
    p.add_argument("--top-p", default=None,
                   help=f"sample among the most likely tokens of this total probability, 0 = off ({OWN}: "
                        f"{per_release('top_p')})")
    p.add_argument("--cfg", default=None, metavar="START,END",
                   help=f"classifier-free guidance, annealed from START to END ({OWN}: "
                        f"{per_release('max_cfg_coef', 'min_cfg_coef')})")
    p.add_argument("--span-arrangement", default=None, choices=["nonoverlap", "stride1"],
                   help=f"spans re-masked: whole spans or overlapping ones ({OWN}: "
                        f"{per_release('span_arrangement')})")
    p.add_argument("--span-scoring", default=None, choices=["max", "prod"],
                   help=f"how a span's tokens score it ({OWN}: {per_release('span_scoring')})")
    p.add_argument("--greedy", action="store_true", help="argmax instead of sampling")


def sampling(a) -> dict:
    """The sampling options as SamplingParams fields: each one left out is None, the release's own."""
    out = dict(temperature=None, top_k=None, top_p=None, max_cfg_coef=None, min_cfg_coef=None,
               span_arrangement=a.span_arrangement, span_scoring=a.span_scoring)
    if a.temperature is not None:
        out["temperature"] = number(a.temperature, "--temperature", "give a number >= 0, e.g. 3.", lo=0)
    if a.top_k is not None:
        out["top_k"] = number(a.top_k, "--top-k", "give 0 (off) or a number of tokens >= 1, e.g. 250.", whole=True,
                              lo=0)
    if a.top_p is not None:
        out["top_p"] = number(a.top_p, "--top-p", "give a probability from 0 (off) to 1, e.g. 0.9.", lo=0, hi=1)
    if a.cfg is not None:
        fix = "must be two numbers, start,end (e.g. 10,1), or left out for the release's own."
        parts = a.cfg.split(",")
        if len(parts) != 2:
            raise MagnetError(f"--cfg {a.cfg!r} {fix}")
        try:
            out["max_cfg_coef"], out["min_cfg_coef"] = (number(x, "--cfg", fix) for x in parts)
        except MagnetError:
            raise MagnetError(f"--cfg {a.cfg!r} {fix}") from None
    return out


def loras(a) -> list:
    from ..lora import parse_lora_spec
    return [parse_lora_spec(spec) for spec in a.lora]


def with_loras(model, specs):
    from ..lora import apply_specs
    return apply_specs(model, specs)


# -- output files -------------------------------------------------------------------------------------

def output_folder(path: Path, option: str) -> None:
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
        raise MagnetError(f"cannot write {path}: {reason(e)}. Choose a writable folder with enough free "
                          f"space.") from None


def reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = first_line(e)
    if "I/O error: " in text:                    # safetensors: 'Error while serializing: I/O error: X at path "..."'
        text = text.split("I/O error: ", 1)[1].split(" at path ")[0]
    return text


def echo(line: str) -> None:
    """A line for the user that is not the command's result: on stderr."""
    print(line, file=sys.stderr, flush=True)


class ProgressBar:
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
            self.bar = None

    def echo(self, line: str) -> None:
        """`echo` on a line of its own: a bar being drawn is ended first (the next step starts a new one)."""
        self.close()
        echo(line)
