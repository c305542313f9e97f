"""The CUDA-graph path's policy, checks and fallbacks, run on the CPU through the static-buffer path
(`DecodingSettings.static_steps_on_cpu`: the same bookkeeping, with an eager forward in place of the replay)."""
import logging

import pytest
import torch

import magnet.transformer as transformer
from magnet import cuda_graphs
from magnet.cuda_graphs import StaticStep, graph_state, graphs_allowed_by_env
from magnet.stage_forward import DecodingSettings, StageForward

EAGER = DecodingSettings(prune_on_cpu=False)


def static(**kw) -> DecodingSettings:
    return DecodingSettings(static_steps_on_cpu=True, prune_on_cpu=False, **kw)


@pytest.fixture
def model(music_model, monkeypatch):
    """The music fixture with fresh graph state (the state is per model and the model is shared)."""
    cuda_graphs._graph_states.pop(music_model.lm, None)
    yield music_model
    cuda_graphs._graph_states.pop(music_model.lm, None)


def _count(monkeypatch, cls):
    made = []
    real = cls.__init__

    def spy(self, *a, **k):
        made.append(self)
        real(self, *a, **k)
    monkeypatch.setattr(cls, "__init__", spy)
    return made


def _generate(model, settings, monkeypatch, **kw):
    monkeypatch.setattr(model, "decoding", settings)
    kw = {"seed": 3, "duration": 1.2, "decoding_steps": (6, 3, 4, 2), **kw}
    return model.generate(["dub techno"], **kw)


def test_only_stages_with_enough_steps_are_captured_and_the_result_is_the_eager_one(model, monkeypatch):
    eager = _generate(model, EAGER, monkeypatch)
    steps = _count(monkeypatch, StaticStep)
    codes = _generate(model, static(graph_min_steps=4), monkeypatch)
    assert torch.equal(codes, eager)
    assert len(steps) == 2                      # stages of 6 and 4 steps; the 3- and 2-step stages run eagerly


def test_windows_of_the_same_shape_reuse_their_captures(model, monkeypatch):
    """A long generation captures each stage once per window shape, not once per window."""
    eager = _generate(model, EAGER, monkeypatch, duration=6.0, decoding_steps=(4, 4, 4, 4))
    stages = _count(monkeypatch, StageForward)
    steps = _count(monkeypatch, StaticStep)
    codes = _generate(model, static(), monkeypatch, duration=6.0, decoding_steps=(4, 4, 4, 4))
    assert torch.equal(codes, eager)
    windows = len(stages) // 4
    assert windows >= 4
    assert len(steps) <= 4 * 2 < 4 * windows    # the full-length windows share theirs; the last may differ


def test_a_kept_capture_is_not_reused_once_the_weights_moved(model, monkeypatch):
    _generate(model, static(), monkeypatch)
    steps = _count(monkeypatch, StaticStep)
    _generate(model, static(), monkeypatch)
    assert steps == []                          # the same shapes and weights: reused
    w = model.lm.linears[0].weight
    monkeypatch.setattr(w, "data", w.data.clone())   # what a memory manager moving the model does
    _generate(model, static(), monkeypatch)
    assert len(steps) == 2                      # the two captured stages, captured again
    assert list(graph_state(model.lm).steps.values()) == steps      # the stale ones were dropped


def test_a_replay_that_differs_from_the_eager_forward_turns_graphs_off_once(model, monkeypatch, caplog):
    """A stale replay (the first step's logits again: what a graph captured on the wrong device replays)
    is caught at its first replay: the eager logits are used, graphs go off for the model, one warning."""
    eager = _generate(model, EAGER, monkeypatch)

    def stale(self):
        return self.out.copy_(self.first)
    monkeypatch.setattr(StaticStep, "replay", stale)
    with caplog.at_level(logging.WARNING, logger="magnet"):
        codes = _generate(model, static(), monkeypatch)
        again = _generate(model, static(), monkeypatch)
    assert torch.equal(codes, eager) and torch.equal(again, eager)
    assert "differed from the eager forward" in graph_state(model.lm).off
    warnings = [r.getMessage() for r in caplog.records if "CUDA graphs are now off" in r.getMessage()]
    assert len(warnings) == 1 and "python -m magnet doctor" in warnings[0] and "MAGNET_CUDA_GRAPHS=0" in warnings[0]


def test_an_unchecked_replay_is_used_as_it_is(model, monkeypatch):
    """With the check off, the replay's output is what the loop gets (so the check above is what saved it)."""
    eager = _generate(model, EAGER, monkeypatch)
    monkeypatch.setattr(StaticStep, "replay", lambda self: self.out.copy_(self.first))
    assert not torch.equal(_generate(model, static(verify_graphs=False), monkeypatch), eager)


def test_a_failed_capture_falls_back_to_eager_without_losing_the_generation(model, monkeypatch, caplog):
    eager = _generate(model, EAGER, monkeypatch)
    real = StaticStep.__init__

    def failing(self, *a, **k):
        real(self, *a, **k)
        self.error = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
    monkeypatch.setattr(StaticStep, "__init__", failing)
    with caplog.at_level(logging.WARNING, logger="magnet"):
        codes = _generate(model, static(), monkeypatch)
    assert torch.equal(codes, eager)
    assert graph_state(model.lm).off == "capturing a CUDA graph failed: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert sum("CUDA graphs are now off" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("value,allowed", [(None, True), ("1", True), ("0", False), ("off", False),
                                           ("False", False), (" no ", False), ("yes", True)])
def test_the_environment_switch(monkeypatch, value, allowed):
    if value is None:
        monkeypatch.delenv("MAGNET_CUDA_GRAPHS", raising=False)
    else:
        monkeypatch.setenv("MAGNET_CUDA_GRAPHS", value)
    assert graphs_allowed_by_env() is allowed


def test_the_band_mask_is_made_once_per_length_dtype_and_device(model, monkeypatch):
    lm = model.lm
    lm._masks.clear()
    made = []
    real = transformer.additive_band_mask

    def spy(*a, **k):
        made.append(a)
        return real(*a, **k)
    monkeypatch.setattr(transformer, "additive_band_mask", spy)
    cond = model.encode_text(["x"])
    mem = lm.memory(cond.hidden, cond.mask)
    codes = torch.randint(0, lm.cfg.card, (1, lm.cfg.n_q, 37))
    with torch.inference_mode():
        for stage in (1, 2, 3, 1):
            lm(codes, mem, stage=stage)
        lm(codes[..., :20], mem, stage=1)
    assert [a[0] for a in made] == [37, 20]
    mask = lm.attn_mask(1, 37, "cpu")
    assert mask.dtype == torch.float32 and mask.stride(0) % 16 == 0
    band = transformer.band_mask(37, lm.cfg.subcodes_context, "cpu")
    assert torch.equal(mask == 0, band) and bool(torch.isneginf(mask[~band]).all())
    assert lm.attn_mask(0, 37, "cpu") is None
