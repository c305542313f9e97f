"""EnCodec, the audio codec of MAGNeT / MusicGen releases, run through transformers' `EncodecModel`.

A release's `compression_state_dict.bin` comes in two forms:

- full weights: `{'best_state': audiocraft SEANet + RVQ state dict, 'xp.cfg': YAML}`. We build an
  `EncodecConfig` from `xp.cfg` (every number from the file) and rename the keys to transformers'
  names; the result computes exactly what audiocraft's own EnCodec computes.
- a pointer: `{'pretrained': 'facebook/encodec_32khz'}`, naming a separately released transformers
  EnCodec folder (`config.json` + `model.safetensors`) that we look for on disk (never downloaded,
  never unpickled).

`Codec.encode` turns a waveform `[B, C, S]` into codes `[B, n_q, T]`; `Codec.decode` goes back.
`Codec.export` / `Codec.from_config_and_state` store and rebuild the codec (for converted files).
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from . import compat
from .deps import require
from .errors import MagnetError, first_line

CODEC_DIR_ENV = "MAGNET_CODEC_DIR"
CODEC_FILE_LABEL = "codec file (compression_state_dict.bin)"


class Codec(nn.Module):
    """An EnCodec model: `encode` waveform -> codes, `decode` codes -> waveform."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # a transformers EncodecModel, in eval mode
        self.model.eval()

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_release_file(cls, path: str | Path, *, codec_dir: str | Path | None = None,
                          search_dirs: Iterable[str | Path] = ()) -> "Codec":
        """Load a release's `compression_state_dict.bin` (full weights or a pointer; see module doc).

        For a pointer, the transformers folder is looked for in this order: `codec_dir`, the
        `MAGNET_CODEC_DIR` environment variable, then a folder named after the pointer's last
        component (e.g. `encodec_32khz`) in the release folder, its parent and each of `search_dirs`.
        """
        path = Path(path)
        obj = compat.load_torch_file(path, CODEC_FILE_LABEL)
        if "best_state" in obj and "xp.cfg" in obj:
            return cls._from_audiocraft(obj["best_state"], obj["xp.cfg"], path)
        if "pretrained" in obj:
            folder = _find_pointer_folder(obj["pretrained"], path, codec_dir, search_dirs)
            return cls.from_transformers_folder(folder)
        raise MagnetError(
            f"{CODEC_FILE_LABEL} {path} holds neither codec weights ('best_state' + 'xp.cfg') nor a pointer "
            f"('pretrained'); found keys {sorted(map(str, obj))[:8]}. Use the "
            f"compression_state_dict.bin from the same release as state_dict.bin.")

    @classmethod
    def from_transformers_folder(cls, folder: str | Path) -> "Codec":
        """Load a transformers EnCodec folder (`config.json` + `model.safetensors`; no pickles, no custom code)."""
        folder = Path(folder)
        fix = (f"It must be a transformers EnCodec folder with config.json and model.safetensors, e.g. from "
               f"`python -m magnet download encodec_32khz --dir {folder}`.")
        if not (folder / "config.json").is_file():
            raise MagnetError(f"The EnCodec folder {folder} lacks config.json. {fix}")
        files = compat.safetensors_files(folder)
        if not files:
            raise MagnetError(compat.missing_weights_message(folder, "EnCodec folder", fix))
        config = compat.read_config(folder, "EnCodec folder", ("encodec",), "EnCodec", fix)
        state = compat.load_safetensors(files, "EnCodec weights", fix)
        return cls._build(config, state, source=str(files[0] if len(files) == 1 else folder))

    @classmethod
    def from_config_and_state(cls, config: dict, state: dict) -> "Codec":
        """Rebuild a codec from what `export()` returned (a transformers config dict + state dict)."""
        return cls._build(config, state, source="the stored codec")

    def export(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-able transformers config dict, state dict) that `from_config_and_state` rebuilds exactly.

        The convolutions' weights are stored as the plain weights the codec computes with (weight norm
        folded, see `fold_weight_norm`), under the same names in every transformers version;
        `from_config_and_state` also reads states with weight-norm tensors (`weight_g`/`weight_v` or
        `parametrizations.weight.original0/1`), as earlier versions stored them.
        """
        config = json.loads(self.model.config.to_json_string())
        state = {key: value.detach().clone().contiguous() for key, value in self.model.state_dict().items()}
        return config, state

    @classmethod
    def _from_audiocraft(cls, best_state: Any, xp_cfg: Any, path: Path) -> "Codec":
        if not isinstance(best_state, dict) or not isinstance(xp_cfg, str):
            raise MagnetError(f"{CODEC_FILE_LABEL} {path} is malformed ('best_state' must be a dict of tensors and "
                              f"'xp.cfg' a YAML string). Download the release file again.")
        config = _config_from_xp_cfg(xp_cfg, path)
        state = {_rename_audiocraft_key(k): v for k, v in best_state.items()}
        return cls._build(config, state, source=str(path))

    @classmethod
    def _build(cls, config: dict, state: dict, source: str) -> "Codec":
        transformers = require("transformers")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise MagnetError(f"The codec weights in {source} are not a dict of tensors: the file is damaged. "
                              f"Download it again.")
        compat.check_finite(state, source)
        config = {k: v for k, v in dict(config).items() if k not in ("auto_map", "transformers_version")}
        try:
            hf_config = transformers.EncodecConfig.from_dict(config)
            _fit_quantizer_count(hf_config, _count_quantizers(state) or hf_config.num_quantizers)
            with compat.no_init_weights(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # older versions warn about their own buffer construction
                model = transformers.EncodecModel(hf_config)
        except MagnetError:
            raise
        except Exception as e:
            raise MagnetError(f"The EnCodec configuration of {source} is not usable with transformers "
                              f"{transformers.__version__} ({first_line(e)}). Use the codec file that came with "
                              f"the release; if it is one, upgrade transformers: `{compat.PIP_TRANSFORMERS}`.") from None
        if any(k.endswith(compat.WN_OLD + compat.WN_NEW) for k in state):
            _load_strict(model, state, source)          # weight norm as released: load, then fold
            fold_weight_norm(model)
        else:
            _load_strict(fold_weight_norm(model), state, source)   # already folded (our own export)
        return cls(model)

    # --- properties ---------------------------------------------------------------------------

    @property
    def sample_rate(self) -> int:
        return int(self.model.config.sampling_rate)

    @property
    def channels(self) -> int:
        return int(self.model.config.audio_channels)

    @property
    def hop_length(self) -> int:
        return int(math.prod(self.model.config.upsampling_ratios))

    @property
    def frame_rate(self) -> int | float:
        """Frames per second: sample_rate / hop length (an int when it divides, as in every release)."""
        q, r = divmod(self.sample_rate, self.hop_length)
        return q if r == 0 else self.sample_rate / self.hop_length

    @property
    def n_q(self) -> int:
        """Number of codebooks (residual quantizers) per frame."""
        return len(self.model.quantizer.layers)

    @property
    def card(self) -> int:
        """Codebook size: codes are in [0, card)."""
        return int(self.model.config.codebook_size)

    # --- encode / decode ----------------------------------------------------------------------

    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """Waveform [B, C, S] at `sample_rate`, C == `channels` -> codes LongTensor [B, n_q, T].

        T = ceil(S / hop length). Runs on the module's device and dtype; the codes come back on the waveform's
        device.
        """
        if not isinstance(wav, torch.Tensor) or wav.dim() != 3 or not wav.is_floating_point():
            got = f"a {wav.dim()}-d {wav.dtype} tensor" if isinstance(wav, torch.Tensor) else type(wav).__name__
            raise MagnetError(f"Codec.encode needs a float waveform [batch, channels, samples], got {got}. "
                              f"Add the missing dimensions (e.g. wav[None]) or convert to float.")
        if wav.shape[1] != self.channels or wav.shape[-1] == 0:
            raise MagnetError(f"Codec.encode got a waveform of shape {tuple(wav.shape)}; this codec needs "
                              f"{self.channels} channel(s) and at least one sample. Convert the audio with "
                              f"magnet.audio.convert_audio(wav, sr, {self.sample_rate}, {self.channels}).")
        if self.model.config.normalize:
            raise MagnetError("This codec renormalizes its input (encodec.renormalize / normalize=True), so "
                              "its codes need a per-item scale that MAGNeT/MusicGen cannot use. Use the "
                              "codec released with the model.")
        param = next(self.model.parameters())
        with torch.inference_mode():
            embeddings = self.model.encoder(wav.to(device=param.device, dtype=param.dtype))
            codes = self.model.quantizer.encode(embeddings)  # [n_q, B, T], all n_q quantizers
        return codes.transpose(0, 1).long().to(wav.device)

    def encode_audio(self, wav: torch.Tensor, sample_rate: int, *, start: float = 0.0,
                     length: float | None = None) -> torch.Tensor:
        """Waveform [B, C, S] or [C, S] at any rate and channel count -> codes [B, n_q, T]: seconds
        [start, start + length) (the rest when `length` is None or 0) are resampled to the codec's rate and
        mixed to its channels, then encoded."""
        from .audio import check_waveform, convert_audio
        wav = check_waveform(wav, "audio to encode")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not sample_rate > 0 \
                or not float(sample_rate).is_integer():
            raise MagnetError(f"sample_rate {sample_rate!r} of the audio to encode must be a whole number of Hz > 0.")
        sr = int(sample_rate)
        if wav.dim() == 2:
            wav = wav[None]
        a = int(round(start * sr))
        b = wav.shape[-1] if not length or length <= 0 else min(wav.shape[-1], a + int(round(length * sr)))
        if a >= b:
            raise MagnetError(f"start {start:g} s is at or beyond the end of the audio ({wav.shape[-1] / sr:.2f} s): "
                              f"lower it.")
        if a > 0 or b < wav.shape[-1]:
            wav = wav[..., a:b]
        wav = convert_audio(wav.float(), sr, self.sample_rate, self.channels)
        return self.encode(wav)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, K, T] (K <= n_q, values in [0, card)) -> float32 waveform [B, C, T * hop length], on the
        codes' device (the codec runs on its own)."""
        if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or codes.is_floating_point():
            got = f"a {codes.dim()}-d {codes.dtype} tensor" if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise MagnetError(f"Codec.decode needs integer codes [batch, codebooks, frames], got {got}.")
        if not 1 <= codes.shape[1] <= self.n_q or codes.shape[-1] == 0:
            raise MagnetError(f"Codec.decode got codes of shape {tuple(codes.shape)}; this codec has "
                              f"{self.n_q} codebooks and needs at least one frame. Use codes made for this codec.")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.card):
            raise MagnetError(f"Codec.decode got code values outside [0, {self.card}) (min {int(codes.min())}, "
                              f"max {int(codes.max())}); a mask token left in the codes? Decode only "
                              f"fully generated codes.")
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            embeddings = self.model.quantizer.decode(codes.to(device).long().transpose(0, 1))
            wav = self.model.decoder(embeddings)
        return wav.float().to(codes.device)


