"""The T5 text encoder: prompts -> T5 last hidden states (the conditioning before the LM's projection).

Conditional prompts and their null prompts (empty strings, whose attention mask is all zero) are
encoded in one batch padded to the longest, as the reference does: that is what makes the text
memory bit-identical. T5 always runs in float32 (fp16 T5 overflows).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from . import compat
from .deps import require
from .devices import autocast_for
from .errors import MagnetError, first_line


@dataclass
class TextCondition:
    """Encoded prompts, ready for any LM that uses this text encoder.

    hidden: [2B, L, text_dim] float32 — rows 0..B-1 the prompts, rows B..2B-1 the null prompts.
    mask:   [2B, L] long — attention mask; all zero for empty prompts and for the null rows.
    """
    prompts: list
    hidden: torch.Tensor
    mask: torch.Tensor
    input_ids: torch.Tensor
    encoder: str = ""

    @property
    def batch(self) -> int:
        return len(self.prompts)

    @property
    def text_dim(self) -> int:
        return self.hidden.shape[-1]

    @property
    def unconditional(self) -> bool:
        """True when every prompt is empty: conditional and null rows are then identical."""
        return not bool(self.mask[: self.batch].any())

    def to(self, device) -> "TextCondition":
        return TextCondition(self.prompts, self.hidden.to(device), self.mask.to(device),
                             self.input_ids.to(device), self.encoder)

    def select(self, index) -> "TextCondition":
        """A sub-batch (list of indices) with its null rows."""
        idx = list(index)
        rows = idx + [self.batch + i for i in idx]
        return TextCondition([self.prompts[i] for i in idx], self.hidden[rows], self.mask[rows],
                             self.input_ids[rows], self.encoder)


MAX_PROMPT_TOKENS = 512
"""Longest prompt accepted, in T5 tokens (with the end-of-sequence token). T5 was trained on 512-token
inputs and MAGNeT's descriptions are a sentence or two; the reference tokenizes without truncation, so
anything up to this limit gives exactly the reference's conditioning, and a longer prompt is refused
rather than cut (a cut prompt would silently lose its end)."""
_MAX_PROMPT_CHARS = 50 * MAX_PROMPT_TOKENS  # refuse absurd lengths before tokenizing them
_PROBE = "lofi hip hop beat"
_T5_FIX = ("Use a complete transformers T5 folder such as t5-base or t5-large (config.json, model.safetensors, "
           "tokenizer.json and/or spiece.model), e.g. from `python -m magnet download t5-base --dir <folder>`.")


class TextEncoder:
    """A transformers T5 encoder folder (config.json, model.safetensors, tokenizer.json / spiece.model).

    The folder is read without transformers' own loader: config.json (refused when it maps to custom
    code), the safetensors weights (never a pickle; refused when truncated or holding NaN/inf), then
    `T5EncoderModel` built from the config. The same code works in every supported transformers.
    The tokenizer is checked to turn a plain prompt into known tokens of the model's vocabulary.
    """

    def __init__(self, folder: str | Path, device=None):
        folder = Path(folder).expanduser()
        weights = _check_folder(folder)
        config = compat.read_config(folder, "text encoder folder", ("t5",), "T5", _T5_FIX)
        state = compat.load_safetensors(weights, "T5 weights", _T5_FIX)
        source = str(weights[0] if len(weights) == 1 else folder)
        compat.check_finite(state, source)
        self.model = _build_t5(config, state, source)
        self.tokenizer = _load_tokenizer(folder)
        _check_tokenizer(self.tokenizer, self.model, folder)
        if device is not None:
            self.model.to(device)
        self.folder = folder
        self.name = folder.name

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "TextEncoder":
        self.model.to(device)
        return self

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str] | str) -> TextCondition:
        """Prompts -> TextCondition with the null rows appended (for classifier-free guidance).

        `prompts`: a string or a list/tuple of strings; an empty string (or None, as in audiocraft)
        generates unconditionally. Tokenized as the reference does (padding to the longest, no
        truncation); a prompt longer than MAX_PROMPT_TOKENS (512) T5 tokens is refused.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise MagnetError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}. "
                              f"Pass e.g. ['lofi hip hop beat'] (an empty string generates unconditionally).")
        prompts = [_check_prompt(p, i) for i, p in enumerate(prompts)]
        if not prompts:
            raise MagnetError("no prompt given: pass at least one prompt (an empty string generates "
                              "unconditionally).")
        entries = prompts + [""] * len(prompts)
        tok = self.tokenizer(entries, return_tensors="pt", padding=True)
        ids, mask = tok["input_ids"], tok["attention_mask"].clone()
        lengths = mask.sum(dim=1)
        if int(lengths.max()) > MAX_PROMPT_TOKENS:
            i = int(lengths.argmax())
            raise MagnetError(f"prompt {i} is {int(lengths[i])} T5 tokens long; the limit is {MAX_PROMPT_TOKENS} "
                              f"tokens (T5's training length; a longer text is not cut, to keep what you wrote). "
                              f"Shorten the prompt to a sentence or two describing the sound.")
        mask[[i for i, p in enumerate(entries) if p == ""]] = 0
        dev = self.device
        with autocast_for(dev, torch.float32):      # T5 runs in fp32 (fp16 overflows), even inside autocast
            hidden = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state.float()
        return TextCondition(list(prompts), hidden, mask.to(dev), ids, self.name)


