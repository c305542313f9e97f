"""The T5 text encoder: prompts -> T5 last hidden states (the conditioning before the LM's projection).

Conditional prompts and their null prompts (empty strings, whose attention mask is all zero) are
encoded in one batch padded to the longest, as the reference does: that is what makes the text
memory bit-identical. T5 always runs in float32 (fp16 T5 overflows).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MagnetError


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


class TextEncoder:
    """A transformers T5 encoder folder (config.json, model.safetensors, tokenizer files)."""

    def __init__(self, folder: str | Path, device=None):
        from transformers import AutoTokenizer, T5EncoderModel
        folder = Path(folder).expanduser()
        _check_folder(folder)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
            self.model = T5EncoderModel.from_pretrained(str(folder), use_safetensors=True,
                                                        dtype=torch.float32).eval()
        except (OSError, ValueError, KeyError) as e:
            raise MagnetError(f"text encoder folder {folder} could not be loaded as a T5 encoder ({_short(e)}). "
                              f"Use a transformers T5 folder such as t5-base or t5-large "
                              f"(config.json, model.safetensors, spiece.model/tokenizer.json).") from None
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
    def encode(self, prompts: list[str] | str) -> TextCondition:
        """Prompts -> TextCondition with the null rows appended (for classifier-free guidance)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [_check_prompt(p) for p in prompts]
        if not prompts:
            raise MagnetError("no prompt given: pass at least one prompt (an empty string generates "
                              "unconditionally).")
        entries = prompts + [""] * len(prompts)
        tok = self.tokenizer(entries, return_tensors="pt", padding=True)
        ids, mask = tok["input_ids"], tok["attention_mask"].clone()
        mask[[i for i, p in enumerate(entries) if p == ""]] = 0
        dev = self.device
        with torch.autocast(dev.type, enabled=False):
            hidden = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state.float()
        return TextCondition(list(prompts), hidden, mask.to(dev), ids, self.name)


def _check_prompt(p) -> str:
    if p is None:
        return ""
    if not isinstance(p, str):
        raise MagnetError(f"prompt {p!r} is not text: pass strings (an empty string generates unconditionally).")
    return p if p.strip() else ""


def _check_folder(folder: Path):
    if not folder.is_dir():
        raise MagnetError(f"text encoder folder not found: {folder}. Download the T5 named by the release "
                          f"(t5-base for music, t5-large for audio-magnet) as a transformers folder, e.g. "
                          f"`python -m magnet download {folder.name if folder.name in ('t5-base', 't5-large') else 't5-base'} "
                          f"--dir {folder}`.")
    if not (folder / "config.json").exists():
        raise MagnetError(f"{folder} has no config.json: it is not a transformers T5 folder. Point to the "
                          f"folder holding config.json, model.safetensors and the tokenizer files.")
    if not (folder / "model.safetensors").exists() and not list(folder.glob("model-*.safetensors")):
        extra = " (it holds only pickle weights, which are never loaded: get model.safetensors)" \
            if (folder / "pytorch_model.bin").exists() else ""
        raise MagnetError(f"{folder} has no model.safetensors{extra}. Download the safetensors weights of "
                          f"the T5 model into that folder.")


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__
