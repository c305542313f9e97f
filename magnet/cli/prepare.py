"""`python -m magnet prepare DATA_DIR`: captions for a folder of audio and its manifest (`magnet.prepare`)."""
from __future__ import annotations

from . import common, models


def add(sub) -> None:
    p = sub.add_parser("prepare", help="caption a folder of audio for training (CLAP tags, tempo, key) and write "
                                       "its manifest magnet_dataset.jsonl",
                       description="For each audio file in DATA_DIR without a caption, write <name>.txt from "
                                   "zero-shot CLAP tags (genre, moods, instruments, vocals, tempo word), plus tempo "
                                   "and key when librosa is installed (pip install 'magnet-audio[prepare]'), and "
                                   "write DATA_DIR/magnet_dataset.jsonl (file, caption, seconds, tags, bpm, key), "
                                   "which training reads before the .txt files: edit it to fix captions.")
    p.add_argument("data_dir", metavar="DATA_DIR", help="folder of audio files")
    p.add_argument("--clap", metavar="DIR",
                   help="transformers CLAP folder (default: larger_clap_music from the models folder, downloaded "
                        "when missing)")
    p.add_argument("--overwrite", action="store_true", help="replace existing captions too (default: keep them)")
    p.add_argument("--models-dir", default=None, help="the models folder (see generate --help)")
    p.add_argument("--no-download", action="store_true", help="never download; a missing CLAP model is an error")
    common.add_device_options(p, with_dtype=False)
    p.set_defaults(run=run)


def run(a) -> int:
    from ..clap import ClapScorer
    from ..prepare import prepare_folder
    device = common.device(a.device)
    folder = models.clap_folder(a)
    common.echo(f"loading {folder} ...")
    clap = ClapScorer.from_pretrained(folder, device=device)
    bar = common.ProgressBar("tagging", unit="file")
    try:
        result = prepare_folder(a.data_dir, clap, overwrite=a.overwrite, progress=bar, log=bar.echo)
    finally:
        bar.close()
    print(result.summary())
    return 0
