"""Optional downloads from the Hugging Face hub: an explicit action (`python -m magnet download`), never
done behind the user's back. Offline, or without huggingface_hub, it fails with the folder to fill by hand."""
from __future__ import annotations

import errno

from pathlib import Path

from .checkpoints import OFFICIAL
from .errors import MagnetError, first_line

RELEASES = ["facebook/magnet-small-10secs", "facebook/magnet-medium-10secs", "facebook/magnet-small-30secs",
            "facebook/magnet-medium-30secs", "facebook/audio-magnet-small", "facebook/audio-magnet-medium",
            "facebook/musicgen-small", "facebook/musicgen-medium"]
TEXT_ENCODERS = {"t5-base": "google-t5/t5-base", "t5-large": "google-t5/t5-large"}
CODECS = ["facebook/encodec_32khz"]
# what each kind needs (no TensorFlow/Flax/pickle duplicates)
PATTERNS = {
    "release": [*OFFICIAL.files, "*.md"],          # releases come in the official format
    "text_encoder": ["config.json", "model.safetensors", "spiece.model", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json"],
    "codec": ["config.json", "model.safetensors", "preprocessor_config.json"],
}


def resolve_name(name: str) -> tuple[str, str, str]:
    """A short name ('magnet-small-10secs', 't5-base') or a repo id -> (repo id, kind, folder name)."""
    short = name.rstrip("/").split("/")[-1]
    if short in TEXT_ENCODERS:
        return TEXT_ENCODERS[short], "text_encoder", short
    for repo in CODECS:
        if short == repo.split("/")[-1]:
            return repo, "codec", short
    for repo in RELEASES:
        if short == repo.split("/")[-1]:
            return repo, "release", short
    known = [r.split("/")[-1] for r in RELEASES] + list(TEXT_ENCODERS) + [c.split("/")[-1] for c in CODECS]
    raise MagnetError(f"unknown model {name!r}: choose one of {', '.join(known)}.")


def default_folder(kind: str, short: str, models_dir: str | Path = "models") -> Path:
    sub = {"release": "magnet", "codec": "magnet", "text_encoder": "text_encoders"}[kind]
    return Path(models_dir) / sub / short


def download(name: str, dest: str | Path | None = None, models_dir: str | Path = "models") -> Path:
    """Download an official release, T5 or codec into `dest` (default models/magnet/<name> or
    models/text_encoders/<name>, the folders ComfyUI and the loaders look in)."""
    repo, kind, short = resolve_name(name)
    dest = Path(dest) if dest is not None else default_folder(kind, short, models_dir)
    by_hand = (f"Download the files of https://huggingface.co/{repo} ({', '.join(PATTERNS[kind])}) on a machine "
               f"with internet and put them in {dest}.")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MagnetError(f"downloading needs huggingface_hub (`pip install huggingface_hub`). Or: {by_hand}") from None
    try:
        dest.mkdir(parents=True, exist_ok=True)
        probe = dest / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise MagnetError(f"cannot write into {dest} ({e.strerror or e}): choose a folder you can write to "
                          f"(--dir / --models-dir).") from None
    try:
        snapshot_download(repo, local_dir=str(dest), allow_patterns=PATTERNS[kind])
    except OSError as e:
        if getattr(e, "errno", None) not in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
            raise MagnetError(f"could not download {repo} into {dest} ({type(e).__name__}: "
                              f"{first_line(e)}). Offline? {by_hand}") from None
        raise MagnetError(f"could not write {repo} into {dest} ({e.strerror or e}): check free space and "
                          f"permissions, or choose another folder.") from None
    except Exception as e:  # offline, DNS, HTTP errors, missing repo: all end the same way for the user
        raise MagnetError(f"could not download {repo} into {dest} ({type(e).__name__}: "
                          f"{first_line(e)}). Offline? {by_hand}") from None
    return dest
