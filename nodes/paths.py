"""Where the pack's nodes read and write files named in a workflow: the rules for LoRA files, datasets and save
names in one place (the loaders' model folders are `hub.ensure`'s, under ComfyUI's registered folders).

- LoRAs: listed from and resolved under models/loras/magnet (ComfyUI's `magnet_loras` folders, outside ComfyUI
  $MAGNET_LORAS_DIR); a name must stay inside its folder (no `..`, not absolute).
- Datasets: a folder under ComfyUI's input or output folder (outside ComfyUI $MAGNET_INPUT_DIR), or one an
  administrator allows (`magnet_datasets` in extra_model_paths.yaml, $MAGNET_ALLOWED_DIRS); absolute paths
  elsewhere, `..` and links leading out are refused (`confined`).
- Save names: a plain file name, saved in the first LoRA folder.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..magnet.errors import MagnetError
from ..magnet.train_state import is_state_file
from . import comfy

NONE = "none"                    # the first choice of the LoRA and dataset lists (so they are never empty)
LORA_KIND = "magnet_loras"
SAVE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._()+-]{0,120}$")


def list_loras() -> list[str]:
    """`none`, then the .safetensors files under models/loras/magnet (subfolders as `sub/name.safetensors`), not
    the training states kept beside them (`<name>.state.safetensors`)."""
    names = set()
    for root in comfy.model_dirs(LORA_KIND):
        if root.is_dir():
            names.update(p.relative_to(root).as_posix() for p in root.rglob("*.safetensors")
                         if p.is_file() and not p.name.startswith(".") and not is_state_file(p))
    return [NONE, *sorted(names)]


def _inside(root: Path, name: str) -> Path | None:
    """root/name when the name stays inside root (no `..`, not absolute), else None. Judged on the name, not
    the resolved path: a LoRA file may be a link to one kept elsewhere."""
    rel = Path(str(name).replace("\\", "/"))
    if not str(name) or rel.is_absolute() or rel.drive or ".." in rel.parts:
        return None
    return root / rel


def resolve_lora(name: str) -> Path:
    """A LoRA name as listed (or as Train LoRA returns it) -> its file under models/loras/magnet."""
    roots = comfy.model_dirs(LORA_KIND)
    for candidate in (name, f"{name}.safetensors"):
        for root in roots:
            path = _inside(root, candidate)
            if path is not None and path.is_file():
                return path
    where = ", ".join(str(r) for r in roots) or "models/loras/magnet"
    raise MagnetError(f"LoRA {name!r} was not found in {where}. Train one with MAGNeT Train LoRA, or put the "
                      f".safetensors file there and refresh the page (R) so the list updates.")


def list_datasets() -> list[str]:
    """`none`, then every folder under ComfyUI's input folder (nested ones as `a/b`)."""
    root = comfy.input_dir()
    names = []
    if root is not None and root.is_dir():
        for here, dirs, _ in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]       # hidden ones (the token cache) pruned
            names += [Path(here, d).relative_to(root).as_posix() for d in dirs]
    return [NONE, *sorted(names)]


ALLOWED_ENV = "MAGNET_ALLOWED_DIRS"      # folders an administrator allows besides input/ and output/ (os.pathsep)
ALLOWED_KEY = "magnet_datasets"          # the same, as an extra_model_paths.yaml key
RULE = (f"a workflow may only read folders under ComfyUI's input or output folder (an administrator can allow "
        f"more: list them under `{ALLOWED_KEY}:` in extra_model_paths.yaml or in ${ALLOWED_ENV})")


def output_dir() -> Path | None:
    """ComfyUI's output folder; outside ComfyUI $MAGNET_OUTPUT_DIR (None when unset)."""
    if comfy.folder_paths is not None:
        return Path(comfy.folder_paths.get_output_directory())
    env = os.environ.get("MAGNET_OUTPUT_DIR", "")
    return Path(env) if env else None


def allowed_roots() -> list[Path]:
    """The folders a workflow may read from: ComfyUI's input and output folders (outside ComfyUI
    $MAGNET_INPUT_DIR), and those an administrator lists (`magnet_datasets` in extra_model_paths.yaml,
    $MAGNET_ALLOWED_DIRS)."""
    roots = [r for r in (comfy.input_dir(), output_dir()) if r is not None]
    roots += comfy.model_dirs(ALLOWED_KEY) if comfy.folder_paths is not None else []
    roots += [Path(p).expanduser() for p in os.environ.get(ALLOWED_ENV, "").split(os.pathsep) if p.strip()]
    return roots


def confined(p: Path, what: str) -> Path:
    """`p` resolved (links followed) when it lies inside one of `allowed_roots`, else a MagnetError naming the
    rule and how an administrator allows a folder."""
    real = p.resolve()
    for root in allowed_roots():
        try:
            real.relative_to(root.resolve())
            return real
        except ValueError:
            continue
    raise MagnetError(f"{what} is outside the folders a workflow may read: {RULE}.")


def resolve_dataset(dataset: str, path: str) -> Path:
    """The dataset folder: `path` when given (relative to the input folder, or an absolute path inside a folder an
    administrator allows), else the chosen one; either way inside `allowed_roots` (no `..`, no link leading out)."""
    root = comfy.input_dir()
    text = str(path or "").strip().strip('"')
    if text:
        p = Path(text).expanduser()
        if ".." in Path(text.replace("\\", "/")).parts:
            raise MagnetError(f"input `path` {text!r} climbs out of its folder with `..`: {RULE}.")
        if not p.is_absolute() and root is not None:
            p = root / p
        what = f"input `path` ({text})"
    elif dataset and dataset != NONE:
        if ".." in Path(str(dataset).replace("\\", "/")).parts or Path(str(dataset)).is_absolute():
            raise MagnetError(f"input `dataset` {dataset!r} is not a folder of the list (choose one under "
                              f"{root or 'the input folder'}): {RULE}.")
        p = (root / dataset) if root is not None else Path(dataset)
        what = f"input `dataset` ({dataset})"
    else:
        raise MagnetError(f"no dataset: choose a folder under {root or 'the input folder'} in `dataset`, or type "
                          f"a folder in `path`, holding the audio files to learn from (with optional .txt "
                          f"captions beside them).")
    p = confined(p, what)
    if not p.is_dir():
        raise MagnetError(f"{what} is not a folder. Put the audio files in a folder under "
                          f"{root or 'the input folder'}.")
    return p


def token_cache() -> Path | None:
    """Where the Train LoRA node caches a dataset's tokens: a hidden folder at the top of the input folder (never
    inside the dataset, which may be read-only or an administrator's folder)."""
    root = comfy.input_dir()
    return None if root is None else root / ".magnet_cache"


def save_path(save_name: str) -> Path:
    """models/loras/magnet/<save_name>.safetensors (the first LoRA folder)."""
    name = str(save_name or "").strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not SAVE_NAME.match(name) or ".." in name:
        raise MagnetError(f"input `save_name` {save_name!r} is not a plain file name: use letters, digits, spaces "
                          f"and . _ ( ) + - (no folders), e.g. my_style.")
    roots = comfy.model_dirs(LORA_KIND)
    if not roots:
        raise MagnetError("there is no folder to save LoRAs in: set $MAGNET_LORAS_DIR (outside ComfyUI).")
    return roots[0] / f"{name}.safetensors"
