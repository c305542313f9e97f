"""Reading official releases safely.

Every `.bin` is opened by `compat.load_torch_file` with `weights_only=True`: tensors, dicts, lists and
plain values only, so a file that carries code is refused, never run.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from .codec import Codec
from .compat import is_zip_file, load_torch_file
from .errors import MagnetError, first_line
from .sampling import SPAN_ARRANGEMENTS, SPAN_SCORINGS
from .transformer import LM, LMConfig, official_name


# -- LM configs -------------------------------------------------------------------------------------

TEXT_PROJ_KEY = "condition_provider.conditioners.description.output_proj."
LM_FILE, CODEC_FILE = "state_dict.bin", "compression_state_dict.bin"
CONVERTED_SUFFIX = ".safetensors"
FORMAT = "magnet-release"
FORMAT_VERSION = "1"
LM_KINDS = {"transformer_lm_magnet": "magnet", "transformer_lm": "musicgen"}   # xp.cfg `lm_model` -> release kind


def parse_xp_cfg(text: Any, where: str) -> dict:
    """`xp.cfg` is a YAML string (an OmegaConf dump). `${...}` interpolations stay plain strings:
    they only occur in fields inference does not read."""
    if isinstance(text, dict):
        return text
    if not isinstance(text, (str, bytes)):
        raise MagnetError(f"{where}: its xp.cfg is a {type(text).__name__}, not the YAML text of an official "
                          f"release. The file is damaged: download it again.")
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise MagnetError(f"{where}: its xp.cfg is not valid YAML ({first_line(e)}). The file is "
                          f"damaged: download it again.") from None
    if not isinstance(cfg, dict):
        raise MagnetError(f"{where}: its xp.cfg is not a mapping. The file is damaged: download it again.")
    return cfg


def _get(cfg: dict, dotted: str, where: str, default: Any = KeyError):
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is KeyError:
                raise MagnetError(f"{where}: xp.cfg has no `{dotted}`. This is not an official "
                                  f"MAGNeT/MusicGen release (or it is damaged): download it again.")
            return default
        node = node[part]
    return node


def _field(cfg: dict, dotted: str, where: str, kind: type, default: Any = KeyError, minimum=None):
    """A typed xp.cfg field: ints must be whole, numbers finite, `minimum` respected; else a MagnetError
    naming the field (a damaged or hand-edited file), never a raw KeyError/ValueError."""
    value = _get(cfg, dotted, where, default)
    try:
        if kind is bool:
            if isinstance(value, str) and value.strip().lower() in ("true", "false"):
                value = value.strip().lower() == "true"
            if not isinstance(value, (bool, int)):
                raise ValueError
            out = bool(value)
        elif kind is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            out = int(float(value))
        elif kind is float:
            out = float(value)
            if not math.isfinite(out):
                raise ValueError
        else:
            if not isinstance(value, (str, int, float)):
                raise ValueError
            out = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise MagnetError(f"{where}: xp.cfg field `{dotted}` = {value!r} is not a valid {kind.__name__}. The "
                          f"file is damaged or was edited: download the release again.") from None
    if minimum is not None and out < minimum:
        raise MagnetError(f"{where}: xp.cfg field `{dotted}` = {value!r} must be at least {minimum}. The file "
                          f"is damaged or was edited: download the release again.")
    return out


def lm_config_from_xp(cfg: dict, state: dict, where: str) -> LMConfig:
    """Build the LM architecture from a release's xp.cfg; refuse features this engine lacks."""
    lm_model = _get(cfg, "lm_model", where)
    if not isinstance(lm_model, str) or lm_model not in LM_KINDS:
        raise MagnetError(f"{where}: lm_model `{lm_model}` is not supported (MAGNeT `transformer_lm_magnet` "
                          f"and MusicGen `transformer_lm` are). Use an official MAGNeT or MusicGen release.")
    t = _get(cfg, "transformer_lm", where)
    if not isinstance(t, dict):
        raise MagnetError(f"{where}: xp.cfg `transformer_lm` is not a mapping. The file is damaged: download "
                          f"the release again.")

    def tf(name, kind, default=KeyError, minimum=None):
        return _field(cfg, f"transformer_lm.{name}", where, kind, default, minimum)

    unsupported = {
        "positional_embedding": (tf("positional_embedding", str, "sin"), "sin"),
        "positional_scale": (tf("positional_scale", float, 1.0), 1.0),
        "layer_scale": (t.get("layer_scale"), None),
        "qk_layer_norm": (tf("qk_layer_norm", bool, False), False),
        "qk_layer_norm_cross": (tf("qk_layer_norm_cross", bool, False), False),
        "kv_repeat": (tf("kv_repeat", int, 1), 1),
        "norm": (tf("norm", str, "layer_norm"), "layer_norm"),
        "activation": (tf("activation", str, "gelu"), "gelu"),
        "xpos": (tf("xpos", bool, False), False),
    }
    for name, (value, want) in unsupported.items():
        if value != want:
            raise MagnetError(f"{where}: transformer_lm.{name} = {value!r} is not supported (only {want!r}). "
                              f"This release is not one of the official MAGNeT/MusicGen text-to-audio models.")
    conds = _get(cfg, "conditioners", where, {}) or {}
    if not isinstance(conds, dict) or set(conds) != {"description"} \
            or _get(cfg, "conditioners.description.model", where) != "t5":
        raise MagnetError(f"{where}: conditioners {sorted(conds) if isinstance(conds, dict) else conds!r} are not "
                          f"supported: only text conditioning with T5 (`description`) is. Melody/style releases "
                          f"are not supported.")
    n_q, card, dim = tf("n_q", int, minimum=1), tf("card", int, minimum=2), tf("dim", int, minimum=1)
    num_heads = tf("num_heads", int, minimum=1)
    if dim % num_heads:
        raise MagnetError(f"{where}: xp.cfg transformer_lm.dim {dim} is not a multiple of num_heads {num_heads}. "
                          f"The file is damaged or was edited: download the release again.")
    proj = state.get(TEXT_PROJ_KEY + "weight")
    if not isinstance(proj, torch.Tensor) or proj.dim() != 2:
        raise MagnetError(f"{where}: no text projection ({TEXT_PROJ_KEY}weight) in its weights. This is not "
                          f"an official text-to-audio release, or the file is damaged.")
    kind = LM_KINDS[lm_model]
    delays = _get(cfg, "codebooks_pattern.delay.delays", where, list(range(n_q)))
    try:
        delays = [int(d) for d in delays]
    except (TypeError, ValueError):
        raise MagnetError(f"{where}: xp.cfg codebooks_pattern.delay.delays = {delays!r} is not a list of whole "
                          f"numbers. The file is damaged: download the release again.") from None
    pattern = _get(cfg, "codebooks_pattern.modeling", where)
    if kind == "musicgen" and (pattern != "delay" or len(delays) != n_q):
        raise MagnetError(f"{where}: MusicGen with codebook pattern `{pattern}` is not supported (only "
                          f"`delay` with one delay per codebook).")
    if kind == "magnet" and pattern != "parallel":
        raise MagnetError(f"{where}: MAGNeT with codebook pattern `{pattern}` is not supported (only `parallel`).")
    return LMConfig(
        kind=kind, dim=dim, num_heads=num_heads, num_layers=tf("num_layers", int, minimum=1),
        ffn_dim=int(tf("hidden_scale", float, 4.0, minimum=0) * dim), n_q=n_q, card=card,
        text_dim=int(proj.shape[1]),
        text_encoder=_field(cfg, "conditioners.description.t5.name", where, str),
        norm_first=tf("norm_first", bool, True), bias_ff=tf("bias_ff", bool, True),
        bias_attn=tf("bias_attn", bool, True), bias_proj=tf("bias_proj", bool, True),
        causal=tf("causal", bool, kind == "musicgen"),
        subcodes_context=tf("subcodes_context", int, 5, minimum=-1) if kind == "magnet" else -1,   # -1: no band
        segment_duration=_field(cfg, "dataset.segment_duration", where, float, minimum=0.02),
        span_len=_field(cfg, "masking.span_len", where, int, t.get("span_len", 3), minimum=1),
        max_period=tf("max_period", float, 10000.0, minimum=1),
        delays=delays if kind == "musicgen" else [],
    )


