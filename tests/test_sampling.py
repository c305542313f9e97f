"""The decoding loop's behaviour: seeds, schedules, top-k / top-p, span masking, progress."""
import math

import pytest
import torch

from magnet.errors import MagnetError
from magnet.sampling import (SamplingParams, least_probable_spans, sample_tokens, stage_schedule)

STEPS = (4, 2, 2, 2)


def test_same_seed_same_codes_different_seed_different_codes(music_model):
    kw = dict(decoding_steps=STEPS, duration=1.0)
    a = music_model.generate(["dub techno"], seed=7, **kw)
    b = music_model.generate(["dub techno"], seed=7, **kw)
    c = music_model.generate(["dub techno"], seed=8, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert music_model.last_seed == 8


def test_unseeded_generation_reports_its_seed_and_replays(music_model):
    a = music_model.generate(["x"], decoding_steps=STEPS, duration=1.0)
    seed = music_model.last_seed
    assert isinstance(seed, int)
    assert torch.equal(a, music_model.generate(["x"], decoding_steps=STEPS, duration=1.0, seed=seed))


def test_empty_prompt_generates_unconditionally(music_model):
    codes = music_model.generate(["", "rain on a tin roof"], seed=1, decoding_steps=STEPS, duration=1.0)
    assert codes.shape[0] == 2 and int(codes.max()) < music_model.cfg.card and int(codes.min()) >= 0
    alone = music_model.generate([""], seed=1, decoding_steps=STEPS, duration=1.0, use_sampling=False)
    assert alone.shape[0] == 1


def test_progress_is_called_once_per_step(music_model):
    calls = []
    music_model.generate(["x"], seed=0, decoding_steps=(3, 1, 2, 1), duration=0.5,
                         progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 7) for i in range(1, 8)]


def test_output_length_follows_duration_and_span_trimming(music_model):
    fr = music_model.frame_rate
    for seconds in (0.5, 1.0, 1.3, music_model.segment_duration):
        T = int(seconds * fr)
        codes = music_model.generate(["x"], seed=0, decoding_steps=STEPS, duration=seconds)
        assert codes.shape == (1, 4, T - T % 3)
        codes = music_model.generate(["x"], seed=0, decoding_steps=STEPS, duration=seconds, span_arrangement="stride1")
        assert codes.shape == (1, 4, T)


def test_schedule_masks_everything_first_and_at_least_one_last():
    sched = stage_schedule(6, 33)
    assert sched[0] == (1.0, 33)
    rates = [m for m, _ in sched]
    counts = [k for _, k in sched]
    assert rates == sorted(rates, reverse=True) and abs(rates[-1]) < 1e-6
    assert counts == sorted(counts, reverse=True) and counts[-1] == 1
    assert counts[2] == int(math.cos(math.pi / 2 * 0.4) * 33)


def test_temperature_anneals_linearly_to_the_floor(music_model, monkeypatch):
    """At step i of n the logits are divided by max(temp * (n-1-i)/n, 0.01)."""
    import magnet.sampling as s
    seen = []
    real_softmax = torch.softmax

    def spy(x, dim):
        seen.append(x)
        return real_softmax(x, dim=dim)

    lm = music_model.lm
    cond = music_model.encode_text(["x"])
    logits = []
    real_forward = lm.forward

    def fwd(*a, **k):
        out = real_forward(*a, **k)
        logits.append(out)
        return out
    monkeypatch.setattr(lm, "forward", fwd)
    monkeypatch.setattr(s.torch, "softmax", spy)
    params = SamplingParams(use_sampling=False, temperature=2.0, max_cfg_coef=1.0, min_cfg_coef=1.0,
                            decoding_steps=(4, 1, 1, 1))
    from magnet.stage_forward import DecodingSettings
    s.generate(lm, cond, 30, params, decoding=DecodingSettings(prune_on_cpu=False))  # logits of every position
    n = 4
    for i in range(n):
        # cfg coef 1 -> guided logits == conditional logits
        cond_logits = logits[i][:1, 0].float()
        want = cond_logits / max(2.0 * (n - 1 - i) / n, 1e-2)
        torch.testing.assert_close(seen[i], want, atol=1e-5, rtol=1e-5)