def _check_prompt(p, i: int) -> str:
    if p is None:
        return ""
    if not isinstance(p, str):
        raise MagnetError(f"prompt {i} ({p!r:.60}) is not text: pass strings (an empty string generates "
                          f"unconditionally).")
    if len(p) > _MAX_PROMPT_CHARS:
        raise MagnetError(f"prompt {i} is {len(p)} characters long; the limit is {MAX_PROMPT_TOKENS} T5 tokens "
                          f"(T5's training length). Shorten the prompt to a sentence or two describing the sound.")
    return p if p.strip() else ""


def _check_folder(folder: Path) -> list[Path]:
    """The folder's safetensors weights, after checking the files a T5 folder needs are there."""
    if not folder.is_dir():
        raise MagnetError(f"text encoder folder not found: {folder}. Download the T5 named by the release "
                          f"(t5-base for music, t5-large for audio-magnet) as a transformers folder, e.g. "
                          f"`python -m magnet download {folder.name if folder.name in ('t5-base', 't5-large') else 't5-base'} "
                          f"--dir {folder}`.")
    if not (folder / "config.json").exists():
        raise MagnetError(f"{folder} has no config.json: it is not a transformers T5 folder. Point to the "
                          f"folder holding config.json, model.safetensors and the tokenizer files.")
    weights = compat.safetensors_files(folder)
    if not weights:
        raise MagnetError(compat.missing_weights_message(folder, "text encoder folder", _T5_FIX))
    if not (folder / "tokenizer.json").is_file() and not (folder / "spiece.model").is_file():
        raise MagnetError(f"The text encoder folder {folder} has no tokenizer: it needs tokenizer.json or "
                          f"spiece.model (without one, every prompt would become unknown tokens). Copy them from "
                          f"the same T5 model (google-t5/{'t5-large' if 'large' in folder.name else 't5-base'}) "
                          f"into the folder, or download it again with `python -m magnet download "
                          f"{'t5-large' if 'large' in folder.name else 't5-base'} --dir {folder}`.")
    return weights


def _build_t5(config: dict, state: dict, source: str):
    """T5EncoderModel from its config and weights (decoder/lm_head weights of a full T5 are ignored)."""
    transformers = require("transformers")
    config = {k: v for k, v in config.items() if k not in ("auto_map", "transformers_version")}
    try:
        hf_config = transformers.T5Config.from_dict(config)
        with compat.no_init_weights():
            model = transformers.T5EncoderModel(hf_config)
    except Exception as e:
        raise MagnetError(f"The T5 configuration of {source} is not usable with transformers "
                          f"{transformers.__version__} ({first_line(e)}). {_T5_FIX}") from None
    model.set_input_embeddings(model.shared)  # the encoder's token embedding is the shared one
    embed = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
    weights = {k: v for k, v in state.items() if k.startswith("encoder.") and k != "encoder.embed_tokens.weight"}
    if embed is not None:
        weights["shared.weight"] = embed
    expected = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    missing, unexpected, misshaped, parts = compat.state_mismatch(weights, expected)
    if parts:
        raise MagnetError(f"The T5 weights in {source} do not match its config.json ({'; '.join(parts)}): the "
                          f"files do not belong together or the download is incomplete. {_T5_FIX}")
    model.load_state_dict(weights, strict=False)
    return model.float().eval()


