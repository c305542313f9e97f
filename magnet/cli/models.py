"""--model and what it needs, on disk before loading: an official release name is looked for in the models
folder (`hub.models_dirs`) and downloaded there when missing, with its codec (when its codec file is a
pointer) and its own T5; a folder or converted file given to --model is used as it is (its official codec and
T5, when missing, are fetched into the models folder). `--no-download` turns every download into an error
naming the folder and the command that fetches it."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .. import hub
from ..defaults import KINDS, kind_of
from ..errors import MagnetError
from . import common


@dataclass
class Prepared:
    """What `from_pretrained` is given: the release, its T5 (None: look for it), the search folders."""
    release: str | Path
    text_encoder: str | Path | None
    search_dirs: list[Path]


def _bare(name: str) -> bool:
    return "/" not in name and "\\" not in name and name not in (".", "..")


class _Fetcher:
    """hub.download with a byte progress bar per download and the lines it prints on stderr; refuses with
    `--no-download`, naming the folder and the command."""

    def __init__(self, a):
        self.allowed, self.models_dir = not a.no_download, a.models_dir

    def __call__(self, name: str, dest: Path) -> Path:
        if not self.allowed:
            where = hub.models_dir_source(hub.resolve_name(name)[1], self.models_dir)
            raise hub.missing(name, dest, f"(the models folder, from {where}) and --no-download is given")
        bar = common.ProgressBar("downloading", unit="B", unit_scale=True)
        try:
            path = hub.download(name, dest, progress=bar, echo=bar.echo)
        finally:
            bar.close()
        return path


def prepare(a) -> Prepared:
    """--model (default `hub.DEFAULT_RELEASE`) as a release on disk, fetching what is missing."""
    from ..model import find_text_encoder
    name = str(a.model or hub.DEFAULT_RELEASE)
    releases = hub.models_dirs("release", a.models_dir)
    encoders = hub.models_dirs("text_encoder", a.models_dir)
    search = [*releases, *encoders]
    fetch = _Fetcher(a)
    path = Path(name)
    if path.exists():
        release = path                                        # a folder or file, used as it is
    elif _bare(name) and hub.is_official(name, "release"):
        if kind_of(name) is None:
            magnet = ", ".join(r for k in KINDS.values() for r in k.releases)
            raise MagnetError(f"--model {name} is a MusicGen release; this command runs MAGNeT: give one of "
                              f"{magnet}.")
        release = next((d / name for d in releases if (d / name).exists()), None) or fetch(name, releases[0] / name)
    elif a.download and hub.is_official(path.name, "release"):
        release = fetch(path.name, path)                      # --download: a path ending in an official name
    else:
        return Prepared(name, a.text_encoder, search)         # the loader says what is wrong with it
    text_encoder = a.text_encoder
    if release.is_dir() and kind_of(release.name) is not None:            # an official MAGNeT release
        if a.codec is None:
            _codec(release, search, fetch, releases[0])
        t5 = hub.release_text_encoder(release.name)
        if text_encoder is None and find_text_encoder(t5, release, search) is None:
            text_encoder = fetch(t5, encoders[0] / t5)
    return Prepared(release, text_encoder, search)


def _codec(release: Path, search: list[Path], fetch: _Fetcher, into: Path) -> None:
    """The codec a release's pointer names, when it is in none of the places the loader looks."""
    pointer = hub.codec_pointer(release)
    if pointer is None or not hub.is_official(pointer, "codec") or os.environ.get("MAGNET_CODEC_DIR"):
        return
    if hub.ensure_codec(release, search, download_missing=False) is None:
        name = pointer.split("/")[-1]
        fetch(name, into / name)


def load(a, *, device=None, dtype=None):
    """The MagnetModel --model names, after `prepare`; says on stderr what it loads."""
    from ..model import MagnetModel
    p = prepare(a)
    common.echo(f"loading {p.release} ...")
    return MagnetModel.from_pretrained(p.release, text_encoder=p.text_encoder, device=device, dtype=dtype,
                                       codec=a.codec, search_dirs=p.search_dirs)


def clap_folder(a, fetch: bool = True) -> str | None:
    """--clap, else larger_clap_music in the models folder (downloaded there when missing and `fetch`)."""
    from .. import hub
    if a.clap:
        return a.clap
    name = next(iter(hub.CLAPS))
    dirs = hub.models_dirs("clap", a.models_dir)
    found = next((d / name for d in dirs if (d / name / "config.json").is_file()), None)
    if found is not None or not fetch:
        return None if found is None else str(found)
    return str(_Fetcher(a)(name, dirs[0] / name))
