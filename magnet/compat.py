"""Loading transformers-format folders safely, with every transformers version we support.

Users' ComfyUI environments hold whatever transformers other packs pinned, so nothing here relies on
one version's loader. We read `config.json` and the safetensors weights ourselves (never a pickle,
never remote or custom code), build the transformers model class from the config, and load the
weights under the key names of the installed version:

- `check_transformers()` (run when `magnet` is imported) refuses a transformers older than
  `MIN_TRANSFORMERS` with the pip command that fixes it.
- `read_config()` refuses a config that is not JSON, lacks `model_type`, names another model, or
  maps to its own code (`auto_map`, or a `.py` file in the folder that a config file names).
- `load_safetensors()` / `check_finite()`: a truncated file or one with NaN/inf values is a
  MagnetError saying to download it again.
- `adapt_encodec_state()` renames EnCodec weights between the naming schemes of transformers
  versions (weight norm as `weight_g`/`weight_v` or as `parametrizations.weight.original0/1`;
  codebook buffers `inited`/`cluster_size`/`embed_avg`, which inference never reads).
- `load_torch_file()`: a `torch.save`d dict (an official release's `.bin`) loaded with `weights_only=True`:
  tensors and plain values only, never pickled code; a missing, empty, truncated or unsafe file is a
  MagnetError saying what to do.
- `dtype_kwargs()`, `no_init_weights()`, `tokenizer_kwargs()`: what differs between versions'
  constructors and loaders.
"""
from __future__ import annotations

import contextlib
import json
import pickle
import re
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Iterable

import torch

from .errors import MagnetError, first_line

MIN_TRANSFORMERS = "4.37.2"
"""The oldest transformers the text encoder, codec and CLAP loaders are tested with (ComfyUI's own minimum).
Its `tokenizers` (0.15) cannot parse a tokenizer.json written by tokenizers >= 0.19; the T5 loader then
reads spiece.model (which the official T5 folders have) and otherwise says to upgrade."""
TESTED_TRANSFORMERS = ("4.37.2", "4.40.2", "4.46.3", "4.56.2", "5.24.0")
"""The versions the parity, codec, loading and CLAP tests were run with."""
PIP_TRANSFORMERS = f'pip install -U "transformers>={MIN_TRANSFORMERS}"'
COMFY_PYTHON = ("with ComfyUI's own Python, e.g. `python_embeded\\python.exe -m pip ...` in the Windows "
                "portable build, or the venv ComfyUI runs in")


# --- versions -------------------------------------------------------------------------------------

def parse_version(text: str) -> tuple[int, int, int]:
    """'4.46.3' -> (4, 46, 3); pre-release and local tails ('5.0.0rc1', '4.57.0.dev0+cpu') are ignored."""
    parts = []
    for piece in str(text).split(".")[:3]:
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    if not parts:
        raise ValueError(f"not a version: {text!r}")
    return tuple(parts + [0] * (3 - len(parts)))[:3]