def _load_tokenizer(folder: Path):
    """The T5 tokenizer: tokenizer.json (fast; needs only `tokenizers`), else spiece.model (sentencepiece).

    spiece.model is also the fallback when the installed `tokenizers` cannot parse a tokenizer.json
    written by a newer one (older transformers pin older tokenizers)."""
    transformers = require("transformers")
    has_json, has_spm = (folder / "tokenizer.json").is_file(), (folder / "spiece.model").is_file()
    errors = []
    if has_json:
        try:
            return _auto_tokenizer(transformers, folder, use_fast=True)
        except Exception as e:
            errors.append(f"tokenizer.json: {first_line(e)}")
    if has_spm:
        require("sentencepiece")
        if compat.transformers_version() >= (5, 0, 0) and not _has_protobuf():
            if not has_json:
                raise MagnetError(f"The text encoder folder {folder} has spiece.model but no tokenizer.json, and "
                                  f"transformers {transformers.__version__} reads spiece.model only with protobuf. "
                                  f"Copy tokenizer.json of the same T5 model into the folder (or download it again "
                                  f"with `python -m magnet download t5-base --dir {folder}`), or run "
                                  f"`pip install protobuf`.")
        else:
            try:
                return _auto_tokenizer(transformers, folder, use_fast=False)
            except Exception as e:
                errors.append(f"spiece.model: {first_line(e)}")
    raise MagnetError(f"The tokenizer files of {folder} could not be read by transformers {transformers.__version__} "
                      f"({'; '.join(errors)}). They are damaged or not a T5 tokenizer: copy tokenizer.json and "
                      f"spiece.model again from the same T5 model. If they came from a newer transformers, "
                      f"upgrade it instead: `{compat.PIP_TRANSFORMERS}`. {_T5_FIX}")


def _auto_tokenizer(transformers, folder: Path, use_fast: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoTokenizer.from_pretrained(str(folder), use_fast=use_fast, **compat.tokenizer_kwargs())


def _has_protobuf() -> bool:
    try:
        import google.protobuf  # noqa: F401
    except ImportError:
        return False
    return True


def _check_tokenizer(tokenizer, model, folder: Path) -> None:
    """The tokenizer must turn a plain prompt into known tokens that the model's embedding holds."""
    rows = int(model.get_input_embeddings().weight.shape[0])
    try:
        ids = list(tokenizer(_PROBE)["input_ids"])
        size = len(tokenizer)
        unk = tokenizer.unk_token_id
        back = tokenizer.decode(ids, skip_special_tokens=True)
    except Exception as e:
        ids, size, unk, back = [], 0, None, f"<{first_line(e)}>"
    problem = None
    if not ids:
        problem = "turns a prompt into no tokens"
    elif size > rows or max(ids) >= rows or min(ids) < 0:
        problem = f"has {size} tokens but the model's embedding only {rows}: they are not from the same model"
    elif unk is not None and unk in ids:
        problem = f"turns the prompt {_PROBE!r} into unknown tokens ({ids[:8]})"
    elif " ".join(back.split()) != _PROBE:
        problem = f"does not read back the prompt {_PROBE!r} (got {back!r:.60})"
    if problem:
        raise MagnetError(f"The tokenizer of the text encoder folder {folder} {problem}; the tokenizer files "
                          f"(tokenizer.json, spiece.model) are missing, damaged or from another model. Copy them "
                          f"from the same T5 model into the folder, or download it again. {_T5_FIX}")
