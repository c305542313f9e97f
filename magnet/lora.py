"""LoRA adapters for the MAGNeT LM: the file format, loading with checks, applying to a model, and the
trainable layers `magnet.train` uses.

A LoRA adds `strength * alpha / rank * B @ A` to the weight W [out, in] of some of the LM's linear layers
(A [rank, in], B [out, rank]). The file is one `.safetensors`:

- tensors `<name>.lora_A.weight` and `<name>.lora_B.weight` for each adapted linear, where `<name>.weight` is
  the name of its weight in `lm.named_parameters()` (e.g. `transformer.layers.0.self_attn.in_proj`);
- metadata (all strings): `magnet_lora` (format version "1"), `fingerprint` (JSON: dim, num_layers, num_heads,
  n_q, card, text_dim of the base LM), `release`, `rank`, `alpha`, `targets` (JSON list), `training` (JSON of
  the settings), `trigger`, `clips`, `steps`, `train_loss`, `val_loss`.

Applying (`apply_lora`, `MagnetModel.with_lora`) makes a new model object whose adapted weights are new
tensors W + delta and whose every other weight is the base's own tensor: the base model is never changed,
LoRAs stack, and the decoding loop (its fast path and CUDA graphs read the weights directly) runs unchanged.

Why our own layers rather than `peft`: the LM reads its packed q/k/v projection weight directly (self-attention,
the cross-attention memory, the decoding fast path), never through the projection module's forward, so a
layer that wraps forward (peft's LoRA) cannot adapt q/k/v; `LoraLinear` exposes the adapted weight as its
`weight`, which every path reads. peft's newest release also fails to import with transformers 4.37.2, the
oldest we support.
"""
from __future__ import annotations

import copy
import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import lowp
from .errors import MagnetError, first_line

FORMAT_VERSION = "1"
META_KEY = "magnet_lora"
FINGERPRINT_KEYS = ("dim", "num_layers", "num_heads", "n_q", "card", "text_dim")
TARGETS = ("self_attn.in_proj", "self_attn.out_proj", "cross_attention.in_proj", "cross_attention.out_proj",
           "linear1", "linear2", "linears", "text_proj")
"""The linear layers a LoRA can adapt, by name: in every transformer layer the self-attention's packed q/k/v
projection and output, the cross-attention's (q from the music, k/v from the text) and output, the
feed-forward's two; `linears` = the output heads, `text_proj` = the text projection."""
DEFAULT_TARGETS = ("self_attn.in_proj", "self_attn.out_proj", "cross_attention.in_proj", "cross_attention.out_proj",
                   "linear1", "linear2")
DEFAULT_RANK = 16
_FIX = "Train it again with `python -m magnet train` (or the MAGNeT Train LoRA node)."


def fingerprint(model_or_cfg) -> dict:
    """The architecture numbers a LoRA must match: dim, num_layers, num_heads, n_q, card, text_dim."""
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    cfg = getattr(cfg, "cfg", cfg)          # a MagnetModel's cfg is the LM's; an LM's too
    return {k: int(getattr(cfg, k)) for k in FINGERPRINT_KEYS}


def describe(fp: dict) -> str:
    return (f"dim {fp.get('dim')}, {fp.get('num_layers')} layers, {fp.get('num_heads')} heads, "
            f"{fp.get('n_q')} codebooks of {fp.get('card')}, text width {fp.get('text_dim')}")


def check_strength(strength) -> float:
    """A LoRA strength: a finite number (0 = the base model, 1 = as trained, negative = away from it)."""
    try:
        if isinstance(strength, bool):
            raise TypeError
        value = float(strength)
    except (TypeError, ValueError, OverflowError):
        raise MagnetError(f"LoRA strength {strength!r} must be a number (1.0 = as trained, 0 = off).") from None
    if not math.isfinite(value):
        raise MagnetError(f"LoRA strength {strength!r} must be a finite number (1.0 = as trained, 0 = off).")
    return value