def installed_version(dist: str = "transformers") -> str | None:
    """The installed version of a distribution (without importing it), or None when it is not installed."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def transformers_version() -> tuple[int, int, int]:
    import transformers
    return parse_version(transformers.__version__)


def check_transformers(version: str | None = ...) -> None:
    """Refuse a transformers older than MIN_TRANSFORMERS (a missing one is reported when first needed)."""
    if version is ...:
        version = installed_version("transformers")
    if version is None:
        return
    try:
        too_old = parse_version(version) < parse_version(MIN_TRANSFORMERS)
    except ValueError:
        return  # an unparsable version string: let the loaders speak for themselves
    if too_old:
        raise MagnetError(
            f"transformers {version} is installed, but MAGNeT needs transformers>={MIN_TRANSFORMERS} (the oldest "
            f"version its T5 text encoder, EnCodec codec and CLAP loading work with). Upgrade it: `{PIP_TRANSFORMERS}` "
            f"({COMFY_PYTHON}); other custom nodes that pin an older transformers may need updating too.")


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """`from_pretrained` takes `dtype` since transformers 4.56 and `torch_dtype` before."""
    return {"dtype": dtype} if transformers_version() >= (4, 56, 0) else {"torch_dtype": dtype}


def tokenizer_kwargs() -> dict:
    """Keywords for every tokenizer/processor load: local files only, no custom code.

    `extra_special_tokens={}`: tokenizer_config.json files written by transformers 5 store an empty
    list there, which transformers 4.5x reads as a dict (AttributeError: 'list' object has no
    attribute 'keys'); an empty dict means the same in every version.
    """
    return {"local_files_only": True, "trust_remote_code": False, "extra_special_tokens": {}}


def no_init_weights():
    """Skip random initialisation while building a model whose weights are loaded next."""
    try:
        from transformers.initialization import no_init_weights as ctx  # transformers 5
        return ctx()
    except ImportError:
        pass
    try:
        from transformers.modeling_utils import no_init_weights as ctx  # transformers 4
        return ctx()
    except ImportError:
        return contextlib.nullcontext()


# --- folders: config, custom code, weights --------------------------------------------------------

CONFIG_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                "feature_extractor_config.json", "generation_config.json")


def state_mismatch(weights: dict, expected: dict, allowed_missing: Iterable[str] = ()):
    """(missing, unexpected, misshaped, parts) between weights and a model's state dict; `parts` reads
    e.g. ['missing 2 key(s), e.g. a, b'] for a message (empty when they match)."""
    missing = sorted(set(expected) - set(weights) - set(allowed_missing))
    unexpected = sorted(set(weights) - set(expected))
    misshaped = [f"{k} {tuple(weights[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
                 if k in weights and weights[k].shape != v.shape]
    parts = [f"{label} {len(keys)} key(s), e.g. {', '.join(keys[:3])}"
             for label, keys in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)) if keys]
    return missing, unexpected, misshaped, parts


def model_type_of(folder: Path) -> str:
    """The `model_type` a transformers folder's config.json names ('t5', 'clap', 'encodec'), '' for anything
    unreadable: cheap enough for listing a models folder (loading reads the config again, with checks)."""
    try:
        return str(json.loads((Path(folder) / "config.json").read_text()).get("model_type", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def read_config(folder: Path, what: str, model_types: Iterable[str], kind: str, fix: str) -> dict:
    """config.json of a transformers folder as a dict, after refusing custom code and other models.

    `what` names the folder in messages ('text encoder folder'), `kind` the model expected ('T5'),
    `fix` says how to get a good copy.
    """
    folder = Path(folder)
    path = folder / "config.json"
    config = _read_json(path, what, fix)
    if not isinstance(config, dict):
        raise MagnetError(f"{path} is not a JSON object, so the {what} {folder} is damaged. {fix}")
    refuse_custom_code(folder, what)
    model_type = config.get("model_type")
    model_types = tuple(model_types)
    if not model_type:
        raise MagnetError(f"{path} lacks 'model_type', so the {what} {folder} cannot be identified (a damaged or "
                          f"hand-edited config). {fix}")
    if model_type not in model_types:
        raise MagnetError(f"{folder} holds a {model_type} model, not {kind} (config.json model_type is "
                          f"{model_type!r}, expected {' or '.join(repr(t) for t in model_types)}). {fix}")
    return config


def refuse_custom_code(folder: Path, what: str) -> None:
    """A folder whose configs map to their own code (auto_map, or a .py a config names) is refused unread."""
    folder = Path(folder)
    py_files = sorted(p.name for p in folder.glob("*.py"))
    for name in CONFIG_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        mapped = isinstance(data, dict) and ("auto_map" in data or "custom_pipelines" in data)
        named = [p for p in py_files if re.search(r"(?<![\w.])" + re.escape(p[:-3]) + r"(\.py|\.\w)", text)]
        if mapped or named:
            detail = "an auto_map entry" if mapped else f"its own code ({', '.join(named)})"
            raise MagnetError(
                f"{path} maps the {what} {folder} to {detail}: loading it would run code from the folder, which "
                f"this pack never does. Use the original model files (e.g. google-t5/t5-base, "
                f"facebook/encodec_32khz, laion/larger_clap_music) without custom code.")


def safetensors_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards model-0000x-of-0000y.safetensors (sorted); [] when there are none."""
    folder = Path(folder)
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    return sorted(p for p in folder.glob("model-*.safetensors") if p.is_file())


def missing_weights_message(folder: Path, what: str, fix: str) -> str:
    pickles = sorted(p.name for pat in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in Path(folder).glob(pat))
    extra = (f" It holds only pickle weights ({', '.join(pickles[:2])}), which this pack never loads (unpickling "
             f"can run code): get model.safetensors of the same model." if pickles else "")
    return f"The {what} {folder} lacks model.safetensors.{extra} {fix}"


def load_safetensors(paths: Path | Iterable[Path], what: str, fix: str) -> dict[str, torch.Tensor]:
    """Tensors of one or more safetensors files; a truncated/damaged file is a MagnetError naming it."""
    from safetensors.torch import load_file

    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        try:
            state.update(load_file(str(path)))
        except Exception as e:  # SafetensorError (truncated, bad header), OSError, ...
            raise MagnetError(f"{path} ({what}) is truncated or damaged ({first_line(e)}): an interrupted "
                              f"download? Download it again. {fix}") from None
    return state