def lm_state_from_release(state: dict) -> dict:
    """Official key names -> ours (only the text projection moves)."""
    return {("text_proj." + k[len(TEXT_PROJ_KEY):] if k.startswith(TEXT_PROJ_KEY) else k): v
            for k, v in state.items()}


class LazyState(Mapping):
    """The tensors of a converted file under `prefix`, by name, read when asked.

    safetensors hands out views of the memory-mapped file (nothing is read until a page is touched, and
    nothing is copied): a weight already in the wanted dtype becomes the model's parameter as it is, one
    in another dtype is converted alone (`build_lm`), so the weights never exist twice in memory."""

    def __init__(self, handle, prefix: str, keys):
        self._f, self._prefix = handle, prefix
        self._keys = [k[len(prefix):] for k in keys if k.startswith(prefix)]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        return self._f.get_tensor(self._prefix + key)

    @property
    def _key_set(self) -> set:
        if not hasattr(self, "_set"):
            self._set = set(self._keys)
        return self._set

    def shape(self, key: str) -> tuple:
        return tuple(self._f.get_slice(self._prefix + key).get_shape())

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _shape(state, key) -> tuple:
    return state.shape(key) if isinstance(state, LazyState) else tuple(state[key].shape)


def build_lm(cfg: LMConfig, state: Mapping, where: str, device=None, dtype=None) -> LM:
    """Instantiate the LM without allocating weights twice: the model is built on the meta device, then each
    weight is converted to `device`/`dtype` alone and assigned as the parameter (a weight already right,
    e.g. a memory-mapped fp32 tensor of a converted file on the CPU, is used without a copy)."""
    with torch.device("meta"):
        lm = LM(cfg)
    expected = lm.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise MagnetError(f"{where}: its weights do not match its xp.cfg (missing {missing[:4]}, unexpected "
                          f"{unexpected[:4]}). The file is damaged or not an official release: download it again.")
    dtype = dtype or torch.float32
    for k, v in expected.items():
        if _shape(state, k) != tuple(v.shape):
            raise MagnetError(f"{where}: weight {k} has shape {_shape(state, k)}, its xp.cfg implies "
                              f"{tuple(v.shape)}. The file is damaged or not an official release.")
    modules = dict(lm.named_modules())
    inner = {official_name(n): n for n, _ in lm.named_parameters()}      # checkpoint name -> module tree
    sums = []
    for k in expected:
        owner, _, name = inner.get(k, k).rpartition(".")
        t, total = _convert_checked(state[k], torch.device(device or "cpu"), dtype)
        sums.append(total)
        setattr(modules[owner], name, torch.nn.Parameter(t, requires_grad=False))
        del t
    check_finite(list(expected), sums, where)
    return lm.eval().requires_grad_(False)


