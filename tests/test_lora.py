"""LoRA files and applying them: strength 0 is the base bit for bit, the base never changes, LoRAs stack, the
merged weights give what the factored layer computes, and every bad file or strength is refused clearly."""
from __future__ import annotations

import json
import math

import pytest
import torch

from magnet import lora as L
from magnet.errors import MagnetError
from magnet.sampling import SamplingParams


def _random_lora(model, path, rank=4, alpha=8.0, targets=L.DEFAULT_TARGETS, seed=0, scale=0.05):
    """A LoRA file for `model` with random factors (both nonzero), as training would write it."""
    g = torch.Generator().manual_seed(seed)
    _, adapters = L.attach(model.lm, targets, rank, alpha, generator=g)
    with torch.no_grad():
        for layer in adapters.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)
    meta = L.lora_meta(model, rank=rank, alpha=alpha, targets=targets, training={"lr": 1e-4}, trigger="zqx",
                       clips=1, steps=3, train_loss=1.5)
    return L.save_lora(path, L.adapter_tensors(adapters), meta), adapters


def _state(model):
    return {k: v.clone() for k, v in model.lm.state_dict().items()}


def _logits(model, prompts=("a warm pad",), T=24, stage=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    lm = model.lm
    codes = torch.randint(0, lm.cfg.card, (len(prompts), lm.cfg.n_q, T), generator=g)
    cond = model.encode_text(list(prompts))
    mem = lm.memory(cond.hidden[: len(prompts)], cond.mask[: len(prompts)])
    with torch.no_grad():
        return lm(codes, mem, stage)


def test_file_round_trip_keeps_tensors_names_and_metadata(music_model, tmp_path):
    path, adapters = _random_lora(music_model, tmp_path / "a.safetensors")
    lw = L.load_lora(path)
    assert lw.rank == 4 and lw.alpha == 8.0 and lw.scale == 2.0
    assert lw.fingerprint == L.fingerprint(music_model)
    assert lw.meta["trigger"] == "zqx" and lw.meta["release"] == "magnet-music" and lw.meta["magnet_lora"] == "1"
    params = dict(music_model.lm.named_parameters())
    pairs = lw.pairs()
    assert set(pairs) == {f"{n}.weight" for n in adapters}
    assert "transformer.layers.0.self_attn.in_proj.weight" in pairs
    for name, (a, b) in pairs.items():
        assert name in params and tuple(params[name].shape) == (b.shape[0], a.shape[1])
    assert json.loads(lw.meta["targets"]) == list(L.DEFAULT_TARGETS)
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*partial"))


def test_strength_zero_is_bit_identical_to_the_base(music_model, tmp_path):
    path, _ = _random_lora(music_model, tmp_path / "a.safetensors")
    zero = music_model.with_lora(path, strength=0.0)
    assert zero is not music_model and zero.lm is not music_model.lm
    for (n, a), (_, b) in zip(music_model.lm.state_dict().items(), zero.lm.state_dict().items()):
        assert torch.equal(a, b), n
    p = SamplingParams(use_sampling=False, decoding_steps=[3, 2, 2, 2])
    base = music_model.generate(["a warm pad"], duration=1.0, params=p, seed=1)
    same = zero.generate(["a warm pad"], duration=1.0, params=p, seed=1)
    assert torch.equal(base, same)


def test_base_is_bit_identical_before_and_after_with_lora_and_loras_stack(music_model, tmp_path):
    before = _state(music_model)
    logits_before = _logits(music_model)
    p1, _ = _random_lora(music_model, tmp_path / "a.safetensors", seed=1)
    p2, _ = _random_lora(music_model, tmp_path / "b.safetensors", seed=2, targets=("linear1", "linear2"))
    one = music_model.with_lora(p1)
    two = one.with_lora(p2, strength=0.5)
    for k, v in music_model.lm.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(_logits(music_model), logits_before)
    l1, l2 = _logits(one), _logits(two)
    assert not torch.equal(l1, logits_before) and not torch.equal(l2, l1)
    # stacking = adding both deltas; unadapted weights are the base's own tensors (shared, not copied)
    w = "transformer.layers.0.linear1.weight"
    d1 = L.load_lora(p1).deltas(1.0)[w]
    d2 = L.load_lora(p2).deltas(0.5)[w]
    got = dict(two.lm.named_parameters())[w]
    torch.testing.assert_close(got, before[w] + d1 + d2, rtol=0, atol=1e-6)
    shared = "transformer.layers.0.norm1.weight"
    assert dict(two.lm.named_parameters())[shared].data_ptr() == dict(music_model.lm.named_parameters())[shared].data_ptr()
    assert two.loras == [("a.safetensors", 1.0), ("b.safetensors", 0.5)]


def test_merged_weights_give_the_logits_of_the_trainable_layers(music_model, tmp_path):
    path, adapters = _random_lora(music_model, tmp_path / "a.safetensors", seed=3)
    g = torch.Generator().manual_seed(3)
    train_lm, fresh = L.attach(music_model.lm, L.DEFAULT_TARGETS, 4, 8.0, generator=g)
    L.load_into(fresh, L.load_lora(path))
    merged = music_model.with_lora(path)
    g = torch.Generator().manual_seed(0)
    lm = music_model.lm
    codes = torch.randint(0, lm.cfg.card, (1, lm.cfg.n_q, 20), generator=g)
    cond = music_model.encode_text(["a warm pad"])
    for stage in (0, 2):
        with torch.no_grad():
            a = merged.lm(codes, merged.lm.memory(cond.hidden[:1], cond.mask[:1]), stage)
            b = train_lm(codes, train_lm.memory(cond.hidden[:1], cond.mask[:1]), stage)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_lora_for_another_architecture_names_both(music_model, tmp_path, ref):
    from conftest import make_release
    from magnet import MagnetModel
    folder = make_release(ref / "magnet-music", tmp_path / "other", dim=96, num_heads=6, num_layers=3)
    other = MagnetModel.from_pretrained(folder, text_encoder=ref / "t5-base", device="cpu")
    path, _ = _random_lora(other, tmp_path / "other.safetensors")
    with pytest.raises(MagnetError) as e:
        music_model.with_lora(path)
    msg = str(e.value)
    assert "dim 96, 3 layers, 6 heads" in msg and f"dim {music_model.cfg.dim}, {music_model.cfg.num_layers} layers" in msg
    assert "other" in msg and "trained on this model" in msg


def _rewrite(path, out, tensors=None, meta=None):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        m = dict(f.metadata())
    t = load_file(str(path))
    if tensors:
        tensors(t)
    if meta:
        meta(m)
    save_file(t, str(out), metadata=m)
    return out


@pytest.mark.parametrize("bad,match", [
    ("nan", "NaN or infinite"),
    ("inf", "NaN or infinite"),
    ("no_meta", "not a MAGNeT LoRA"),
    ("rank", "not \\[rank"),
    ("missing_b", "lora_B"),
    ("fingerprint", "metadata is incomplete"),
    ("not_safetensors", "not a readable"),
    ("missing", "not found"),
])
def test_bad_lora_files_are_refused_naming_the_file(music_model, tmp_path, bad, match):
    good, _ = _random_lora(music_model, tmp_path / "good.safetensors")
    out = tmp_path / f"{bad}.safetensors"
    first = "transformer.layers.0.linear1.lora_B.weight"
    if bad == "nan":
        _rewrite(good, out, tensors=lambda t: t[first].__setitem__((0, 0), float("nan")))
    elif bad == "inf":
        _rewrite(good, out, tensors=lambda t: t[first].__setitem__((0, 0), float("inf")))
    elif bad == "no_meta":
        from safetensors.torch import load_file, save_file
        save_file(load_file(str(good)), str(out), metadata={"format": "pt"})
    elif bad == "rank":
        _rewrite(good, out, meta=lambda m: m.__setitem__("rank", "8"))
    elif bad == "missing_b":
        _rewrite(good, out, tensors=lambda t: t.pop(first))
    elif bad == "fingerprint":
        _rewrite(good, out, meta=lambda m: m.__setitem__("fingerprint", "{not json"))
    elif bad == "not_safetensors":
        out.write_bytes(b"\x00" * 64)
    with pytest.raises(MagnetError, match=match) as e:
        music_model.with_lora(out)
    assert out.name in str(e.value)


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), -math.inf, "strong", None, True])
def test_non_finite_or_non_numeric_strength_is_refused(music_model, tmp_path, strength):
    path, _ = _random_lora(music_model, tmp_path / "a.safetensors")
    with pytest.raises(MagnetError, match="strength"):
        music_model.with_lora(path, strength=strength)
    assert L.check_strength("0.5") == 0.5


def test_unknown_targets_are_refused_with_the_choices(music_model):
    with pytest.raises(MagnetError, match="linear1"):
        L.attach(music_model.lm, ["q_proj"], 4, 4.0)