def check_safetensors(paths: Iterable[Path], what: str, fix: str) -> None:
    """Refuse truncated/damaged safetensors files without reading their tensors (the header covers the file)."""
    from safetensors import safe_open

    for path in paths:
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as e:
            raise MagnetError(f"{path} ({what}) is truncated or damaged ({first_line(e)}): an interrupted "
                              f"download? Download it again. {fix}") from None


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or inf (they turn every output into NaN): one cheap pass per tensor.

    A tensor's sum (in its own dtype: the fastest reduction) is NaN/inf exactly when an element is, or
    when finite values overflow; only then is the tensor checked element by element. Measured: under
    2 ms for the test fixtures, 25-60 ms for the 110 M fp32 weights of a t5-base encoder (two CPU
    threads), far less than reading them from disk.
    """
    for key, t in state.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
            continue
        if bool(torch.isfinite(t.sum())):
            continue
        if not bool(torch.isfinite(t).all()):
            raise MagnetError(f"{source} contains NaN/inf values (in {key}): it is damaged; download it again.")


def _read_json(path: Path, what: str, fix: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise MagnetError(f"{path} is not readable JSON ({first_line(e)}): the {what} {path.parent} is "
                          f"damaged. {fix}") from None


# --- EnCodec key names across versions ------------------------------------------------------------

WN_OLD = (".weight_g", ".weight_v")
WN_NEW = (".parametrizations.weight.original0", ".parametrizations.weight.original1")
CODEBOOK_BUFFERS = ("inited", "cluster_size", "embed_avg")
"""Training-time EMA buffers of each codebook: kept or dropped by transformers versions, never read
by encode/decode (only `embed` is)."""
_CODEBOOK_BUFFER = re.compile(r"^quantizer\.layers\.\d+\.codebook\.(" + "|".join(CODEBOOK_BUFFERS) + r")$")


def rename_weight_norm(key: str, parametrized: bool) -> str:
    """A weight-norm key in the naming the model uses: parametrizations (torch>=2.1 transformers) or _g/_v."""
    old, new = (WN_OLD, WN_NEW) if parametrized else (WN_NEW, WN_OLD)
    for a, b in zip(old, new):
        if key.endswith(a):
            return key[: -len(a)] + b
    return key


def adapt_encodec_state(state: dict, expected: dict) -> tuple[dict, list[str]]:
    """EnCodec weights renamed to the keys of `expected` (the model's state_dict) -> (state, keys to keep).

    Weight-norm names follow the model's scheme; codebook buffers the model lacks are dropped and those
    the file lacks are listed in the second value (the model keeps its own, unused at inference).
    """
    parametrized = any(k.endswith(WN_NEW) for k in expected) or not any(k.endswith(WN_OLD) for k in expected)
    out = {}
    for key, value in state.items():
        key = rename_weight_norm(key, parametrized)
        if _CODEBOOK_BUFFER.match(key) and key not in expected:
            continue
        out[key] = value
    keep = [k for k in expected if _CODEBOOK_BUFFER.match(k) and k not in out]
    return out, keep


def same_shapes(a: dict, b: dict) -> bool:
    """True when two state dicts hold the same multiset of tensor shapes (so only their names differ)."""
    def shapes(d):
        return sorted(tuple(getattr(v, "shape", ())) for k, v in d.items() if not _CODEBOOK_BUFFER.match(k))
    return shapes(a) == shapes(b)


def load_torch_file(path: str | Path, what: str = "checkpoint") -> dict:
    """Load a torch.save'd dict without running pickled code; clear errors for every failure."""
    path = Path(path)
    if not path.exists():
        raise MagnetError(f"{what} not found: {path}. Check the path, or download the release "
                          f"files into that folder.")
    if not path.is_file():
        raise MagnetError(f"{what} is not a file: {path}. Point to the file itself.")
    if path.stat().st_size == 0:
        raise MagnetError(f"{what} is empty (0 bytes): {path}. The download was interrupted: "
                          f"download the file again.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip_file(path))
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():     # not a refused class: the bytes are simply not a pickle
            raise MagnetError(f"{what} {path} is truncated or corrupt ({first_line(e)}). Download the "
                              f"file again.") from None
        raise MagnetError(
            f"{what} {path} contains Python objects other than tensors and plain values, so it was not "
            f"loaded (loading it could run code hidden in the file). Use the official release file from "
            f"its publisher. Detail: {_unsupported_global(e)}") from None
    except Exception as e:      # whatever torch's reader meets in damaged bytes (IndexError, MemoryError, ...)
        raise MagnetError(f"{what} {path} is truncated or corrupt ({type(e).__name__}: {first_line(e)}). Download "
                          f"the file again.") from None
    if not isinstance(obj, dict):
        raise MagnetError(f"{what} {path} does not hold a dict of weights (found {type(obj).__name__}): "
                          f"this is not an official MAGNeT/MusicGen release file.")
    return obj


def is_zip_file(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def _unsupported_global(e: BaseException) -> str:
    for line in str(e).splitlines():
        if "global" in line.lower():
            return line.strip()[:200]
    return first_line(e)
