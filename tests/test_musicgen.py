"""The autoregressive side: MusicGen parity, KV-cached decoding, the rescorer and hybrid generation."""
import shutil

import pytest
import torch
import yaml

from conftest import golden_prompts
from magnet import MagnetModel, MusicGenModel
from magnet.checkpoints import TEXT_PROJ_KEY
from magnet.errors import MagnetError
from magnet.musicgen import (ARParams, MusicGenRescorer, check_compatible, default_ar_seconds, delay_sequence,
                             generate_hybrid, teacher_forced_logits, undelay)
from magnet.sampling import SamplingParams, stage_schedule

STEPS = (4, 2, 2, 2)


@pytest.fixture(scope="module")
def musicgen(ref, music_model):
    """The MusicGen fixture, sharing the music MAGNeT's t5-base encoder."""
    return MusicGenModel.from_pretrained(ref / "musicgen", text_encoder=music_model.text_encoder, device="cpu")


@pytest.fixture(scope="module")
def golden_cond(musicgen, music_model, golden):
    return musicgen.encode_text(golden_prompts(music_model, golden, "music"))


# -- parity ---------------------------------------------------------------------------------------

def test_teacher_forced_logits_match_reference_at_valid_positions(musicgen, golden, golden_cond):
    logits, valid = musicgen.logits(golden["musicgen.scored_codes"], golden_cond)
    ref, ref_mask = golden["musicgen.pred_logits"], golden["musicgen.pred_mask"].bool()
    assert logits.shape == ref.shape
    assert torch.equal(valid.expand_as(ref_mask), ref_mask)
    err = (logits - ref)[ref_mask].abs().max().item()
    assert err <= 1e-4, f"max abs error {err}"
    assert torch.isnan(ref[~ref_mask]).all()


def test_greedy_generation_is_token_identical_to_reference(musicgen, golden, golden_cfg, golden_cond):
    n = golden_cfg["musicgen"]["max_gen_len"]
    params = ARParams(use_sampling=False, cfg_coef=golden_cfg["musicgen"]["cfg_coef"])
    codes = musicgen.generate_from_condition(golden_cond, frames=n, params=params)
    assert torch.equal(codes, golden["musicgen.greedy_40"]), f"{(codes != golden['musicgen.greedy_40']).sum()} differ"
    # the public API, by duration and by frame count, gives the same
    via_api = musicgen.generate(golden_cond.prompts, max_frames=n, use_sampling=False)
    assert torch.equal(via_api, codes)
    assert torch.equal(musicgen.generate(golden_cond.prompts, duration=n / 50, use_sampling=False), codes)


def test_continuing_a_greedy_prefix_reproduces_the_greedy_golden(musicgen, golden, golden_cond):
    """The prompt comes back unchanged and the continuation is the one the reference produced."""
    ref = golden["musicgen.greedy_40"]
    codes = musicgen.generate_from_condition(golden_cond, frames=40, params=ARParams(use_sampling=False),
                                             prompt=ref[..., :13])
    assert torch.equal(codes, ref)


# -- the decoding loop ------------------------------------------------------------------------------

def test_delay_pattern_round_trips_and_shifts_each_codebook():
    codes = torch.arange(2 * 4 * 6).view(2, 4, 6)
    seq = delay_sequence(codes, [0, 1, 2, 3], special=-1)
    assert seq.shape == (2, 4, 10)
    assert seq[0, :, 0].tolist() == [-1] * 4                     # the leading special step
    assert seq[0, 2, :3].tolist() == [-1, -1, -1] and seq[0, 2, 3] == codes[0, 2, 0]
    assert torch.equal(undelay(seq, [0, 1, 2, 3], 6), codes)


def test_cached_decoding_equals_teacher_forcing_of_its_own_output(musicgen, golden_cond):
    """Greedy tokens are the argmax of the guided teacher-forced logits of the finished sequence:
    the key/value cache computes exactly what a full causal forward computes."""
    codes = musicgen.generate_from_condition(golden_cond, frames=60, params=ARParams(use_sampling=False))
    logits, _ = musicgen.logits(codes, golden_cond)
    B = golden_cond.batch
    guided = logits[B:] + (logits[:B] - logits[B:]) * 3.0
    assert torch.equal(guided.argmax(-1), codes)