# --- audiocraft xp.cfg -> transformers EncodecConfig ------------------------------------------

def _config_from_xp_cfg(text: str, path: Path) -> dict:
    """The transformers EncodecConfig fields for the SEANet + RVQ codec described by `xp.cfg`."""
    import yaml

    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise MagnetError(f"{CODEC_FILE_LABEL} {path}: its 'xp.cfg' is not valid YAML ({first_line(e)}). Download the "
                          f"release file again.") from None
    if not isinstance(cfg, dict):
        raise MagnetError(f"{CODEC_FILE_LABEL} {path}: its 'xp.cfg' is not a mapping. Download the release file again.")

    def get(dotted: str, default: Any = ...):
        node: Any = cfg
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is not ...:
                    return default
                raise MagnetError(f"{CODEC_FILE_LABEL} {path}: 'xp.cfg' lacks '{dotted}', so the codec cannot be "
                                  f"built. Use the compression_state_dict.bin of an official release.")
            node = node[part]
        match = re.fullmatch(r"\$\{([\w.]+)\}", node) if isinstance(node, str) else None
        return get(match.group(1), default) if match else node

    def unsupported(what: str) -> MagnetError:
        return MagnetError(f"{CODEC_FILE_LABEL} {path}: {what} is not supported (only the EnCodec of MAGNeT/MusicGen "
                           f"releases is). Use the codec file that came with an official release.")

    if get("compression_model", "encodec") != "encodec" or get("encodec.autoencoder", "seanet") != "seanet" \
            or get("encodec.quantizer", "rvq") != "rvq":
        raise unsupported("a codec other than EnCodec with a SEANet autoencoder and RVQ")
    seanet = get("seanet")
    for side in ("encoder", "decoder"):  # per-side overrides of the shared seanet settings
        for key, value in (get(f"seanet.{side}", {}) or {}).items():
            if (side, key) == ("decoder", "trim_right_ratio") or (key.startswith("final_activation") and value is None):
                continue
            if value != seanet.get(key):
                raise unsupported(f"a different seanet.{side}.{key} for the {side}")
    if get("seanet.activation", "ELU") != "ELU" or (get("seanet.activation_params", {}) or {}).get("alpha", 1.0) != 1.0:
        raise unsupported("an activation other than ELU(alpha=1)")
    if get("seanet.disable_norm_outer_blocks", 0) != 0 or get("seanet.norm_params", {}):
        raise unsupported("seanet.disable_norm_outer_blocks / norm_params")
    if int(get("seanet.lstm")) < 1:
        raise unsupported("a SEANet without LSTM (seanet.lstm = 0)")

    sample_rate = int(get("sample_rate"))
    ratios = [int(r) for r in get("seanet.ratios")]
    hop = math.prod(ratios)
    frame_rate = sample_rate // hop  # audiocraft's own frame rate (integer division)
    n_q, bins = int(get("rvq.n_q")), int(get("rvq.bins"))
    causal = bool(get("seanet.causal", get("encodec.causal", False)))
    channels = int(get("channels"))
    if get("seanet.channels", channels) != channels:
        raise unsupported("seanet.channels different from channels")
    dimension = int(get("seanet.dimension"))
    return {
        "sampling_rate": sample_rate,
        "audio_channels": channels,
        "normalize": bool(get("encodec.renormalize", False)),
        "chunk_length_s": None,
        "overlap": None,
        "hidden_size": dimension,
        "codebook_dim": dimension,
        "num_filters": int(get("seanet.n_filters")),
        "num_residual_layers": int(get("seanet.n_residual_layers")),
        "upsampling_ratios": ratios,
        "norm_type": str(get("seanet.norm")),
        "kernel_size": int(get("seanet.kernel_size")),
        "last_kernel_size": int(get("seanet.last_kernel_size")),
        "residual_kernel_size": int(get("seanet.residual_kernel_size")),
        "dilation_growth_rate": int(get("seanet.dilation_base")),
        "use_causal_conv": causal,
        "pad_mode": str(get("seanet.pad_mode")),
        "compress": int(get("seanet.compress")),
        "num_lstm_layers": int(get("seanet.lstm")),
        "trim_right_ratio": float(get("seanet.decoder.trim_right_ratio", get("seanet.trim_right_ratio", 1.0))),
        "codebook_size": bins,
        "use_conv_shortcut": not bool(get("seanet.true_skip")),
        "target_bandwidths": [_bandwidth_for(n_q, bins, frame_rate)],
    }


