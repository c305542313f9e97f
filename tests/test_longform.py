"""Beyond one window: any length (sliding window), region regeneration, exact lengths for a video.

The reference fixtures' window is 2 s (100 frames; 99 usable with the nonoverlap arrangement), so a
few seconds already span several windows."""
import pytest
import torch

import magnet.sampling as sampling_mod
from conftest import Spy, frame_jumps, seam_ranks
from magnet import longform
from magnet.audio import fit_length, seconds_to_samples
from magnet.errors import MagnetError
from magnet.sampling import SpanArrangement

STEPS = (3, 2, 2, 2)




def _count_forwards(monkeypatch, lm):
    n = [0]
    real = lm.forward

    def fwd(*a, **k):
        n[0] += 1
        return real(*a, **k)
    monkeypatch.setattr(lm, "forward", fwd)
    return n


# --- window plans ------------------------------------------------------------------------------

@pytest.mark.parametrize("window,overlap", [(99, 49), (100, 0), (99, 96), (12, 5)])
def test_window_plan_covers_the_length_exactly_with_the_overlap_as_context(window, overlap):
    for total in range(1, 7 * window):
        for prompt in sorted({0, 1, window // 2, window - 1, window + 3, total - 1}):
            if not 0 <= prompt < total:
                continue
            plan = longform.plan_windows(total, window, overlap, prompt)
            assert plan[-1].end == total
            done = prompt
            for i, w in enumerate(plan):
                assert 0 <= w.start and w.frames <= window and w.new > 0
                assert w.start + w.context == done                 # continues exactly where the last ended
                if i > 0 or prompt >= window:
                    assert w.context >= overlap
                if total >= window:
                    assert w.frames == window                       # every window full: nothing trimmed
                done = w.end
            if prompt < window:
                assert plan[0].start == 0 and plan[0].context == prompt


# --- any length ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arrangement", ["nonoverlap", "stride1"])
def test_lengths_are_exact_below_at_and_several_times_beyond_the_window(music_model, arrangement):
    m = music_model
    fr, window = m.frame_rate, m.segment_duration
    for seconds in (0.5, window, window + 0.02, 3.65 * window):
        codes = m.generate(["x"], seed=0, decoding_steps=STEPS, duration=seconds, span_arrangement=arrangement)
        frames = int(seconds * fr)
        if frames <= m.max_frames and arrangement == "nonoverlap":
            frames -= frames % m.cfg.span_len                       # one window: the reference's trimming
        assert codes.shape == (1, 4, frames), seconds
        assert 0 <= int(codes.min()) and int(codes.max()) < m.cfg.card


@pytest.mark.parametrize("which", ["music", "audio"])
def test_decode_to_a_duration_gives_exactly_round_duration_times_sample_rate(models, which):
    m = models[which]
    for seconds in (0.37, m.segment_duration, 2.3 * m.segment_duration + 0.0123):
        codes = m.generate(["x"], seed=1, decoding_steps=STEPS, duration=seconds)
        wav = m.decode(codes, duration=seconds)
        assert wav.shape == (1, m.channels, round(seconds * m.sample_rate))
        plain = m.decode(codes)
        n = min(plain.shape[-1], wav.shape[-1])
        assert torch.equal(wav[..., :n], plain[..., :n])            # fitting only trims or pads the end
        assert not wav[..., plain.shape[-1]:].any()                 # padding is silence


def test_each_window_continues_the_last_seconds_of_the_previous_one(music_model, monkeypatch):
    spy = Spy(monkeypatch)
    m = music_model
    codes = m.generate(["a", "b"], seed=3, decoding_steps=STEPS, duration=7.3, overlap=0.8)
    W = SpanArrangement("nonoverlap", m.cfg.span_len).usable_window(m.max_frames)
    plan = longform.plan_windows(codes.shape[-1], W, 40)
    assert len(spy.calls) == len(plan) >= 4
    assert spy.calls[0].get("prompt") is None
    for w, call in zip(plan, spy.calls):
        assert call["frames"] == w.frames == W
        assert torch.equal(call["out"], codes[..., w.start:w.end])  # the result is made of the windows
        if w.context:
            assert torch.equal(call["prompt"], codes[..., w.start:w.start + w.context])
    assert [w.context for w in plan[1:-1]] == [40] * (len(plan) - 2) and plan[-1].context >= 40
    # the generator is shared: every window draws from the one seeded stream
    assert len({id(c["generator"]) for c in spy.calls}) == 1


def test_first_window_of_a_long_generation_is_the_single_window_generation(music_model):
    m = music_model
    one = m.generate(["x"], seed=11, decoding_steps=STEPS)
    long = m.generate(["x"], seed=11, decoding_steps=STEPS, duration=3 * m.segment_duration)
    assert torch.equal(long[..., :one.shape[-1]], one)


def test_long_generation_is_deterministic_with_a_seed(music_model):
    kw = dict(decoding_steps=STEPS, duration=4.1)
    a = music_model.generate(["x", "y"], seed=5, **kw)
    b = music_model.generate(["x", "y"], seed=5, **kw)
    c = music_model.generate(["x", "y"], seed=6, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert music_model.last_seed == 6
    unseeded = music_model.generate(["x", "y"], **kw)
    assert torch.equal(unseeded, music_model.generate(["x", "y"], seed=music_model.last_seed, **kw))


def test_long_generation_keeps_a_prompt_shorter_or_longer_than_the_window(music_model):
    m = music_model
    short = m.generate(["x"], seed=0, decoding_steps=STEPS, duration=1.0)[..., :13]
    codes = m.generate(["x"], seed=1, decoding_steps=STEPS, duration=5.0, prompt=short)
    assert codes.shape[-1] == 250 and torch.equal(codes[..., :13], short)
    longp = m.generate(["x"], seed=2, decoding_steps=STEPS, duration=3.0)       # 150 frames > the window
    codes = m.generate(["x"], seed=3, decoding_steps=STEPS, duration=5.0, prompt=longp)
    assert codes.shape[-1] == 250 and torch.equal(codes[..., :150], longp)
    with pytest.raises(MagnetError, match="shorter prompt"):
        m.generate(["x"], seed=3, decoding_steps=STEPS, duration=2.5, prompt=longp[..., :130].repeat(1, 1, 2))


def test_progress_has_one_total_for_all_windows(music_model):
    calls = []
    m = music_model
    codes = m.generate(["x"], seed=0, decoding_steps=STEPS, duration=5.0,
                       progress=lambda done, total: calls.append((done, total)))
    W = SpanArrangement("nonoverlap", m.cfg.span_len).usable_window(m.max_frames)
    n_windows = len(longform.plan_windows(codes.shape[-1], W, m.overlap_frames(None)))
    total = n_windows * sum(STEPS)
    assert n_windows > 1 and calls == [(i, total) for i in range(1, total + 1)]


def test_cancel_from_progress_stops_within_one_decoding_step(music_model, monkeypatch):
    forwards = _count_forwards(monkeypatch, music_model.lm)

    class Cancelled(Exception):
        pass

    stop_at = sum(STEPS) + 4                       # in the middle of the second window

    def progress(done, total):
        if done == stop_at:
            raise Cancelled

    with pytest.raises(Cancelled):
        music_model.generate(["x"], seed=0, decoding_steps=STEPS, duration=7.0, progress=progress)
    assert forwards[0] == stop_at                  # one forward per step; none after the cancel
    codes = music_model.generate(["x"], seed=0, decoding_steps=STEPS, duration=3.0)
    forwards[0] = 0
    stop_at = 2
    with pytest.raises(Cancelled):
        music_model.regenerate(codes, 1.0, 1.5, "x", decoding_steps=STEPS, progress=progress)
    assert forwards[0] == stop_at


@pytest.mark.parametrize("kw,needle", [
    ({"overlap": -1.0}, ">= 0"),
    ({"overlap": 2.0}, "window"),
    ({"overlap": 1.95}, "at most 1.92 s"),
    ({"overlap": "lots"}, "number of seconds"),
    ({"duration": float("inf")}, "finite"),
    ({"duration": float("nan")}, "more than 0"),
])
def test_bad_long_generation_parameters_are_clear_errors(music_model, kw, needle):
    with pytest.raises(MagnetError, match=needle):
        music_model.generate(["x"], **{"duration": 10.0, "decoding_steps": STEPS, **kw})


def test_seams_are_no_larger_than_the_discontinuities_inside_a_window(music_model):
    """The sample-to-sample step around each window join, ranked among the same measure at every frame
    boundary inside the windows. The fixtures are random models (their audio is noise), so what the test
    can show is that joins do not stand out: their mean percentile rank stays near the middle (about 0.5
    if joins are like any other boundary; 0.8 is 3 standard deviations for this many joins) and no join
    exceeds the largest step inside the windows by more than 10%. As a check that the measure can see a
    seam, butt-splicing separately generated windows at the same places ranks every join at the top."""
    m = music_model
    hop = m.codec.hop_length
    codes = m.generate(["x", "y"], seed=0, decoding_steps=STEPS, duration=8.0)
    F = codes.shape[-1]
    W = SpanArrangement("nonoverlap", m.cfg.span_len).usable_window(m.max_frames)
    plan = longform.plan_windows(F, W, m.overlap_frames(None))
    joins = [w.start + w.context for w in plan[1:]]
    ranks, ratios = seam_ranks(frame_jumps(m.decode(codes), hop, F), joins)
    assert len(ranks) >= 10
    assert ranks.mean() <= 0.8, ranks
    assert ratios.max() <= 1.1, ratios

    # control: unrelated clips cut at the same places (what a non-continuing window would give)
    pieces, prev = [], 0
    for i, j in enumerate(joins + [F]):
        clip = m.decode(m.generate(["x", "y"], seed=100 + i, decoding_steps=STEPS))
        pieces.append(clip[..., : (j - prev) * hop])
        prev = j
    spliced = torch.cat(pieces, dim=-1)
    c_ranks, _ = seam_ranks(frame_jumps(spliced, hop, F), joins)
    assert c_ranks.mean() > 0.95


# --- regenerate a region -------------------------------------------------------------------------

@pytest.mark.parametrize("seconds,region", [
    (1.5, (0.5, 1.0)),          # a clip within one window
    (1.52, (1.2, 1.52)),        # 76 frames: the 75-frame window is placed at the clip's end
    (7.3, (3.0, 4.0)),          # a long clip: the window is centred on the region
    (7.3, (0.0, 0.7)),          # at the start: context on the right only
    (7.3, (6.5, 7.3)),          # at the end
])
def test_regenerate_changes_the_region_and_leaves_every_other_code_identical(music_model, monkeypatch,
                                                                             seconds, region):
    m = music_model
    fr = m.frame_rate
    codes = m.generate(["x", "y"], seed=0, decoding_steps=STEPS, duration=max(seconds, 3.0))
    codes = codes[..., :round(seconds * fr)]                       # any length, as from model.encode
    spy = Spy(monkeypatch)
    out = m.regenerate(codes, *region, ["x", "y"], seed=1, decoding_steps=STEPS)
    a, b = round(region[0] * fr), round(region[1] * fr)
    assert out.shape == codes.shape and out.dtype == codes.dtype
    assert torch.equal(out[..., :a], codes[..., :a]) and torch.equal(out[..., b:], codes[..., b:])
    inside = out[..., a:b] != codes[..., a:b]
    assert inside.float().mean() > 0.5                             # the region really is new
    (call,) = spy.calls
    keep = call["keep"]
    assert int((~keep).sum()) == b - a                             # exactly the region is generated
    assert call["frames"] == min(SpanArrangement("nonoverlap", 3).usable_window(m.max_frames),
                                 codes.shape[-1] - codes.shape[-1] % 3)
    idx = torch.nonzero(~keep)[:, 0]
    before, after = int(idx.min()), call["frames"] - 1 - int(idx.max())
    if a > 0 and b < codes.shape[-1]:
        assert before > 0 and after > 0                            # conditioned on both sides,
        assert abs(before - after) <= 1                            # as evenly as the clip allows


def test_regenerate_is_deterministic_with_a_seed_and_reports_progress(music_model):
    m = music_model
    codes = m.generate(["x"], seed=0, decoding_steps=STEPS, duration=4.0)
    calls = []
    a = m.regenerate(codes, 1.0, 2.0, "x", seed=4, decoding_steps=STEPS, progress=lambda d, t: calls.append((d, t)))
    b = m.regenerate(codes, 1.0, 2.0, "x", seed=4, decoding_steps=STEPS)
    c = m.regenerate(codes, 1.0, 2.0, "x", seed=5, decoding_steps=STEPS)
    assert torch.equal(a, b) and not torch.equal(a, c) and m.last_seed == 5
    assert calls == [(i, sum(STEPS)) for i in range(1, sum(STEPS) + 1)]
    s1 = m.regenerate(codes, 1.0, 2.0, "x", seed=4, decoding_steps=STEPS, span_arrangement="stride1")
    assert torch.equal(s1[..., :50], codes[..., :50]) and torch.equal(s1[..., 100:], codes[..., 100:])


def test_regenerate_rounds_seconds_outwards_to_whole_frames(music_model):
    m = music_model
    codes = m.generate(["x"], seed=0, decoding_steps=STEPS, duration=3.0)
    out = m.regenerate(codes, 1.011, 1.029, "x", seed=1, decoding_steps=STEPS)   # inside frames 50 and 51
    assert torch.equal(out[..., :50], codes[..., :50]) and torch.equal(out[..., 52:], codes[..., 52:])


def test_regenerate_in_frames_through_longform(music_model):
    m = music_model
    codes = m.generate(["x"], seed=0, decoding_steps=STEPS, duration=5.0)
    g = torch.Generator().manual_seed(0)
    params = sampling_mod.SamplingParams(decoding_steps=STEPS)
    out = longform.regenerate_region(m.lm, m.encode_text(["x"]), codes, 120, 170, params,
                                     window=m.max_frames, generator=g)
    assert torch.equal(out[..., :120], codes[..., :120]) and torch.equal(out[..., 170:], codes[..., 170:])
    assert not torch.equal(out[..., 120:170], codes[..., 120:170])


@pytest.mark.parametrize("seconds,region,kw,needle", [
    (5.0, (1.0, 1.0), {}, "before its end"),
    (5.0, (2.0, 1.0), {}, "before its end"),
    (5.0, (-0.5, 1.0), {}, "outside the clip"),
    (5.0, (4.0, 5.5), {}, "outside the clip"),
    (5.0, (1.0, 2.99), {}, "longer than the window minus context"),
    (1.0, (0.0, 1.0), {}, "longer than the window minus context"),
    (5.0, ("one", 2.0), {}, "number of seconds"),
    (5.0, (1.0, float("inf")), {}, "finite"),
    (5.0, (1.0, 2.0), {"prompts": ["a", "b", "c"]}, "one prompt per row"),
    (5.0, (1.0, 2.0), {"decoding_steps": (1, 2)}, "one step count per codebook"),
])
def test_bad_regions_are_clear_errors(music_model, seconds, region, kw, needle):
    codes = torch.zeros(1, 4, int(seconds * music_model.frame_rate), dtype=torch.long)
    prompts = kw.pop("prompts", "x")
    with pytest.raises(MagnetError, match=needle):
        music_model.regenerate(codes, *region, prompts, **kw)


def test_regenerate_rejects_codes_that_are_not_finished_codes(music_model):
    m = music_model
    codes = torch.zeros(1, 4, 200, dtype=torch.long)
    with pytest.raises(MagnetError, match="mask tokens"):
        m.regenerate(codes.clone().fill_(m.cfg.card), 1.0, 2.0, "x")
    with pytest.raises(MagnetError, match="integer codes"):
        m.regenerate(codes.float(), 1.0, 2.0, "x")
    with pytest.raises(MagnetError, match="expected"):
        m.regenerate(codes[:, :3], 1.0, 2.0, "x")


# --- fitting audio to an exact length -------------------------------------------------------------

def test_fit_length_pads_with_silence_or_trims_the_end():
    wav = torch.randn(2, 3, 100)
    longer = fit_length(wav, 130)
    assert longer.shape == (2, 3, 130) and torch.equal(longer[..., :100], wav) and not longer[..., 100:].any()
    shorter = fit_length(wav, 64)
    assert shorter.shape == (2, 3, 64) and torch.equal(shorter, wav[..., :64])
    shorter[..., 0] = 5.0
    assert not (wav == 5.0).any()                                  # a new tensor, not a view
    assert fit_length(wav[0], 100).shape == (3, 100)


def test_seconds_to_samples_rounds_to_the_nearest_sample():
    assert seconds_to_samples(1 / 3, 32000) == 10667
    assert seconds_to_samples(12.345678, 16000) == round(12.345678 * 16000)
    assert seconds_to_samples(0, 48000) == 0


@pytest.mark.parametrize("call,needle", [
    (lambda: fit_length(torch.zeros(1, 10), 0), ">= 1"),
    (lambda: fit_length(torch.zeros(1, 10), 5.5), "whole number"),
    (lambda: fit_length(torch.zeros(1, 10, dtype=torch.long), 5), "float"),
    (lambda: seconds_to_samples(-1.0, 32000), ">= 0"),
    (lambda: seconds_to_samples(float("nan"), 32000), "finite"),
    (lambda: seconds_to_samples(1.0, 0), "sample_rate"),
])
def test_bad_fit_arguments_are_clear_errors(call, needle):
    with pytest.raises(MagnetError, match=needle):
        call()
