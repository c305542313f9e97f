"""`python -m magnet evaluate AUDIO_FILE... --clap DIR --prompt TEXT`: CLAP scores of audio files."""
from __future__ import annotations

from pathlib import Path

from ..errors import MagnetError
from . import common


def add(sub) -> None:
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
    common.add_device_options(e, with_dtype=False)
    e.set_defaults(run=run)


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


def run(a) -> int:
    from .. import audio
    from ..clap import ClapScorer

    loudness = common.loudness(a.loudness, off=True)
    batch_size = common.number(a.batch_size, "--batch-size", "give a number of windows >= 1, e.g. 16.", whole=True,
                               lo=1)
    device = common.device(a.device)
    prompts = [a.prompt] if a.prompt is not None else _read_prompts(a.prompts)
    if len(prompts) == 1:
        prompts = prompts * len(a.audio)
    if len(prompts) != len(a.audio):
        raise MagnetError(f"{len(a.audio)} audio files but {len(prompts)} prompts in {a.prompts}: give one "
                          f"prompt per file (in the same order), or a single prompt for all files.")
    clips = [audio.read_audio(f) for f in a.audio]  # every file is checked before the model loads
    common.echo(f"loading {a.clap} ...")
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
