"""Shared fixtures: the reference checkpoints and goldens in ../shared/reference, loaded models, and
`make_release` for official-format checkpoints of other shapes built on the fly."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def _require_reference():
    if not (REFERENCE / "golden.safetensors").is_file():
        msg = (f"reference fixtures not found at {REFERENCE}: the parity tests need ../shared/reference "
               f"beside the project")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def ref() -> Path:
    _require_reference()
    return REFERENCE


@pytest.fixture(scope="session")
def golden(ref):
    from safetensors.torch import load_file
    return load_file(str(ref / "golden.safetensors"))


@pytest.fixture(scope="session")
def golden_cfg(ref) -> dict:
    return json.loads((ref / "golden.json").read_text())


@pytest.fixture(scope="session")
def music_model(ref):
    from magnet import MagnetModel
    return MagnetModel.from_pretrained(ref / "magnet-music", text_encoder=ref / "t5-base", device="cpu")


@pytest.fixture(scope="session")
def audio_model(ref):
    from magnet import MagnetModel
    return MagnetModel.from_pretrained(ref / "magnet-audio", text_encoder=ref / "t5-large", device="cpu")


@pytest.fixture(scope="session")
def models(music_model, audio_model):
    return {"music": music_model, "audio": audio_model}


# The sampling values the goldens were computed with: the reference's generation defaults, for every
# fixture (the audio fixture's own xp.cfg stores others, which the engine uses when none are given).
REFERENCE_SAMPLING = dict(temperature=3.0, top_k=0, top_p=0.9, max_cfg_coef=10.0, min_cfg_coef=1.0)


def golden_prompts(model, golden, name) -> list[str]:
    """The prompts a golden entry was computed for, read back from its T5 ids (cond rows first)."""
    ids = golden[f"{name}.t5_input_ids"]
    return model.text_encoder.tokenizer.batch_decode(ids[: ids.shape[0] // 2], skip_special_tokens=True)


def make_release(src: Path, dst: Path, seed: int = 0, **transformer_lm) -> Path:
    """Copy the official-format release `src` to `dst`, changing transformer_lm fields in its xp.cfg
    (plus `segment_duration`, `span_len`) and filling the LM with random weights of the new shape."""
    from magnet.random_models import random_release
    return random_release(src, dst, seed, **transformer_lm)


class Spy:
    """Records every call of the decoding loop (`magnet.sampling.generate`): its keyword arguments, the
    conditioning's prompts, the length and what it returned."""

    def __init__(self, monkeypatch):
        import magnet.sampling as sampling_mod
        self.calls = []
        real = sampling_mod.generate

        def spy(lm, cond, frames, params, **kw):
            out = real(lm, cond, frames, params, **kw)
            self.calls.append(dict(kw, prompts=list(getattr(cond, "prompts", []) or []), frames=frames,
                                   out=out.clone()))
            return out
        monkeypatch.setattr(sampling_mod, "generate", spy)


# -- the seam measure (long-form joins, loop wrap-arounds, timeline prompt changes) -----------------

def frame_jumps(wav, hop, frames):
    """Per frame boundary f (1..frames-1): the largest sample-to-sample step within +-hop/4 of f*hop, on the
    channel mean. wav [B, C, S] -> [B, frames-1]."""
    x = wav.mean(dim=-2)
    d = (x[:, 1:] - x[:, :-1]).abs()
    q = hop // 4
    return torch.stack([d[:, f * hop - q: f * hop + q].amax(-1) for f in range(1, frames)], dim=-1)


def seam_ranks(jumps, joins, guard=2):
    """Each join's statistic as a percentile among the boundaries inside (those within `guard` frames of a
    join or of the clip's ends left out), and its ratio to the largest of them: (ranks, ratios) arrays."""
    import numpy as np
    F = jumps.shape[-1] + 1
    b = np.arange(1, F)
    inside = (b > guard) & (b < F - guard)
    for j in joins:
        inside &= np.abs(b - j) > guard
    ranks, ratios = [], []
    for row in jumps.numpy():
        ref = row[inside]
        for j in joins:
            ranks.append(float((ref < row[j - 1]).mean()))
            ratios.append(float(row[j - 1] / ref.max()))
    return np.array(ranks), np.array(ratios)


@pytest.fixture(scope="module")
def pack():
    """The pack loaded as ComfyUI loads custom_nodes/<folder> (test files that need another set-up override it)."""
    from pack import load_pack
    return load_pack()


@pytest.fixture(scope="module")
def N(pack):
    return pack.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models (thread hand-offs would cost more than their work)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
