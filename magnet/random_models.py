"""Models with random weights, built from an architecture alone (no download): LMs of the releases' shapes for
the benchmarks and the doctor's speed check, the tiny MAGNeT and codec the doctor checks a device with, and the
seeded fills the tests use.

The releases' shapes are written here once: `RELEASE_SCALES` (small: dim 1024, 16 heads, 24 layers; medium:
dim 1536, 24 heads, 48 layers), a feed-forward of 4 x dim, 4 codebooks of 2048 entries, and the text width of
the release's T5 (music: t5-base, 768; sound: t5-large, 1024); `release_arch` gives all of a shape's numbers.

Fills (each sets every parameter, so a model made on the meta device needs nothing else):
- `init_random`: matrices ~ N(0, 1/fan_in), norm weights 1, biases 0 (the tests, the benchmarks);
- `init_for_checks`: the same matrices, norms 1 + N(0, 0.1^2) and their biases N(0, 0.1^2), so that a path
  that mishandles a norm shows (the doctor's tiny model);
- `init_for_timing`: one random tile copied over every tensor, cheap for real-size models that are only timed.
"""
from __future__ import annotations

import json
import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .transformer import LM, LMConfig

# -- the releases' shapes ---------------------------------------------------------------------------

RELEASE_SCALES = {"small": dict(dim=1024, num_heads=16, num_layers=24),
                  "medium": dict(dim=1536, num_heads=24, num_layers=48)}
HIDDEN_SCALE = 4                               # ffn_dim = HIDDEN_SCALE * dim
N_Q, CARD = 4, 2048                            # codebooks, entries per codebook
TEXT_DIMS = {"music": 768, "sound": 1024}      # t5-base (the music releases), t5-large (audio-magnet)


def release_arch(scale="small", text: str = "music") -> dict:
    """Every architecture number of a release's LM (`LMConfig` fields): dim, num_heads, num_layers, ffn_dim,
    n_q, card, text_dim. `scale`: 'small', 'medium', or a dict of dim / num_heads / num_layers (a smaller
    model with the releases' other numbers, for smoke tests); `text`: 'music' or 'sound'."""
    shape = dict(RELEASE_SCALES[scale] if isinstance(scale, str) else scale)
    return dict(shape, ffn_dim=HIDDEN_SCALE * shape["dim"], n_q=N_Q, card=CARD, text_dim=TEXT_DIMS[text])


def release_config(scale="small", *, kind: str = "magnet", seconds: float = 10.0, text: str = "music",
                   arch: dict | None = None) -> LMConfig:
    """The `LMConfig` of a MAGNeT (`kind` 'magnet') or MusicGen ('musicgen': causal, the delay pattern) LM of a
    release's shape (`release_arch(scale, text)`, or `arch`) with a window of `seconds`."""
    arch = release_arch(scale, text) if arch is None else arch
    if kind == "musicgen":
        return LMConfig(kind="musicgen", causal=True, subcodes_context=-1, delays=list(range(arch["n_q"])),
                        segment_duration=seconds, **arch)
    return LMConfig(kind="magnet", segment_duration=seconds, **arch)


# -- fills ------------------------------------------------------------------------------------------

def init_random(lm, seed: int = 0):
    """Weights ~ N(0, 1/fan_in), norms' weights 1, biases and other vectors 0; returns `lm`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / math.sqrt(p.shape[-1])))
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return lm


def init_for_checks(lm, seed: int) -> None:
    """Seeded weights of the right scale: matrices ~ N(0, 1/fan_in), norms 1 + N(0, 0.1^2) and their biases
    N(0, 0.1^2) (so that a path that mishandles a norm shows), other vectors 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            elif "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.zero_()


