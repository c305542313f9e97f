"""Command line: `python -m magnet generate|convert|evaluate ...` (see `python -m magnet -h`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import MagnetError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m magnet", description="MAGNeT text-to-music / text-to-sound.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate audio from text prompts and write WAV files")
    g.add_argument("prompts", nargs="+", help="one or more text prompts (\"\" = unconditional)")
    g.add_argument("--model", required=True, help="release folder or converted .safetensors file")
    g.add_argument("--text-encoder", help="T5 folder (default: found beside the release, or $MAGNET_TEXT_ENCODER_DIR)")
    g.add_argument("--codec", help="transformers EnCodec folder, for releases whose codec file is a pointer")
    g.add_argument("-o", "--output", default="magnet.wav", help="WAV path; several prompts get _1, _2, ... suffixes")
    g.add_argument("--seconds", type=float, default=None, help="duration (default: the release's window)")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    g.add_argument("--steps", default="20,10,10,10", help="decoding steps per codebook (default 20,10,10,10)")
    g.add_argument("--temperature", type=float, default=3.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--cfg", default="10,1", help="classifier-free guidance start,end (default 10,1)")
    g.add_argument("--span-arrangement", default="nonoverlap", choices=["nonoverlap", "stride1"])
    g.add_argument("--span-scoring", default="max", choices=["max", "prod"])
    g.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    g.add_argument("--loudness", type=float, default=None, help="normalise to this LUFS target, e.g. -14")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")

    d = sub.add_parser("download", help="download an official release, T5 or codec from the Hugging Face hub")
    d.add_argument("name", help="e.g. magnet-small-10secs, audio-magnet-small, t5-base, t5-large, encodec_32khz")
    d.add_argument("--dir", default=None, help="target folder (default: models/magnet/NAME or models/text_encoders/NAME)")
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
    e.add_argument("--batch-size", type=int, default=16, help="CLAP windows per forward pass (default 16)")
    e.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    return ap


def _generate(a) -> int:
    from . import audio
    from .model import MagnetModel
    from .sampling import parse_steps
    try:
        cfg_max, cfg_min = (float(x) for x in a.cfg.split(","))
    except ValueError:
        raise MagnetError(f"--cfg {a.cfg!r} must be two numbers, start,end (e.g. 10,1).") from None
    print(f"loading {a.model} ...", file=sys.stderr)
    model = MagnetModel.from_pretrained(a.model, text_encoder=a.text_encoder, device=a.device, codec=a.codec)
    from tqdm import tqdm
    bar = tqdm(total=None, unit="step", desc="decoding", file=sys.stderr)

    def progress(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()

    codes = model.generate(a.prompts, duration=a.seconds, seed=a.seed, use_sampling=not a.greedy,
                           temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, max_cfg_coef=cfg_max,
                           min_cfg_coef=cfg_min, decoding_steps=parse_steps(a.steps),
                           span_arrangement=a.span_arrangement, span_scoring=a.span_scoring, progress=progress)
    bar.close()
    wav = model.decode(codes)
    if a.loudness is not None:
        wav = audio.normalize_loudness(wav, model.sample_rate, a.loudness)
    out = Path(a.output)
    for i in range(wav.shape[0]):
        path = out if wav.shape[0] == 1 else out.with_name(f"{out.stem}_{i + 1}{out.suffix or '.wav'}")
        audio.write_wav(path, wav[i], model.sample_rate)
        print(f"wrote {path} ({wav.shape[-1] / model.sample_rate:.2f} s, {model.sample_rate} Hz)")
    print(f"seed {model.last_seed}", file=sys.stderr)
    return 0


def _convert(a) -> int:
    import torch

    from .checkpoints import convert_release
    out = convert_release(a.release, a.output, codec_dir=a.codec, dtype=torch.float16 if a.fp16 else None)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


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
        try:
            loudness = float(a.loudness)
        except ValueError:
            raise MagnetError(f"--loudness {a.loudness!r} must be a LUFS value such as -14, or 'off'.") from None
    prompts = [a.prompt] if a.prompt is not None else _read_prompts(a.prompts)
    if len(prompts) == 1:
        prompts = prompts * len(a.audio)
    if len(prompts) != len(a.audio):
        raise MagnetError(f"{len(a.audio)} audio files but {len(prompts)} prompts in {a.prompts}: give one "
                          f"prompt per file (in the same order), or a single prompt for all files.")
    clips = [audio.read_audio(f) for f in a.audio]  # every file is checked before the model loads
    print(f"loading {a.clap} ...", file=sys.stderr)
    scorer = ClapScorer.from_pretrained(a.clap, device=a.device)
    scores = scorer.score([w for w, _ in clips], [sr for _, sr in clips], prompts, loudness=loudness,
                          batch_size=a.batch_size).tolist()
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


def _download(a) -> int:
    from .hub import download
    print(f"downloaded into {download(a.name, a.dir, a.models_dir)}")
    return 0


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    try:
        return {"generate": _generate, "download": _download, "convert": _convert, "evaluate": _evaluate}[a.cmd](a)
    except MagnetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