def _bandwidth_for(n_q: int, bins: int, frame_rate: int) -> float:
    """The kbps that transformers maps back to exactly `n_q` quantizers (it floors, so float error matters)."""
    bits_per_q = frame_rate * math.ceil(math.log2(bins))
    bandwidth = n_q * bits_per_q / 1000
    while int(1000 * bandwidth // bits_per_q) < n_q:  # guard against 2199.9999... // 550 == 3
        bandwidth = math.nextafter(bandwidth, math.inf)
    return bandwidth


_AUDIOCRAFT_RENAMES = [
    (re.compile(r"^(encoder|decoder)\.model\."), r"\1.layers."),
    (re.compile(r"\.conv\.conv\."), ".conv."),
    (re.compile(r"\.convtr\.convtr\."), ".conv."),
    (re.compile(r"\.(conv|convtr)\.norm\."), ".norm."),
    (re.compile(r"^quantizer\.vq\.layers\.(\d+)\._codebook\."), r"quantizer.layers.\1.codebook."),
]


def _rename_audiocraft_key(key: str) -> str:
    for pattern, repl in _AUDIOCRAFT_RENAMES:
        key = pattern.sub(repl, key)
    return key


def _count_quantizers(state: dict) -> int:
    """How many residual quantizers the weights hold (0 when no codebook is found)."""
    found = {int(m.group(1)) for k in state for m in [re.match(r"^quantizer\.layers\.(\d+)\.codebook\.embed$", k)] if m}
    return max(found) + 1 if found else 0


def _fit_quantizer_count(hf_config, n_q: int) -> None:
    """Set target_bandwidths so that this transformers version builds exactly `n_q` quantizers.

    Versions differ in how they turn a bandwidth into a quantizer count: newer ones use
    ceil(log2(codebook_size)) bits per code, 4.4x-4.5x always 10 bits.
    """
    bins = int(hf_config.codebook_size)
    frame_rate = hf_config.frame_rate
    for bits in dict.fromkeys([math.ceil(math.log2(bins)), 10, getattr(hf_config, "codebook_nbits", 10)]):
        hf_config.target_bandwidths = [_bandwidth_for(n_q, 2 ** bits, frame_rate)]
        if hf_config.num_quantizers == n_q:
            return
    raise MagnetError(f"transformers {_tf_version()} cannot build an EnCodec with {n_q} codebooks of {bins} entries. "
                      f"Upgrade it: `{compat.PIP_TRANSFORMERS}`.")


def _load_strict(model: nn.Module, state: dict, source: str) -> None:
    """Load `state` into `model`; any missing, unexpected or misshaped key is a MagnetError.

    Key names are first adapted to the installed transformers (weight norm, codebook buffers)."""
    expected = model.state_dict()
    renamed, keep = compat.adapt_encodec_state(state, expected)
    missing, unexpected, misshaped, parts = compat.state_mismatch(renamed, expected, allowed_missing=keep)
    if parts:
        if (missing or unexpected) and not misshaped and compat.same_shapes(renamed, expected):
            # the same tensors under other names: this transformers names EnCodec's weights differently
            raise MagnetError(f"The codec weights in {source} are complete, but transformers {_tf_version()} names "
                              f"EnCodec's weights differently ({'; '.join(parts)}). Update this pack, or install "
                              f"a transformers it was tested with ({', '.join(compat.TESTED_TRANSFORMERS)}), e.g. "
                              f"`pip install \"transformers=={compat.TESTED_TRANSFORMERS[-1]}\"`.")
        raise MagnetError(f"The codec weights in {source} do not match its configuration ({'; '.join(parts)}). "
                          f"The file is not an EnCodec of a MAGNeT/MusicGen release or is damaged: use the "
                          f"file that came with the release.")
    model.load_state_dict(renamed, strict=not keep)


def fold_weight_norm(model: nn.Module) -> nn.Module:
    """Replace every weight-normed weight (g * v / |v|) of `model` by the plain weight it computes, in place,
    and return `model`. The value is the one each forward computed (the same function, computed once), so
    results are unchanged; decoding no longer recomputes the weights, and every convolution then holds its
    weight and bias itself, which memory managers that move a model module by module need (ComfyUI moves
    only modules whose parameters are all their own: a parametrized convolution's bias would stay behind).
    Works with both weight-norm APIs transformers uses (parametrizations in torch >= 2.1 with transformers
    >= 4.41; the older forward-pre-hook `weight_g`/`weight_v` before)."""
    from torch.nn.utils import parametrize
    try:
        from torch.nn.utils.weight_norm import WeightNorm as OldWeightNorm
    except ImportError:  # pragma: no cover - a torch without the old API
        OldWeightNorm = ()
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        elif OldWeightNorm and any(isinstance(h, OldWeightNorm) and h.name == "weight"
                                   for h in module._forward_pre_hooks.values()):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")      # deprecation notices of the old API
                torch.nn.utils.remove_weight_norm(module)
    return model


def _tf_version() -> str:
    import transformers
    return transformers.__version__


# --- pointer resolution -------------------------------------------------------------------------

def _find_pointer_folder(pretrained: Any, release_file: Path, codec_dir: str | Path | None,
                         search_dirs: Iterable[str | Path]) -> Path:
    if not isinstance(pretrained, str) or not pretrained.strip("/"):
        raise MagnetError(f"{CODEC_FILE_LABEL} {release_file}: its 'pretrained' entry is not a model name "
                          f"({pretrained!r}). Download the release file again.")
    name = pretrained.rstrip("/").split("/")[-1]

    def explicit(folder: Path, origin: str) -> Path:
        # the folder itself, or a folder named after the pointer inside it
        for candidate in (folder, folder / name):
            if (candidate / "config.json").is_file():
                return candidate
        raise MagnetError(f"{origin} is {folder}, but neither it nor {folder / name} is a transformers "
                          f"EnCodec folder (config.json + model.safetensors). Fix the path, or get the "
                          f"codec with `python -m magnet download {name} --dir {folder / name}`.")

    if codec_dir is not None:
        return explicit(Path(codec_dir), "The codec folder given")
    if os.environ.get(CODEC_DIR_ENV):
        return explicit(Path(os.environ[CODEC_DIR_ENV]), f"${CODEC_DIR_ENV}")
    release_dir = Path(os.path.abspath(release_file)).parent  # not resolve(): keep the HF cache's snapshot folder
    searched = [release_dir, release_dir.parent, *(Path(d) for d in search_dirs)]
    for parent in searched:
        if (parent / name).is_dir():
            return parent / name
    raise MagnetError(
        f"{release_file} points to the separately released codec '{pretrained}', which was not found. "
        f"Searched for a folder named '{name}' in: {', '.join(str(d) for d in searched)}. Get it with "
        f"`python -m magnet download {name} --dir {release_dir.parent / name}` (next to the "
        f"release folder), or set {CODEC_DIR_ENV} to the folder holding config.json and model.safetensors.")