def init_for_timing(lm, seed: int = 0) -> None:
    """Weights of the right scale, cheaply: one random tile of uniform values copied over every tensor and
    scaled to N(0, 1/fan_in)'s variance and rounded to float16 (the values repeat: this model is only timed).
    Norms 1, biases 0."""
    device = next(lm.parameters()).device
    g = torch.Generator().manual_seed(seed)
    tile = (torch.rand(1 << 20, generator=g) * 2 - 1).to(device)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if p.dim() >= 2:
                flat = p.view(-1)
                bound = math.sqrt(3.0 / p.shape[-1])
                scaled = (tile * bound).half()       # float16 values, as the releases are published
                for i in range(0, flat.numel(), tile.numel()):
                    n = min(tile.numel(), flat.numel() - i)
                    flat[i:i + n].copy_(scaled[:n])
            else:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)


def empty_lm(cfg: LMConfig, device="cpu", dtype: torch.dtype | None = None) -> LM:
    """An LM of `cfg` on `device` (in `dtype`) with uninitialised weights, made without initialising them (on
    the meta device): fill it with one of the fills above."""
    with torch.device("meta"):
        lm = LM(cfg)
        if dtype is not None:
            lm = lm.to(dtype)
    return lm.to_empty(device=device)


def random_lm(scale="small", *, kind: str = "magnet", seconds: float = 10.0, device="cpu",
              dtype: torch.dtype = torch.float32, seed: int = 0, float16_values: bool = True) -> LM:
    """A real-size LM of a release's shape (`release_config`) with `init_random` weights, their values rounded
    to float16 ones as the releases are published (unless `float16_values` is False), on `device` in `dtype`,
    in eval mode without gradients."""
    lm = init_random(empty_lm(release_config(scale, kind=kind, seconds=seconds)), seed)
    if float16_values:
        with torch.no_grad():
            for p in lm.parameters():
                p.copy_(p.half().float())
    return lm.to(device=device, dtype=dtype).eval().requires_grad_(False)


def random_release(src: Path, dst: Path, seed: int = 0, **transformer_lm) -> Path:
    """Copy the official-format release `src` to `dst`, changing transformer_lm fields in its xp.cfg (plus
    `segment_duration`, `span_len`) and filling the LM with random weights of the new shape (`init_random`;
    the text projection ~ N(0, 0.05^2))."""
    import yaml

    from .checkpoints import TEXT_PROJ_KEY, lm_config_from_xp, parse_xp_cfg
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "compression_state_dict.bin", dst / "compression_state_dict.bin")
    pkg = torch.load(src / "state_dict.bin", weights_only=True)
    xp = parse_xp_cfg(pkg["xp.cfg"], "fixture")
    if "segment_duration" in transformer_lm:
        xp["dataset"]["segment_duration"] = transformer_lm.pop("segment_duration")
    if "span_len" in transformer_lm:
        xp["masking"]["span_len"] = transformer_lm.pop("span_len")
    xp["transformer_lm"].update(transformer_lm)
    text_dim = pkg["best_state"][TEXT_PROJ_KEY + "weight"].shape[1]
    probe = {TEXT_PROJ_KEY + "weight": torch.zeros(1, text_dim)}
    cfg = lm_config_from_xp(xp, probe, "fixture")
    lm = init_random(LM(cfg), seed)
    with torch.no_grad():
        lm.text_proj.weight.normal_(0, 0.05)
    state = {(TEXT_PROJ_KEY + k[len("text_proj."):] if k.startswith("text_proj.") else k): v
             for k, v in lm.state_dict().items()}
    torch.save({"best_state": state, "xp.cfg": yaml.safe_dump(xp), "version": "1.3.0", "exported": True},
               dst / "state_dict.bin")
    return dst


# -- the tiny MAGNeT --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tiny:
    """A tiny MAGNeT: a few layers, 4 codebooks, a band of 5 frames, a 120-frame window (the doctor's checks)."""
    dim: int = 64
    num_heads: int = 4
    num_layers: int = 3
    ffn_dim: int = 256
    n_q: int = 4
    card: int = 128
    text_dim: int = 32
    subcodes_context: int = 5
    window_s: float = 2.4       # 120 frames at 50 Hz
    frames: int = 120
    long_frames: int = 300      # 2.5 windows: four windows with the default overlap
    batch: int = 2
    text_len: int = 7
    sample_rate: int = 8000     # the tiny codec: hop 8 * 5 * 4 = 160 samples, 50 frames per second
    seed: int = 0


