"""`python -m magnet evaluate`: CLAP scores of audio files against their prompts (`AUDIO_FILE... --prompt TEXT`),
of a generated set (`GEN_DIR --prompts FILE`, paired as `generate --prompts` names its files), and the Frechet
audio distance between two sets (`--fad REF GEN`, `magnet.embeddings.fad_between`)."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import MagnetError
from . import common, models


def add(sub) -> None:
    e = sub.add_parser("evaluate", help="CLAP scores of files or of a generated set; FAD between two sets",
                       description="Print each file's CLAP score (cosine similarity of CLAP audio and text "
                                   "embeddings) and the mean, the text-consistency number of the MAGNeT paper; for "
                                   "a folder made by `generate --prompts FILE --out DIR`, its mean and spread; with "
                                   "--fad REF GEN, the Frechet audio distance between two sets.")
    e.add_argument("audio", nargs="*", metavar="AUDIO_FILE",
                   help="audio files (WAV, FLAC, OGG, MP3, ...), or one folder generated with --prompts")
    e.add_argument("--clap", metavar="DIR",
                   help="transformers CLAP folder, e.g. laion/larger_clap_music (music) or laion/larger_clap_general "
                        "(default: larger_clap_music from the models folder, downloaded when missing)")
    e.add_argument("--fad", nargs=2, metavar=("REF", "GEN"),
                   help="the Frechet audio distance between two sets, each a folder of audio or a statistics file "
                        "(.npz, from --save-stats); with FAD-inf when both have 50 clips or more, and GEN's 5 clips "
                        "farthest from REF")
    e.add_argument("--embedding", choices=["clap", "encodec"], default=None,
                   help="what FAD compares: CLAP audio embeddings per 10 s window, or the release's EnCodec encoder "
                        "latents per frame (default: clap when a CLAP model is given or in the models folder, else "
                        "encodec)")
    e.add_argument("--save-stats", metavar="FILE", help="with --fad: save REF's statistics (.npz), to reuse as REF")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    common.add_model_options(e)
    p = e.add_mutually_exclusive_group()
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
    if a.fad is not None:
        return run_fad(a)
    if len(a.audio) == 1 and Path(a.audio[0]).is_dir():
        return run_set(a)
    if not a.audio:
        raise MagnetError("give audio files to score (with --prompt or --prompts), a generated folder with "
                          "--prompts, or --fad REF GEN.")
    if a.prompt is None and a.prompts is None:
        raise MagnetError("give the prompt the files were made from: --prompt TEXT, or --prompts FILE (one per line).")
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
    clap = models.clap_folder(a)
    common.echo(f"loading {clap} ...")
    scorer = ClapScorer.from_pretrained(clap, device=device)
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


def run_set(a) -> int:
    """`evaluate GEN_DIR --prompts FILE`: the CLAP score of a set made by `generate --prompts FILE --out GEN_DIR`."""
    from ..embeddings import clap_score_outputs
    if a.prompts is None:
        raise MagnetError("a generated folder is scored against the prompts file it was made from: add --prompts FILE.")
    loudness = common.loudness(a.loudness, off=True)
    batch_size = common.number(a.batch_size, "--batch-size", "give a number of windows >= 1, e.g. 16.", whole=True,
                               lo=1)
    device = common.device(a.device)
    r = clap_score_outputs(a.audio[0], a.prompts, models.clap_folder(a), loudness=loudness, batch_size=batch_size,
                           device=device)
    if a.json:
        print(json.dumps(r))
        return 0
    for row in r["per_file"]:
        print(f"{row['file']}  {row['score']:.4f}")
    print(f"CLAP score: mean {r['mean']:.4f}, spread (std) {r['std']:.4f} over {r['count']} clip(s)"
          + (f"; {len(r['skipped'])} skipped" if r["skipped"] else ""))
    return 0


def run_fad(a) -> int:
    """`evaluate --fad REF GEN`."""
    from ..embeddings import fad_between
    if a.audio:
        raise MagnetError("--fad compares two sets given after it (--fad REF GEN): leave out the other files.")
    loudness = common.loudness(a.loudness, off=True)
    device = common.device(a.device)
    embedding = a.embedding or ("clap" if models.clap_folder(a, fetch=False) else "encodec")
    clap = models.clap_folder(a) if embedding == "clap" else None
    model = models.prepare(a).release if embedding == "encodec" else None
    bar = common.ProgressBar("embedding", unit="clip")
    try:
        r = fad_between(a.fad[0], a.fad[1], embedding, model=model, clap=clap, codec_dir=a.codec, loudness=loudness,
                        device=device, save_ref_stats=a.save_stats, progress=lambda which, d, t: bar(d, t))
    finally:
        bar.close()
    if a.json:
        print(json.dumps(r))
        return 0
    print(f"FAD ({r['embedding']}): {r['fad']:.4f}  (REF {r['ref_count']} clips, GEN {r['gen_count']} clips)")
    if r.get("fad_inf") is not None:
        print(f"FAD-inf: {r['fad_inf']:.4f}")
    for o in r.get("outliers") or []:
        print(f"  far from REF: {o['file']}  ({o['distance']:.3g})")
    if a.save_stats:
        print(f"saved REF's statistics to {a.save_stats}")
    return 0