def check_targets(targets) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = tuple(dict.fromkeys(targets or ()))
    unknown = [t for t in targets if t not in TARGETS]
    if not targets or unknown:
        raise MagnetError(f"LoRA targets {list(unknown or targets)} are not layers of the LM: choose among "
                          f"{', '.join(TARGETS)} (default: {', '.join(DEFAULT_TARGETS)}).")
    return targets


def _matches(name: str, target: str) -> bool:
    parts, want = name.split("."), target.split(".")
    if parts[-len(want):] == want:
        return True
    return parts[-1].isdigit() and parts[-1 - len(want):-1] == want        # linears.0, linears.1, ...


def target_names(lm: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of the LM's linear layers that `targets` select, in module order."""
    targets = check_targets(targets)
    return [n for n, m in lm.named_modules()
            if isinstance(m, (nn.Linear, LoraLinear)) and any(_matches(n, t) for t in targets)]


# -- the file ------------------------------------------------------------------------------------------

@dataclass
class LoraWeights:
    """A loaded, checked LoRA file. `pairs()` -> {weight name: (A [r, in], B [out, r])}."""
    path: str
    meta: dict
    fingerprint: dict
    rank: int
    alpha: float
    targets: list
    tensors: dict

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def name(self) -> str:
        return Path(self.path).name if self.path else "LoRA"

    def pairs(self) -> dict:
        out = {}
        for key, a in self.tensors.items():
            if key.endswith(".lora_A.weight"):
                base = key[: -len(".lora_A.weight")]
                out[base + ".weight"] = (a, self.tensors[base + ".lora_B.weight"])
        return out

    def deltas(self, strength: float = 1.0) -> dict:
        """{weight name: strength * scale * B @ A} in float32."""
        s = check_strength(strength) * self.scale
        return {k: (b.float() @ a.float()) * s for k, (a, b) in self.pairs().items()}


def save_lora(path: str | Path, tensors: dict, meta: dict) -> Path:
    """Write a LoRA file atomically (`files.save_safetensors`: a reader, or a cancel, never sees a half-written
    file; the mode follows the umask)."""
    from .files import save_safetensors
    path = Path(path)
    if path.suffix != ".safetensors":
        raise MagnetError(f"LoRA file {path} must end in .safetensors.")
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_safetensors(path, {k: v.detach().to("cpu", torch.float32) for k, v in tensors.items()},
                            {k: str(v) for k, v in meta.items()})


def load_lora(path: str | Path) -> LoraWeights:
    """Read and check a LoRA file: our metadata, finite tensors, consistent shapes; else a MagnetError naming
    the file and the fix."""
    from safetensors import safe_open
    path = Path(path).expanduser()
    if not path.is_file():
        raise MagnetError(f"LoRA file not found: {path}. Give the .safetensors file written by `python -m magnet "
                          f"train` (ComfyUI keeps them in models/loras/magnet/).")
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:      # whatever the safetensors reader meets in damaged bytes
        raise MagnetError(f"LoRA file {path} is not a readable .safetensors file ({first_line(e)}). It is damaged "
                          f"or not a LoRA: {_FIX}") from None
    if META_KEY not in meta:
        raise MagnetError(f"{path} is not a MAGNeT LoRA (no `{META_KEY}` in its metadata): a LoRA for another "
                          f"model (e.g. an image model) does not fit MAGNeT. Use a file made by `python -m magnet "
                          f"train` or the MAGNeT Train LoRA node.")
    if meta[META_KEY] != FORMAT_VERSION:
        raise MagnetError(f"LoRA file {path} has format version {meta[META_KEY]!r}; this version of the package "
                          f"reads version {FORMAT_VERSION}. Update the package, or {_FIX[0].lower() + _FIX[1:]}")
    try:
        fp = json.loads(meta["fingerprint"])
        if not isinstance(fp, dict) or any(not isinstance(fp.get(k), int) for k in FINGERPRINT_KEYS):
            raise ValueError("fingerprint is not a JSON object of whole numbers")
        rank, alpha = int(meta["rank"]), float(meta["alpha"])
        if rank < 1 or not math.isfinite(alpha):
            raise ValueError(f"rank {rank} / alpha {alpha}")
        targets = json.loads(meta.get("targets") or "[]")
    except (KeyError, TypeError, ValueError) as e:
        raise MagnetError(f"LoRA file {path}: its metadata is incomplete or damaged ({type(e).__name__}: "
                          f"{first_line(e)}). {_FIX}") from None
    if not tensors:
        raise MagnetError(f"LoRA file {path} holds no tensors. {_FIX}")
    for key, t in tensors.items():
        end = key[-len(".lora_A.weight"):]
        if end not in (".lora_A.weight", ".lora_B.weight") or not t.is_floating_point() or t.dim() != 2:
            raise MagnetError(f"LoRA file {path}: tensor {key!r} ({tuple(t.shape)}) is not a LoRA factor "
                              f"(<layer>.lora_A.weight / .lora_B.weight, 2-D, floating point). {_FIX}")
        if not bool(torch.isfinite(t).all()):
            raise MagnetError(f"LoRA file {path}: tensor {key!r} contains NaN or infinite values (the training "
                              f"diverged). Train it again with a lower learning rate.")
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        b = tensors.get(key[: -len("A.weight")] + "B.weight")
        if b is None:
            raise MagnetError(f"LoRA file {path}: {key!r} has no matching lora_B.weight. {_FIX}")
        if a.shape[0] != rank or b.shape[1] != rank:
            raise MagnetError(f"LoRA file {path}: layer {key[:-len('.lora_A.weight')]!r} has factors "
                              f"{tuple(a.shape)} / {tuple(b.shape)}, not [rank {rank}, in] / "
                              f"[out, rank {rank}]. {_FIX}")
    if sum(k.endswith(".lora_B.weight") for k in tensors) != sum(k.endswith(".lora_A.weight") for k in tensors):
        raise MagnetError(f"LoRA file {path}: a lora_B.weight has no lora_A.weight. {_FIX}")
    return LoraWeights(str(path), meta, fp, rank, alpha, list(targets), tensors)


def as_lora(lora) -> LoraWeights:
    return lora if isinstance(lora, LoraWeights) else load_lora(lora)


def check_lora_fits(lora: LoraWeights, model) -> None:
    """A MagnetError naming both architectures when the LoRA was made for another LM."""
    lm = getattr(model, "lm", model)
    mine = fingerprint(lm)
    where = getattr(model, "source", "") or "this model"
    if {k: lora.fingerprint.get(k) for k in FINGERPRINT_KEYS} != mine:
        release = lora.meta.get("release") or "another release"
        raise MagnetError(f"LoRA {lora.path} was trained for {release} ({describe(lora.fingerprint)}), but "
                          f"{where} is {describe(mine)}. Use a LoRA trained on this model (or load the release "
                          f"it was trained on).")
    params = dict(lm.named_parameters())
    for name, (a, b) in lora.pairs().items():
        w = params.get(name)
        if w is None or tuple(w.shape) != (b.shape[0], a.shape[1]):
            raise MagnetError(f"LoRA {lora.path} adapts {name} with shape [{b.shape[0]}, {a.shape[1]}], which "
                              f"{where} ({describe(mine)}) "
                              f"{'does not have' if w is None else f'has as {list(w.shape)}'}. Use a LoRA trained "
                              f"on this model.")


# -- applying to a model ----------------------------------------------------------------------------------

def shared_copy(module: nn.Module) -> nn.Module:
    """A new module tree holding the very same parameter and buffer tensors: replacing a parameter (or a
    child) of the copy leaves the original untouched."""
    new = copy.copy(module)
    new._parameters = type(module._parameters)(module._parameters)
    new._buffers = type(module._buffers)(module._buffers)
    new._modules = type(module._modules)((k, None if m is None else shared_copy(m))
                                         for k, m in module._modules.items())
    if isinstance(getattr(module, "_masks", None), dict):
        new._masks = {}                       # the LM's per-length attention-mask cache: its own
    return new


def merged_lm(lm: nn.Module, lora: LoraWeights, strength: float) -> nn.Module:
    """A shared copy of `lm` whose adapted weights are W + strength * scale * B @ A (in W's dtype and device)."""
    lowp.restore(lm)                          # fast mode's float16 records: the exact weights first
    new = shared_copy(lm)
    if strength == 0.0:
        return new
    modules = dict(new.named_modules())
    with torch.no_grad():
        for name, delta in lora.deltas(strength).items():
            owner, attr = name.rsplit(".", 1)
            w = getattr(modules[owner], attr)
            merged = (w.float() + delta.to(w.device)).to(w.dtype)
            modules[owner]._parameters[attr] = nn.Parameter(merged, requires_grad=False)
    return new


def apply_lora(model, lora, strength: float = 1.0):
    """A new model object with the LoRA merged into a shared copy of its LM (see the module docstring).
    `lora`: a path or `LoraWeights`. Strength 0 gives the base's weights themselves."""
    strength = check_strength(strength)
    lora = as_lora(lora)
    check_lora_fits(lora, model)
    new = copy.copy(model)
    new.lm = merged_lm(model.lm, lora, strength)
    if hasattr(model, "_seed_record"):
        new._seed_record = threading.local()
    if hasattr(model, "decoding"):
        new.decoding = copy.copy(model.decoding)
    new.loras = list(getattr(model, "loras", [])) + [(lora.name, strength)]
    return new


# -- trainable layers ---------------------------------------------------------------------------------------

class LoraLinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: y = x W^T + b + scale * (drop(x) A^T) B^T.

    `weight` is the adapted weight W + scale * B A (for code that reads a weight directly); `forward` and `rows`
    (what the attention calls for its packed q/k/v projection) compute the update in factored form: no full-size
    adapted weight, nor its gradient, is made in training."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.scale = float(alpha) / int(rank)
        w = base.weight
        a = torch.empty(rank, w.shape[1], dtype=torch.float32)
        bound = 1.0 / math.sqrt(w.shape[1])          # kaiming-uniform(a=sqrt 5), as nn.Linear initialises
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(w.device))
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def adapted_weight(self) -> torch.Tensor:
        w = self.base.weight
        return w + (self.scale * (self.lora_B @ self.lora_A)).to(w.dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.adapted_weight()

    @property
    def bias(self):
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows(x)

    def rows(self, x: torch.Tensor, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Output rows lo:hi (all by default) in factored form: the frozen weight's rows, plus the update through
        the rank-r bottleneck. The attention calls this for its packed q/k/v projection (queries and memory
        keys/values are different rows), so no full-size adapted weight or its gradient is ever made."""
        w, bias, b = self.base.weight, self.base.bias, self.lora_B
        if not (lo == 0 and hi is None):
            w, b = w[lo:hi], b[lo:hi]
            bias = None if bias is None else bias[lo:hi]
        y = F.linear(x, w, bias)
        a = self.lora_A
        return y + self.scale * F.linear(F.linear(self.dropout(x).to(a.dtype), a), b).to(y.dtype)


def attach(lm: nn.Module, targets: Sequence[str], rank: int, alpha: float, dropout: float = 0.0,
           generator: torch.Generator | None = None) -> tuple[nn.Module, dict]:
    """(a shared copy of `lm` with `LoraLinear` layers on `targets`, {layer name: LoraLinear}). The base LM is
    not changed; its weights stay frozen and shared."""
    rank = int(rank)
    if rank < 1:
        raise MagnetError(f"LoRA rank {rank} must be at least 1 (typical: 4 to 64).")
    lowp.restore(lm)                          # training reads the exact weights (and fast mode's copy goes)
    new = shared_copy(lm)
    names = target_names(new, targets)
    modules = dict(new.named_modules())
    adapters = {}
    for name in names:
        owner, attr = name.rsplit(".", 1) if "." in name else ("", name)
        parent = modules[owner] if owner else new
        layer = LoraLinear(modules[name], rank, alpha, dropout, generator)
        parent._modules[attr] = layer
        adapters[name] = layer
    return new, adapters


def adapter_tensors(adapters: dict) -> dict:
    """The LoRA tensors of trained adapters, named as in the file."""
    out = {}
    for name, layer in adapters.items():
        out[f"{name}.lora_A.weight"] = layer.lora_A.detach()
        out[f"{name}.lora_B.weight"] = layer.lora_B.detach()
    return out


def load_into(adapters: dict, lora: LoraWeights) -> None:
    """Set trainable adapters from a LoRA file (to resume): same layers and rank."""
    pairs = lora.pairs()
    want = {f"{n}.weight" for n in adapters}
    if set(pairs) != want:
        raise MagnetError(f"LoRA {lora.path} adapts other layers ({sorted(set(pairs) ^ want)[:3]} ...) than this "
                          f"training's targets: resume with the targets it was trained with "
                          f"({', '.join(lora.targets) or 'see its metadata'}).")
    with torch.no_grad():
        for name, layer in adapters.items():
            a, b = pairs[f"{name}.weight"]
            if a.shape != layer.lora_A.shape:
                raise MagnetError(f"LoRA {lora.path} has rank {lora.rank}; this training uses rank "
                                  f"{layer.lora_A.shape[0]}. Resume with --rank {lora.rank}.")
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)


def lora_meta(model, *, rank: int, alpha: float, targets: Iterable[str], training: dict | None = None,
              trigger: str = "", clips: int = 0, steps: int = 0, train_loss: float | None = None,
              val_loss: float | None = None) -> dict:
    """The metadata of a LoRA file (all strings)."""
    source = getattr(model, "source", "") or ""
    return {META_KEY: FORMAT_VERSION, "fingerprint": json.dumps(fingerprint(model.lm)),
            "release": Path(source).name if source else "", "rank": str(int(rank)), "alpha": repr(float(alpha)),
            "targets": json.dumps(list(targets)), "training": json.dumps(training or {}, sort_keys=True),
            "trigger": trigger or "", "clips": str(int(clips)), "steps": str(int(steps)),
            "train_loss": "" if train_loss is None else repr(float(train_loss)),
            "val_loss": "" if val_loss is None else repr(float(val_loss))}


# -- the command line's --lora FILE[:STRENGTH] --------------------------------------------------------------

LORA_OPTION_HELP = ("a LoRA file from `python -m magnet train`, optionally with its strength (default 1), e.g. "
                    "--lora mysound.safetensors:0.8; repeat to stack several")


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """'FILE' or 'FILE:STRENGTH' -> (path, strength); the file must exist (a colon inside a path, as in
    C:\\..., is kept when what follows the last colon is not a number)."""
    text = str(spec).strip()
    path, strength = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            strength = float(tail)
            path = head
        except ValueError:
            pass
    strength = check_strength(strength)
    p = Path(path).expanduser()
    if not p.is_file():
        raise MagnetError(f"--lora {spec!r}: LoRA file not found: {p}. Give FILE or FILE:STRENGTH, e.g. "
                          f"--lora mysound.safetensors:0.8.")
    return p, strength


def apply_specs(model, specs):
    """The model with each (path, strength) of `specs` applied in order (the base model when none)."""
    for path, strength in specs:
        model = apply_lora(model, path, strength)
    return model