def test_each_decoding_step_feeds_one_new_frame_to_the_cache(musicgen, golden_cond, monkeypatch):
    """The cost of a step does not grow with the length so far: one layout step per forward, the
    earlier ones come from the preallocated key/value cache."""
    lm = musicgen.lm
    fed, cached = [], []
    real = lm.forward

    def spy(codes, mem, *a, cache=None, **k):
        fed.append(codes.shape[-1])
        cached.append(cache.length)
        assert cache.k[0].shape[2] == 30 + 3             # allocated once, for every step
        return real(codes, mem, *a, cache=cache, **k)
    monkeypatch.setattr(lm, "forward", spy)
    musicgen.generate_from_condition(golden_cond, frames=30, params=ARParams(use_sampling=False))
    assert fed == [1] * 33
    assert cached == list(range(33))


def test_prompt_prefill_is_one_forward_then_one_frame_per_step(musicgen, golden_cond, monkeypatch):
    lm = musicgen.lm
    fed = []
    real = lm.forward
    monkeypatch.setattr(lm, "forward", lambda c, m, *a, **k: fed.append(c.shape[-1]) or real(c, m, *a, **k))
    prompt = torch.randint(0, 64, (2, 4, 10))
    codes = musicgen.generate_from_condition(golden_cond, frames=20, params=ARParams(), seed=0, prompt=prompt)
    assert fed == [11] + [1] * 12
    assert torch.equal(codes[..., :10], prompt)


def test_same_seed_same_codes_different_seed_different_codes(musicgen):
    a = musicgen.generate(["dub techno"], max_frames=30, seed=5)
    b = musicgen.generate(["dub techno"], max_frames=30, seed=5)
    c = musicgen.generate(["dub techno"], max_frames=30, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert musicgen.last_seed == 6
    assert a.shape == (1, 4, 30) and int(a.min()) >= 0 and int(a.max()) < musicgen.cfg.card


def test_temperature_zero_is_greedy_and_top_k_one_is_greedy(musicgen):
    greedy = musicgen.generate(["x"], max_frames=20, use_sampling=False)
    assert torch.equal(musicgen.generate(["x"], max_frames=20, temperature=0.0, seed=1), greedy)
    assert torch.equal(musicgen.generate(["x"], max_frames=20, top_k=1, seed=2), greedy)
    assert torch.equal(musicgen.generate(["x"], max_frames=20, top_p=1e-6, seed=3), greedy)


def test_empty_prompt_generates_unconditionally(musicgen):
    codes = musicgen.generate(["", "rain"], max_frames=10, seed=0)
    assert codes.shape == (2, 4, 10)


def test_progress_is_called_once_per_decoding_step(musicgen):
    calls = []
    musicgen.generate(["x"], max_frames=12, seed=0, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 15) for i in range(1, 16)]


@pytest.mark.parametrize("kw,needle", [
    ({"duration": 100.0}, "window"),
    ({"max_frames": 101}, "window"),
    ({"duration": 1.0, "max_frames": 10}, "not both"),
    ({"duration": 0}, "more than 0"),
    ({"max_frames": 2.5}, "whole number"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 2.0}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"cfg_coef": float("nan")}, "cfg_coef"),
    ({"top_k": "many"}, "must be a number"),
    ({"max_frames": 10, "prompt": torch.zeros(1, 4, 10, dtype=torch.long)}, "shorter prompt"),
    ({"max_frames": 10, "prompt": torch.full((1, 4, 3), 64)}, "different codec"),
    ({"max_frames": 10, "prompt": torch.zeros(1, 3, 3, dtype=torch.long)}, "expected"),
])
def test_bad_generation_parameters_are_clear_errors(musicgen, kw, needle):
    with pytest.raises(MagnetError, match=needle):
        musicgen.generate(["x"], **kw)