def _convert_checked(src: torch.Tensor, device: torch.device, dtype: torch.dtype):
    """(src on device/dtype, the float32 sum of its values). The sum is NaN/inf exactly when a value is (real
    weights are far too small to overflow it): one extra read of each weight, no host sync (see check_finite)."""
    if not src.is_floating_point():
        return src.to(device=device), None
    t = src.to(device=device, dtype=dtype)
    return t, t.sum(dtype=torch.float32)


def check_finite(names: list, sums: list, where: str) -> None:
    """One host sync for all weights: a MagnetError naming the first weight holding NaN or inf."""
    idx = [i for i, s in enumerate(sums) if s is not None]
    if not idx:
        return
    bad = ~torch.isfinite(torch.stack([sums[i].to("cpu") if sums[i].device.type != sums[idx[0]].device.type
                                       else sums[i] for i in idx]))
    if bool(bad.any()):
        first = names[idx[int(bad.nonzero()[0, 0])]]
        raise MagnetError(f"{where}: weight `{first}` contains NaN or infinite values, so every generation would "
                          f"fail. The file is damaged: download it again.")


# -- releases ---------------------------------------------------------------------------------------

@dataclass
class Release:
    """What a release holds, before the models are built: LM config + weights, the codec, its source, and what
    its config says beyond the architecture, read once at load (`release_settings`): `generation` (its own
    sampling settings, xp.cfg `generate.lm`), `training` (`dropout`: classifier-free guidance training dropout)
    and `content` ('music' or 'sound')."""
    lm_config: LMConfig
    lm_state: dict
    codec: Any  # magnet.codec.Codec
    source: Path
    generation: dict
    training: dict = field(default_factory=dict)
    content: str = "music"