def _dist(probs, params, n=6000, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = probs.expand(n, -1).clone()
    tok, _ = sample_tokens(torch.log(p), p, params, g)
    return torch.bincount(tok.flatten(), minlength=probs.shape[-1]).float() / n


def test_top_k_samples_only_the_k_most_likely_in_proportion():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    freq = _dist(probs, SamplingParams(top_k=2, top_p=0.0))
    assert freq[[0, 2, 4]].sum() == 0
    assert abs(freq[1] - 0.4 / 0.7) < 0.03 and abs(freq[3] - 0.3 / 0.7) < 0.03


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    # cumulative mass before each sorted token: 0, .4, .7, .85 -> with p=0.6 keep {0.4, 0.3}
    freq = _dist(probs, SamplingParams(top_p=0.6))
    assert freq[[0, 2, 4]].sum() == 0
    assert abs(freq[1] - 0.4 / 0.7) < 0.03
    # p=0.8 also keeps 0.15
    freq = _dist(probs, SamplingParams(top_p=0.8))
    assert freq[[0, 2]].sum() == 0 and freq[4] > 0.1


def test_plain_multinomial_follows_the_distribution():
    probs = torch.tensor([[0.1, 0.2, 0.7]])
    freq = _dist(probs, SamplingParams(top_p=0.0, top_k=0), n=20000)
    torch.testing.assert_close(freq, probs[0], atol=0.015, rtol=0)


def test_greedy_takes_the_argmax():
    logits = torch.tensor([[[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]]])
    tok, _ = sample_tokens(logits, torch.softmax(logits, -1), SamplingParams(use_sampling=False), None)
    assert tok[..., 0].tolist() == [[1, 0]]


def _lps_loop(scores, n_target, L):
    """The reference's per-item binary search, written plainly, for comparison."""
    T = scores.shape[-1]
    span_scores = scores.unfold(0, L, 1).sum(-1)
    order = torch.argsort(span_scores, descending=True, stable=True)

    def mask_of(u):
        m = torch.zeros(T, dtype=torch.bool)
        for s in order[:u].tolist():
            m[s:s + L] = True
        return m
    n_target = max(n_target, L)
    lo, hi = n_target // L, n_target - L + 1
    mid = round(0.5 * (lo + hi))
    if mid in (lo, hi):
        return mask_of(mid)
    while lo < mid < hi:
        m = mask_of(mid)
        if m.sum() > n_target:
            hi = mid
        else:
            lo = mid
        mid = round(0.5 * (lo + hi))
    return m


@pytest.mark.parametrize("L", [2, 3, 4])
def test_stride1_vectorised_masking_matches_the_per_item_search(L):
    g = torch.Generator().manual_seed(L)
    for T in (12, 31, 100):
        scores = torch.rand(5, T, generator=g)
        scores[1, :7] = -1e4               # some positions not to re-mask
        for n in (1, 3, T // 3, T // 2, T - 1, T):
            got = least_probable_spans(scores, n, L)
            for b in range(5):
                assert torch.equal(got[b], _lps_loop(scores[b], n, L)), (T, n, b)


def test_nonoverlap_masks_whole_spans_and_keeps_the_prompt(music_model):
    """Prompt frames come back unchanged, including a partial span at the prompt's end."""
    wav = torch.randn(1, 1, music_model.sample_rate // 2) * 0.1
    prompt = music_model.encode(wav, music_model.sample_rate)[..., :13]
    codes = music_model.generate(["x", "y"], seed=3, decoding_steps=STEPS, duration=1.0, prompt=prompt)
    assert torch.equal(codes[..., :13], prompt.expand(2, -1, -1))


@pytest.mark.parametrize("kw,needle", [
    ({"decoding_steps": (0, 10, 10, 10)}, "at least 1"),
    ({"decoding_steps": (-2, 10, 10, 10)}, "at least 1"),
    ({"decoding_steps": (20, 10, 10)}, "one step count per codebook"),
    ({"decoding_steps": "a,b"}, "whole numbers"),
    ({"span_arrangement": "diagonal"}, "nonoverlap, stride1"),
    ({"span_scoring": "mean"}, "max, prod"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"temperature": -1.0}, "temperature"),
    ({"duration": 0}, "more than 0"),
    ({"duration": 1000.0, "overlap": 5.0}, "window"),
])
def test_bad_generation_parameters_are_clear_errors(music_model, kw, needle):
    with pytest.raises(MagnetError, match=needle):
        music_model.generate(["x"], **kw)


def test_prompt_longer_than_duration_is_a_clear_error(music_model):
    prompt = torch.zeros(1, 4, 60, dtype=torch.long)
    with pytest.raises(MagnetError, match="shorter prompt"):
        music_model.generate(["x"], duration=1.0, prompt=prompt, decoding_steps=STEPS)


def test_sampling_params_are_validated_once_and_again_after_a_change(music_model, monkeypatch):
    """The node path (node -> model -> window loop -> decoding loop) validates the parameters once: a
    checked object passes the inner layers as it is; a changed copy or field is checked again."""
    from dataclasses import replace

    from magnet import sampling
    calls = []
    original = sampling.replace           # a full check ends in replace(self, ...) with the normalised values
    monkeypatch.setattr(sampling, "replace", lambda obj, **kw: calls.append(type(obj).__name__) or original(obj, **kw))
    p = sampling.SamplingParams(decoding_steps="auto").check(4, music_model.generation_defaults)
    assert calls.count("SamplingParams") == 1
    assert p.check(4) is p
    music_model.generate_from_condition(music_model.encode_text(["x"]), frames=30, params=p, seed=0)
    assert calls.count("SamplingParams") == 1          # not validated again inside
    with pytest.raises(MagnetError):
        replace(p, temperature=float("nan")).check(4)
    p.top_p = 7.0
    with pytest.raises(MagnetError):
        p.check(4)