def test_magnet_release_is_refused_with_the_fix(ref):
    with pytest.raises(MagnetError, match="MagnetModel.from_pretrained"):
        MusicGenModel.from_pretrained(ref / "magnet-music", text_encoder=ref / "t5-base", device="cpu")


# -- rescoring --------------------------------------------------------------------------------------

def _params():
    return SamplingParams(decoding_steps=STEPS, span_arrangement="nonoverlap", span_scoring="max")


def test_rescorer_weight_zero_gives_exactly_the_unrescored_codes(music_model, musicgen):
    cond = music_model.encode_text(["dub techno", "piano"])
    plain = music_model.generate_from_condition(cond, frames=60, params=_params(), seed=11)
    zero = music_model.generate_from_condition(cond, frames=60, params=_params(), seed=11,
                                               rescorer=MusicGenRescorer(musicgen, weight=0.0))
    assert torch.equal(plain.codes, zero.codes)


def _remasked_at_second_step(music_model, cond, rescorer, monkeypatch):
    """The codes MAGNeT's LM receives at stage 0, step 1 (after the first re-masking)."""
    lm = music_model.lm
    inputs = []
    real = lm.forward
    monkeypatch.setattr(lm, "forward", lambda c, *a, **k: inputs.append(c[:, 0].clone()) or real(c, *a, **k))
    codes = music_model.generate_from_condition(cond, frames=60, params=_params(), seed=3, rescorer=rescorer).codes
    monkeypatch.setattr(lm, "forward", real)
    return inputs[1] == lm.mask_id, codes