def resolve_release(release: str | Path) -> Path:
    """The path of a release in one of the `RELEASE_FORMATS`, else a MagnetError saying what to give."""
    p = Path(release).expanduser()
    if not p.exists():
        raise MagnetError(f"release not found: {p}. Give a folder holding {LM_FILE} and {CODEC_FILE} (an "
                          f"official release such as facebook/magnet-small-10secs) or a {CONVERTED_SUFFIX} file "
                          f"made by `python -m magnet convert`.")
    if release_format(p) is None:
        if p.is_dir():
            found = sorted(x.name for x in p.iterdir())[:10]
            raise MagnetError(f"release folder {p} has no {LM_FILE} (found: {found}). Put the official release "
                              f"files ({LM_FILE}, {CODEC_FILE}) in it.")
        raise MagnetError(f"{p} is not a release: give the release folder (holding {LM_FILE} and {CODEC_FILE}) "
                          f"or a converted {CONVERTED_SUFFIX} file.")
    return p


def load_release(release: str | Path, *, codec_dir=None, search_dirs=()) -> Release:
    """Read a release in any of the `RELEASE_FORMATS`: a folder of official `.bin` files or a converted
    `.safetensors` file."""
    p = resolve_release(release)
    return release_format(p).load(p, codec_dir=codec_dir, search_dirs=search_dirs)