def tiny_lm(t: Tiny) -> LM:
    """The tiny LM, `init_for_checks` weights."""
    cfg = LMConfig(kind="magnet", dim=t.dim, num_heads=t.num_heads, num_layers=t.num_layers, ffn_dim=t.ffn_dim,
                   n_q=t.n_q, card=t.card, text_dim=t.text_dim, subcodes_context=t.subcodes_context,
                   segment_duration=t.window_s)
    lm = empty_lm(cfg)
    init_for_checks(lm, t.seed)
    return lm


def _quantizer_bandwidth(n_q: int, card: int, frame_rate: float, config) -> None:
    """Set target_bandwidths so that this transformers builds `n_q` quantizers (versions count bits per code
    differently: ceil(log2(card)) or 10)."""
    for bits in (math.ceil(math.log2(card)), 10):
        per_q = frame_rate * bits
        bw = n_q * per_q / 1000
        while int(1000 * bw // per_q) < n_q:
            bw = math.nextafter(bw, math.inf)
        config.target_bandwidths = [bw]
        if config.num_quantizers == n_q:
            return
    raise RuntimeError(f"this transformers builds {config.num_quantizers} quantizers, not {n_q}")


def tiny_codec(t: Tiny):
    """A tiny transformers EnCodec (SEANet + RVQ, one LSTM layer) with seeded weights: every conv weight is
    its weight-norm direction `v` ~ N(0, 1/fan_in) with `g` = |v|, codebooks ~ N(0, 1)."""
    import transformers

    from . import compat
    from .codec import Codec
    config = transformers.EncodecConfig(sampling_rate=t.sample_rate, audio_channels=1, normalize=False,
                                        chunk_length_s=None, overlap=None, hidden_size=16, codebook_dim=16,
                                        num_filters=4, num_residual_layers=1, upsampling_ratios=[8, 5, 4],
                                        num_lstm_layers=1, codebook_size=t.card)
    _quantizer_bandwidth(t.n_q, t.card, config.frame_rate, config)
    with torch.random.fork_rng(devices=[]), compat.no_init_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.EncodecModel(config)
    g = torch.Generator().manual_seed(t.seed + 1)
    with torch.no_grad():
        tensors = dict(model.named_parameters())
        tensors.update((n, b) for n, b in model.named_buffers() if n.endswith("codebook.embed"))
        for name, p in tensors.items():
            if name.endswith("codebook.embed"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() >= 2 and not name.endswith(("original0", "weight_g")):
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif p.dim() == 1:
                p.copy_(0.01 * torch.randn(p.shape, generator=g))
        for name, p in tensors.items():            # weight norm: g = |v|, so that the weight is v
            for g_name, v_name in ((".original0", ".original1"), (".weight_g", ".weight_v")):
                if name.endswith(g_name):
                    v = tensors[name[: -len(g_name)] + v_name]
                    p.copy_(torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True))
    return Codec(model.eval())


def write_tiny_release(t: Tiny, folder: Path) -> Path:
    """The tiny LM and codec as a converted release (`python -m magnet convert`'s format), in `folder`."""
    from safetensors.torch import save_file

    from .checkpoints import FORMAT, FORMAT_VERSION
    lm = tiny_lm(t)
    codec_cfg, codec_state = tiny_codec(t).export()
    tensors = {"lm." + k: v.contiguous() for k, v in lm.state_dict().items()}
    tensors.update({"codec." + k: v.contiguous() for k, v in codec_state.items()})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "lm_config": json.dumps(lm.cfg.to_dict()),
            "codec_config": json.dumps(codec_cfg), "generation": "{}", "source": "doctor-tiny"}
    path = Path(folder) / "doctor-tiny.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path
