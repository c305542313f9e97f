"""`python -m magnet download NAME`: an official release, T5, codec or CLAP into the models folder."""
from __future__ import annotations

from .. import hub
from . import common


def add(sub) -> None:
    d = sub.add_parser("download", help="download an official release, T5 or codec from the Hugging Face hub")
    d.add_argument("name", help="e.g. magnet-small-10secs, audio-magnet-small, musicgen-small, t5-base, t5-large, "
                                "encodec_32khz, larger_clap_music")
    d.add_argument("--dir", default=None, help="target folder (default: NAME in the models folder's magnet/, "
                                               "text_encoders/ or clap/)")
    d.add_argument("--models-dir", default=None, metavar="DIR",
                   help="models folder, e.g. ComfyUI/models (default: the one generate uses: $MAGNET_MODELS_DIR, "
                        "else the per-user folder, see generate -h)")
    d.set_defaults(run=run)


def run(a) -> int:
    _, kind, short = hub.resolve_name(a.name)          # an unknown name is refused before anything else
    dest = a.dir if a.dir is not None else hub.models_dirs(kind, a.models_dir)[0] / short
    bar = common.ProgressBar("downloading", unit="B", unit_scale=True)
    try:
        path = hub.download(a.name, dest, progress=bar, echo=bar.echo)
    finally:
        bar.close()
    print(f"downloaded into {path}")
    return 0