def _load_official(p: Path, *, codec_dir=None, search_dirs=()) -> Release:
    lm_file = p / LM_FILE
    pkg = load_torch_file(lm_file, "LM checkpoint")
    if "best_state" not in pkg or "xp.cfg" not in pkg:
        raise MagnetError(f"{lm_file} has no `best_state`/`xp.cfg`: it is not an official MAGNeT/MusicGen "
                          f"{LM_FILE}. Download the release again.")
    xp = parse_xp_cfg(pkg["xp.cfg"], str(lm_file))
    state = pkg["best_state"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MagnetError(f"{lm_file}: its `best_state` is not a dict of weight tensors (found "
                          f"{type(state).__name__}). The file is damaged or not an official release: download "
                          f"it again.")
    cfg = lm_config_from_xp(xp, state, str(lm_file))
    codec_file = p / CODEC_FILE
    codec = Codec.from_release_file(codec_file, codec_dir=codec_dir, search_dirs=search_dirs)
    check_codec_matches(cfg, codec, str(lm_file), str(codec_file))
    check_codec_rate(xp, codec, str(lm_file), str(codec_file))
    content = release_content(xp, cfg)
    return Release(cfg, lm_state_from_release(state), codec, p, _generation_defaults(xp),
                   training_settings(_get(xp, "classifier_free_guidance", str(lm_file), None), content), content)


def check_codec_matches(cfg: LMConfig, codec, lm_where: str, codec_where: str):
    if codec.card != cfg.card or codec.n_q != cfg.n_q:
        raise MagnetError(f"codec {codec_where} has {codec.n_q} codebooks of {codec.card} entries but the LM "
                          f"{lm_where} expects {cfg.n_q} of {cfg.card}. Use the compression_state_dict.bin "
                          f"that came with this release.")


def check_codec_rate(xp: dict, codec, lm_where: str, codec_where: str):
    """The LM was trained on tokens of a codec at xp.cfg's `sample_rate` / `channels`: a codec of another
    rate has the same codebook shapes (music 32 kHz and audio 16 kHz do) but its tokens mean other sounds."""
    want_sr = _field(xp, "sample_rate", lm_where, int, None) if _get(xp, "sample_rate", lm_where, None) is not None \
        else None
    want_ch = _field(xp, "channels", lm_where, int, None) if _get(xp, "channels", lm_where, None) is not None \
        else None
    if want_sr is not None and int(codec.sample_rate) != want_sr:
        raise MagnetError(f"codec {codec_where} runs at {codec.sample_rate} Hz, but the LM {lm_where} was trained "
                          f"with a {want_sr} Hz codec: its tokens would decode to the wrong sounds. Use the "
                          f"compression_state_dict.bin (or EnCodec folder) that came with this release.")
    if want_ch is not None and int(codec.channels) != want_ch:
        raise MagnetError(f"codec {codec_where} has {codec.channels} channel(s), but the LM {lm_where} was "
                          f"trained with {want_ch}. Use the codec that came with this release.")


CONTENTS = ("music", "sound")
# the solver a release was trained with (xp.cfg `solver`) -> what it makes
SOLVER_CONTENT = {"magnet": "music", "musicgen": "music", "audio_magnet": "sound", "audiogen": "sound"}
TRAINING_DROPOUT = {"music": 0.3, "sound": 0.1}   # classifier_free_guidance.training_dropout of each kind


def release_content(xp: dict, cfg: LMConfig) -> str:
    """'music' or 'sound': what the release says it was trained for (xp.cfg `solver`: magnet/musicgen or
    audio_magnet/audiogen); for a config without a known solver, its text encoder (the sound releases are the
    t5-large ones)."""
    solver = xp.get("solver") if isinstance(xp, dict) else None
    if isinstance(solver, str) and solver in SOLVER_CONTENT:
        return SOLVER_CONTENT[solver]
    return content_of_text_encoder(cfg.text_encoder)


def content_of_text_encoder(name: str) -> str:
    """The kind of the official releases conditioned on this T5: 'sound' for t5-large, else 'music'."""
    return "sound" if "t5-large" in str(name) else "music"


def training_settings(stored, content: str) -> dict:
    """`{'dropout': ...}`: the classifier-free guidance training dropout a release stores (xp.cfg
    `classifier_free_guidance`, or a converted file's metadata) when it is a number in [0, 1); else its kind's."""
    value = stored.get("training_dropout", stored.get("dropout")) if isinstance(stored, dict) else None
    dropout = _real(value)
    if dropout is None or dropout >= 1:
        dropout = TRAINING_DROPOUT.get(content, TRAINING_DROPOUT["music"])
    return {"dropout": dropout}


def _generation_defaults(xp: dict) -> dict:
    """The generation settings a release stores (xp.cfg `generate.lm`) that sampling reads as "the release's
    own": each of `GENERATION_KEYS` the release stores with a usable value. One of the wrong type (a damaged or
    hand-edited file) is left out, so sampling falls back to the music values for it, rather than failing."""
    g = xp.get("generate") if isinstance(xp, dict) else None
    return generation_settings(g.get("lm") if isinstance(g, dict) else None)


def generation_settings(stored) -> dict:
    """The usable `GENERATION_KEYS` of a `generate.lm` mapping (also what a converted file's metadata keeps)."""
    if not isinstance(stored, dict):
        return {}
    out = {}
    for key, check in GENERATION_KEYS.items():
        value = check(stored.get(key))
        if value is not None:
            out[key] = value
    return out


def _real(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        v = float(v)
    except OverflowError:
        return None
    return v if math.isfinite(v) and v >= 0 else None


def _whole(v):
    v = _real(v)
    return int(v) if v is not None and v.is_integer() else None


def _probability(v):
    v = _real(v)
    return v if v is not None and v <= 1 else None


def _choice(allowed):
    return lambda v: v if isinstance(v, str) and v in allowed else None


def _steps(v):
    steps = [_whole(s) for s in v] if isinstance(v, (list, tuple)) and v else [None]
    return None if any(s is None or s < 1 for s in steps) else steps


GENERATION_KEYS = {
    "temp": _real, "top_k": _whole, "top_p": _probability, "max_cfg_coef": _real, "min_cfg_coef": _real,
    "decoding_steps": _steps, "span_arrangement": _choice(SPAN_ARRANGEMENTS),
    "span_scoring": _choice(SPAN_SCORINGS),
}
"""xp.cfg `generate.lm` keys read as a release's own generation settings, each with its check (the value, or
None for a value of the wrong type or range)."""


# -- converted single-file releases -----------------------------------------------------------------

def convert_release(release: str | Path, out: str | Path, *, codec_dir=None, search_dirs=(), dtype=None) -> Path:
    """Write a release as one `.safetensors` file: LM + codec weights, configs in its metadata.
    Can never carry code; a pointer codec is embedded.

    dtype: of the LM weights, float32 by default: the file then loads on the CPU without any conversion
    (the weights are used straight from the memory-mapped file), several times faster than the official
    `.bin` (float16, converted on load). float16 halves the file (for GPUs; on the CPU it is converted on
    load, as the `.bin` is)."""
    from .files import save_safetensors
    dtype = dtype or torch.float32
    r = load_release(release, codec_dir=codec_dir, search_dirs=search_dirs)
    codec_cfg, codec_state = r.codec.export()
    tensors = {"lm." + k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
               for k, v in r.lm_state.items()}
    tensors.update({"codec." + k: v.contiguous() for k, v in codec_state.items()})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "lm_config": json.dumps(r.lm_config.to_dict()),
            "codec_config": json.dumps(codec_cfg), "generation": json.dumps(r.generation),
            "training": json.dumps(r.training), "content": r.content, "source": Path(r.source).name}
    out = converted_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a full disk (safetensors reports it as its own error), Ctrl-C: no partial file is left
    return save_safetensors(out, tensors, meta, tmp=out.with_name(out.name + ".partial"))


def converted_path(out: str | Path) -> Path:
    """`out` as the path of a converted release, which must end in .safetensors (else a MagnetError)."""
    out = Path(out)
    if out.suffix != CONVERTED_SUFFIX:
        raise MagnetError(f"output {out} must end in {CONVERTED_SUFFIX}, e.g. {out.with_suffix(CONVERTED_SUFFIX)}.")
    return out


def _load_converted(path: Path) -> Release:
    from safetensors import SafetensorError, safe_open

    try:
        f = safe_open(str(path), "pt")      # kept open by the LazyState: the LM is read tensor by tensor
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise MagnetError(f"{path} is a safetensors file but not a converted MAGNeT release (no "
                              f"`format: {FORMAT}` in its metadata). Make one with `python -m magnet convert`.")
        keys = list(f.keys())
        lm_state = LazyState(f, "lm.", keys)
        codec_state = {k.split(".", 1)[1]: f.get_tensor(k) for k in keys if not k.startswith("lm.")}
    except MagnetError:
        raise
    except SafetensorError as e:
        raise MagnetError(f"{path} is truncated or corrupt ({first_line(e)}). Convert the release again.") from None
    except Exception as e:      # whatever the reader meets in damaged bytes
        raise MagnetError(f"{path} could not be read ({type(e).__name__}: {first_line(e)}). Convert the release "
                          f"again.") from None
    try:
        cfg = LMConfig.from_dict(json.loads(meta["lm_config"]))
        codec_cfg = json.loads(meta["codec_config"])
        generation = json.loads(meta.get("generation") or "{}")
        if not isinstance(codec_cfg, dict) or not isinstance(generation, dict):
            raise ValueError("codec_config/generation is not a JSON object")
        generation = generation_settings(generation)
        content = meta.get("content")
        if content not in CONTENTS:       # files converted before the metadata kept it
            content = content_of_text_encoder(cfg.text_encoder)
        training = training_settings(json.loads(meta.get("training") or "{}"), content)
    except Exception as e:      # missing keys, bad JSON, JSON nested too deeply, fields of the wrong type ...
        raise MagnetError(f"{path}: its metadata is incomplete or damaged ({type(e).__name__}: "
                          f"{first_line(e)}). Convert the release again with `python -m magnet convert`.") from None
    try:
        codec = Codec.from_config_and_state(codec_cfg, codec_state)
    except MagnetError:
        raise
    except Exception as e:      # a damaged codec config or codec weights
        raise MagnetError(f"{path}: its codec is damaged ({type(e).__name__}: {first_line(e)}). Convert the "
                          f"release again with `python -m magnet convert`.") from None
    check_codec_matches(cfg, codec, str(path), str(path))
    return Release(cfg, lm_state, codec, path, generation, training, content)


# -- the release formats: what a file or folder is (cheaply, for listing), its name, how it loads -------

def _official_kind(lm_file: Path) -> str | None:
    """From the xp.cfg of a memory-mapped state_dict.bin (its tensors are never read)."""
    if not is_zip_file(lm_file):
        return None
    pkg = torch.load(lm_file, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(pkg, dict) or "xp.cfg" not in pkg:
        return None
    return LM_KINDS.get(parse_xp_cfg(pkg["xp.cfg"], str(lm_file)).get("lm_model"))


def _converted_kind(path: Path) -> str | None:
    """From the metadata in a converted file's header alone."""
    meta = _safetensors_metadata(path)
    if meta.get("format") != FORMAT:
        return None
    return LMConfig.from_dict(json.loads(meta["lm_config"])).kind


@dataclass(frozen=True)
class ReleaseFormat:
    """One way a release lies on disk.

    probe(path): whether `path` is in this format, from its type and name alone (nothing is read);
    config(path): the file that holds its config; kind(config file): 'magnet' or 'musicgen' read from the
    config alone (None: not a release); load(path, codec_dir=, search_dirs=): the `Release`;
    label(path): the release's name (logs, lists); files: the files the format is made of (what a download
    fetches)."""
    name: str
    probe: Callable[[Path], bool]
    config: Callable[[Path], Path]
    kind: Callable[[Path], str | None]
    load: Callable[..., Release]
    label: Callable[[Path], str]
    files: tuple = ()


OFFICIAL = ReleaseFormat("official release folder", probe=lambda p: p.is_dir() and (p / LM_FILE).exists(),
                         config=lambda p: p / LM_FILE, kind=_official_kind, load=_load_official,
                         label=lambda p: p.name, files=(LM_FILE, CODEC_FILE))
CONVERTED = ReleaseFormat("converted release file", probe=lambda p: p.is_file() and p.suffix == CONVERTED_SUFFIX,
                          config=lambda p: p, kind=_converted_kind,
                          load=lambda p, codec_dir=None, search_dirs=(): _load_converted(p),
                          label=lambda p: p.stem)
RELEASE_FORMATS = (OFFICIAL, CONVERTED)
"""Every release format, in the order they are tried; the one place a path's format is decided."""


def release_format(path: str | Path) -> ReleaseFormat | None:
    """The format of the release at `path`, or None when it is in none (nothing is read)."""
    p = Path(path)
    return next((f for f in RELEASE_FORMATS if f.probe(p)), None)


def release_label(path: str | Path) -> str:
    """A release's name: the folder's name, or the converted file's name without its suffix."""
    fmt = release_format(path)
    return fmt.label(Path(path)) if fmt is not None else Path(path).name


_KIND_CACHE: dict = {}


def release_kind(path: str | Path) -> str | None:
    """'magnet' or 'musicgen' for a release in any of the `RELEASE_FORMATS`, None for anything else.

    Reads only the config: the `.bin` is memory-mapped (its tensors are never read) and a `.safetensors`
    only its header. Cached by (path, size, mtime), so listing a models folder stays cheap."""
    fmt = release_format(path)
    if fmt is None:
        return None
    target = fmt.config(Path(path))
    try:
        st = target.stat()
    except OSError:
        return None
    key = (str(target.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _KIND_CACHE:
        try:
            _KIND_CACHE[key] = fmt.kind(target)
        except Exception:   # anything unreadable is simply not listed; loading it by name gives the real error
            _KIND_CACHE[key] = None
    return _KIND_CACHE[key]


def _safetensors_metadata(path: Path) -> dict:
    """The `__metadata__` of a safetensors file from its header alone (8-byte length + JSON)."""
    import struct
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        if n > 100_000_000:
            return {}
        return json.loads(f.read(n)).get("__metadata__") or {}
