"""MAGNeT's training objective against the reference solver's goldens, and the LoRA training loop.

Goldens: ../shared/reference/train_golden.* (magnet-music) and tests/goldens/train_*.* (magnet-audio, and a
release of other shapes and span length 4 rebuilt here with `make_release`), all made by audiocraft 1.3.0's
MagnetSolver code (`_calc_mean_maskrate_to_u_LUT`, `_spans_mask`, `_compute_cross_entropy_magnet`,
`compute_predictions(..., stage=s)`) on fixed codes, prompts and masks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_release
from magnet import MagnetModel
from magnet.errors import MagnetError
from magnet.train import spans_mask, span_starts_table, stage_loss

GOLDENS = Path(__file__).parent / "goldens"
REL_TOL = 1e-5


def _load_golden(path: Path):
    from safetensors.torch import load_file
    return load_file(str(path)), json.loads(path.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def cases(ref, music_model, audio_model, tmp_path_factory):
    """(model, golden tensors, golden notes) for each golden."""
    out = {"music": (music_model, *_load_golden(ref / "train_golden.safetensors")),
           "audio": (audio_model, *_load_golden(GOLDENS / "train_audio.safetensors"))}
    g, notes = _load_golden(GOLDENS / "train_wide.safetensors")
    spec = dict(notes["make_release"])
    src = ref / spec.pop("src")
    with torch.random.fork_rng():
        torch.manual_seed(spec["seed"])          # make_release draws the text projection from the global generator
        folder = make_release(src, tmp_path_factory.mktemp("wide") / notes["release"], **spec)
    wide = MagnetModel.from_pretrained(folder, text_encoder=ref / "t5-base", device="cpu")
    out["wide"] = (wide, g, notes)
    return out


@pytest.mark.parametrize("name", ["music", "audio", "wide"])
def test_span_starts_table_equals_the_reference_table(cases, name):
    _, g, notes = cases[name]
    table = span_starts_table(notes["T"], notes["span_len"])
    assert len(table) == 101
    assert table == g["lut"].tolist()


@pytest.mark.parametrize("name", ["music", "audio", "wide"])
def test_stage_loss_equals_the_reference_loss_for_every_stage(cases, name):
    model, g, notes = cases[name]
    for stage in range(notes["K"]):
        loss = stage_loss(model, g["codes"], notes["prompts"], stage, g[f"stage{stage}.mask"].bool())
        want = float(g[f"stage{stage}.loss"])
        assert loss.dim() == 0 and loss.dtype == torch.float32
        assert abs(float(loss) - want) <= REL_TOL * abs(want), (name, stage, float(loss), want)


@pytest.mark.parametrize("name", ["music", "wide"])
def test_spans_mask_draws_the_reference_spans_from_the_same_random_stream(cases, name):
    _, g, notes = cases[name]
    for stage in range(notes["K"]):
        torch.manual_seed(100 + stage)          # the goldens' masks were drawn with the global generator
        mask = spans_mask(g[f"stage{stage}.rates"], notes["T"], notes["span_len"], g["lut"])
        assert torch.equal(mask, g[f"stage{stage}.mask"].bool())


def test_stage_loss_is_differentiable_and_depends_on_the_masked_positions_only(music_model):
    torch.manual_seed(0)
    lm = music_model.lm
    codes = torch.randint(0, lm.cfg.card, (1, lm.cfg.n_q, 30))
    mask = torch.zeros(1, 30, dtype=torch.bool)
    mask[0, 6:12] = True
    w = lm.linears[1].weight
    w.requires_grad_(True)
    try:
        loss = stage_loss(music_model, codes, ["a prompt"], 1, mask)
        loss.backward()
        assert w.grad is not None and float(w.grad.abs().sum()) > 0
        # a target outside the mask changes nothing, but its input is given (stage 1 sees codebook 0 and
        # codebook 1 outside the mask): change a target inside the mask instead and the loss moves
        other = codes.clone()
        other[0, 1, 8] = (codes[0, 1, 8] + 1) % lm.cfg.card
        assert float(stage_loss(music_model, other, ["a prompt"], 1, mask)) != float(loss)
        far = codes.clone()
        far[0, 2:, 20] = (codes[0, 2:, 20] + 1) % lm.cfg.card    # codebooks above the stage are all masked
        assert float(stage_loss(music_model, far, ["a prompt"], 1, mask)) == float(loss)
    finally:
        w.requires_grad_(False)
        w.grad = None


def test_stage_loss_refuses_bad_arguments(music_model):
    K = music_model.cfg.n_q
    codes = torch.zeros(2, K, 12, dtype=torch.long)
    mask = torch.ones(2, 12, dtype=torch.bool)
    with pytest.raises(MagnetError, match="stage"):
        stage_loss(music_model, codes, ["a", None], K, mask)
    with pytest.raises(MagnetError, match="shape"):
        stage_loss(music_model, codes, ["a", None], 0, mask[:, :5])
    with pytest.raises(MagnetError, match="prompts"):
        stage_loss(music_model, codes, ["a"], 0, mask)
    with pytest.raises(MagnetError, match="integer codes"):
        stage_loss(music_model, codes.float(), ["a", None], 0, mask)