def test_rescorer_decides_which_spans_are_remasked(music_model, musicgen, monkeypatch):
    """With w = 1 the spans re-masked after the first step are exactly the k spans MusicGen finds least
    likely (1 - max p over the span), and they differ from MAGNeT's own choice (w = 0)."""
    cond = music_model.encode_text(["80s thrash metal intro riff", "lovely piano sonata"])
    seen = []

    class Spy(MusicGenRescorer):
        def probs(self, codes, stage):
            p = super().probs(codes, stage)
            seen.append((codes.clone(), stage, p))
            return p

    base_mask, _ = _remasked_at_second_step(music_model, cond, None, monkeypatch)
    mask, _ = _remasked_at_second_step(music_model, cond, Spy(musicgen, weight=1.0), monkeypatch)
    _, stage, p_ext = seen[0]
    assert stage == 0 and p_ext.shape == (2, 60)
    B, L = 2, music_model.cfg.span_len
    k = stage_schedule(STEPS[0], 60 // L)[1][1]
    worst = (1 - p_ext.view(B, -1, L).max(-1).values).topk(k, dim=-1).indices
    want = torch.zeros(B, 60 // L, dtype=torch.bool).scatter(1, worst, True).repeat_interleave(L, dim=-1)
    assert torch.equal(mask, want)
    assert not torch.equal(mask, base_mask)


def test_rescorer_probabilities_are_musicgen_teacher_forced_probabilities(musicgen, golden_cond, golden):
    """For the last stage nothing is masked: p equals the guided teacher-forced probability of each token.
    For stage 0 the higher codebooks are the mask id, which MusicGen reads as its special token."""
    codes = golden["musicgen.scored_codes"]
    r = MusicGenRescorer(musicgen, weight=0.5)
    r.begin(golden_cond, codes.shape[-1])
    logits, _ = musicgen.logits(codes, golden_cond)
    B = golden_cond.batch
    guided = torch.softmax(logits[B:] + (logits[:B] - logits[B:]) * 3.0, dim=-1)
    want = torch.gather(guided[:, 3], -1, codes[:, 3, :, None])[..., 0]
    torch.testing.assert_close(r.probs(codes, 3), want, atol=1e-6, rtol=0)
    staged = codes.clone()
    staged[:, 1:] = musicgen.special_id
    p0 = r.probs(staged, 0)
    assert p0.shape == (B, 50) and bool(((p0 > 0) & (p0 <= 1)).all())
    assert not torch.allclose(p0, r.probs(codes, 0))     # the hidden codebooks are really unseen


def test_rescorer_reuses_the_magnet_text_encoding(music_model, musicgen):
    """A MusicGen without its own text encoder rescores from MAGNeT's T5 hidden states."""
    bare = MusicGenModel(musicgen.lm, musicgen.codec, None, source="bare")
    cond = music_model.encode_text(["x"])
    a = music_model.generate_from_condition(cond, frames=30, params=_params(), seed=1,
                                            rescorer=MusicGenRescorer(bare, weight=0.7))
    b = music_model.generate_from_condition(cond, frames=30, params=_params(), seed=1,
                                            rescorer=MusicGenRescorer(musicgen, weight=0.7))
    assert torch.equal(a.codes, b.codes)


@pytest.mark.parametrize("kw,needle", [({"weight": 1.5}, "between 0"), ({"weight": "a"}, "number"),
                                       ({"temperature": 0.0}, "temperature")])
def test_bad_rescorer_settings_are_clear_errors(musicgen, kw, needle):
    with pytest.raises(MagnetError, match=needle):
        MusicGenRescorer(musicgen, **kw)


def test_rescoring_beyond_the_musicgen_window_is_a_clear_error(musicgen, golden_cond):
    with pytest.raises(MagnetError, match="window"):
        MusicGenRescorer(musicgen).begin(golden_cond, 500)


# -- hybrid ---------------------------------------------------------------------------------------

def test_hybrid_keeps_the_ar_seconds_unchanged(music_model, musicgen):
    prompts = ["dub techno", "lovely piano sonata"]
    ar = musicgen.generate(prompts, max_frames=25 + 3, use_sampling=False)[..., :25]
    codes = generate_hybrid(music_model, musicgen, prompts, duration=1.5, ar_seconds=0.5, seed=4,
                            params=_params(), ar_params=ARParams(use_sampling=False))
    assert codes.shape == (2, 4, 75)
    assert torch.equal(codes[..., :25], ar)


def test_hybrid_audio_is_continuous_at_the_seam(music_model, musicgen):
    codes = generate_hybrid(music_model, musicgen, ["dub techno"], duration=2.0, ar_seconds=0.6, seed=2,
                            params=_params())
    wav = music_model.decode(codes)[0, 0]
    hop = music_model.sample_rate // music_model.frame_rate
    seam = 30 * hop
    jumps = (wav[1:] - wav[:-1]).abs()
    at_seam = jumps[seam - 1].item()
    rest = torch.cat([jumps[:seam - 1], jumps[seam:]]).max().item()
    assert at_seam <= rest


def test_hybrid_progress_covers_both_models(music_model, musicgen):
    calls = []
    generate_hybrid(music_model, musicgen, ["x"], duration=1.0, ar_seconds=0.2, seed=0, params=_params(),
                    progress=lambda d, t: calls.append((d, t)))
    total = (10 + 3 + 3) + sum(STEPS)
    assert calls == [(i, total) for i in range(1, total + 1)]


def test_default_ar_prompt_is_three_seconds_at_most_thirty_percent():
    assert default_ar_seconds(10.0) == 3.0 and default_ar_seconds(30.0) == 3.0
    assert default_ar_seconds(2.0) == pytest.approx(0.6)


def test_hybrid_with_default_ar_seconds_and_rescoring(music_model, musicgen):
    codes = generate_hybrid(music_model, musicgen, ["x"], duration=1.0, seed=0, params=_params(),
                            rescorer=MusicGenRescorer(musicgen, weight=0.5))
    ar = musicgen.generate(["x"], max_frames=15 + 3, seed=0)[..., :15]
    assert torch.equal(codes[..., :15], ar)


@pytest.mark.parametrize("ar_seconds,needle", [(1.0, "leaves nothing"), (0.001, "shorter than one frame"),
                                                ("x", "number")])
def test_bad_ar_seconds_are_clear_errors(music_model, musicgen, ar_seconds, needle):
    with pytest.raises(MagnetError, match=needle):
        generate_hybrid(music_model, musicgen, ["x"], duration=1.0, ar_seconds=ar_seconds, params=_params())


# -- compatibility ----------------------------------------------------------------------------------

def test_musicgen_with_another_codec_is_refused_naming_both(ref, tmp_path, music_model, audio_model):
    rel = tmp_path / "musicgen-16k"
    rel.mkdir()
    shutil.copy(ref / "musicgen" / "state_dict.bin", rel)
    shutil.copy(ref / "magnet-audio" / "compression_state_dict.bin", rel)   # the 16 kHz codec
    with pytest.raises(MagnetError, match="16000 Hz.*32000 Hz"):          # its own xp.cfg says 32 kHz
        MusicGenModel.from_pretrained(rel, text_encoder=music_model.text_encoder, device="cpu")
    other = MusicGenModel.from_pretrained(ref / "musicgen", text_encoder=music_model.text_encoder, device="cpu")
    other.codec, other.source = audio_model.codec, str(rel)                  # as if it had loaded
    for call in (lambda: check_compatible(music_model, other),
                 lambda: generate_hybrid(music_model, other, ["x"], duration=1.0, ar_seconds=0.2),
                 lambda: MusicGenRescorer(other, magnet=music_model)):
        with pytest.raises(MagnetError, match="codec mismatch") as e:
            call()
        assert "magnet-music" in str(e.value) and "musicgen-16k" in str(e.value)
        assert "32000" in str(e.value) and "16000" in str(e.value)


def test_codec_with_other_codebooks_is_refused(ref, tmp_path, musicgen):
    """Same shapes, different codebook vectors (the pointer fixture's codec): tokens would not match."""
    rel = tmp_path / "magnet-pointer"
    rel.mkdir()
    shutil.copy(ref / "magnet-music" / "state_dict.bin", rel)
    shutil.copy(ref / "pointer" / "compression_state_dict.bin", rel)
    magnet = MagnetModel.from_pretrained(rel, text_encoder=musicgen.text_encoder, device="cpu",
                                         codec=ref / "encodec_32khz")
    with pytest.raises(MagnetError, match="different codebooks"):
        check_compatible(magnet, musicgen)


def test_musicgen_with_another_text_encoder_is_refused_naming_both(ref, tmp_path, music_model, musicgen):
    rel = tmp_path / "musicgen-t5large"
    rel.mkdir()
    shutil.copy(ref / "musicgen" / "compression_state_dict.bin", rel)
    pkg = torch.load(ref / "musicgen" / "state_dict.bin", weights_only=True)
    xp = yaml.safe_load(pkg["xp.cfg"])
    xp["conditioners"]["description"]["t5"]["name"] = "t5-large"
    w = pkg["best_state"][TEXT_PROJ_KEY + "weight"]
    pkg["best_state"][TEXT_PROJ_KEY + "weight"] = torch.randn(w.shape[0], 1024) * 0.02
    pkg["xp.cfg"] = yaml.safe_dump(xp)
    torch.save(pkg, rel / "state_dict.bin")
    other = MusicGenModel.from_pretrained(rel, text_encoder=ref / "t5-large", device="cpu")
    with pytest.raises(MagnetError, match="text encoder mismatch") as e:
        check_compatible(music_model, other)
    msg = str(e.value)
    assert "magnet-music" in msg and "musicgen-t5large" in msg and "t5-base" in msg and "t5-large" in msg
    # the rescorer refuses a conditioning of the wrong width too
    with pytest.raises(MagnetError, match="t5-large"):
        MusicGenRescorer(other).begin(music_model.encode_text(["x"]), 30)


def test_teacher_forced_scoring_of_one_codebook_equals_all_heads(musicgen, golden, golden_cond):
    lm = musicgen.lm
    codes = golden["musicgen.scored_codes"]
    with torch.inference_mode():
        mem = lm.memory(golden_cond.hidden, golden_cond.mask, null_rows=2)
        full = teacher_forced_logits(lm, codes, mem)
        two = teacher_forced_logits(lm, codes, mem, heads=[2])
    torch.testing.assert_close(two[:, 0], full[:, 2], atol=1e-6, rtol=0)
