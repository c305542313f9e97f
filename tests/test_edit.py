"""Editing: audio to audio (vary), seamless loops, prompt timelines (magnet.edit and its nodes).

The reference fixtures' window is 2 s (100 frames; 99 usable with the nonoverlap arrangement); the models
have random weights, so their audio is noise-like: the join measures below compare joins with the frame
boundaries inside the same audio, and a control shows that the measure does see a real cut."""
import numpy as np
import pytest
import torch

import magnet.sampling as sampling_mod
from conftest import Spy, frame_jumps, seam_ranks
from magnet import edit, longform
from magnet.errors import MagnetError
from magnet.sampling import SpanArrangement
from pack import load_pack

STEPS = (3, 2, 2, 2)


@pytest.fixture(scope="module")
def clip(music_model):
    return music_model.generate(["x", "y"], seed=0, decoding_steps=STEPS, duration=3.0)      # 150 frames > window




# --- audio to audio -------------------------------------------------------------------------------

def test_strength_zero_returns_the_input_bit_identical(music_model, clip):
    for k in (0, 1):
        out = edit.vary(music_model, clip, "z", strength=0.0, keep_codebooks=k, seed=3, decoding_steps=STEPS)
        assert torch.equal(out, clip) and out is not clip


def test_strength_one_redraws_most_frames_and_keeps_the_length(music_model, clip):
    out = edit.vary(music_model, clip, "z", strength=1.0, seed=3, decoding_steps=STEPS)
    assert out.shape == clip.shape
    changed = (out != clip).float().mean(dim=-1)              # [B, K]
    assert bool((changed > 0.8).all()), changed


@pytest.mark.parametrize("strength", [0.25, 0.6])
def test_keep_codebooks_one_keeps_codebook_0_and_redraws_about_strength_of_the_rest(music_model, clip, strength):
    m = music_model
    out = edit.vary(m, clip, "z", strength=strength, keep_codebooks=1, seed=5, decoding_steps=STEPS)
    assert torch.equal(out[:, 0], clip[:, 0])
    redraw = edit.redraw_mask(clip.shape[-1], m.cfg.span_len, strength, m.last_seed)
    assert abs(float(redraw.float().mean()) - strength) < 0.05
    changed = (out != clip)[:, 1:]                            # [B, K-1, T]
    assert not changed[..., ~redraw].any()                   # only the chosen spans change
    frac = changed.float().mean(dim=-1)
    assert bool(((frac > strength - 0.15) & (frac <= strength + 0.05)).all()), frac


def test_only_the_chosen_spans_change_and_they_spread_over_the_clip(music_model, clip):
    m = music_model
    out = edit.vary(m, clip, "z", strength=0.4, seed=9, decoding_steps=STEPS)
    redraw = edit.redraw_mask(clip.shape[-1], m.cfg.span_len, 0.4, 9)
    assert torch.equal(out[..., ~redraw], clip[..., ~redraw])
    assert (out[..., redraw] != clip[..., redraw]).float().mean() > 0.8
    quarters = redraw.view(-1)[: redraw.numel() // 4 * 4].view(4, -1).float().mean(dim=-1)
    assert bool((quarters > 0.2).all() and (quarters < 0.6).all()), quarters


def test_the_same_seed_gives_the_same_variation(music_model, clip):
    kw = dict(strength=0.5, keep_codebooks=1, decoding_steps=STEPS)
    a = edit.vary(music_model, clip, "z", seed=11, **kw)
    b = edit.vary(music_model, clip, "z", seed=11, **kw)
    c = edit.vary(music_model, clip, "z", seed=12, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = edit.vary(music_model, clip, "z", **kw)                # random seed, recorded
    assert torch.equal(d, edit.vary(music_model, clip, "z", seed=music_model.last_seed, **kw))


@pytest.mark.parametrize("frames", [7, 50, 100, 101])
def test_vary_keeps_any_length_within_and_around_the_window(music_model, clip, frames):
    codes = clip[:1, :, :frames]
    out = edit.vary(music_model, codes, "z", strength=1.0, seed=1, decoding_steps=STEPS)
    assert out.shape == codes.shape and (out != codes).float().mean() > 0.6


def test_each_window_of_a_long_clip_continues_the_edited_audio(music_model, clip, monkeypatch):
    spy = Spy(monkeypatch)
    progress = []
    out = edit.vary(music_model, clip, "z", strength=0.5, seed=2, decoding_steps=STEPS,
                    progress=lambda d, t: progress.append((d, t)))
    m, T = music_model, clip.shape[-1]
    W = SpanArrangement("nonoverlap", m.cfg.span_len).usable_window(m.max_frames)
    redraw = edit.redraw_mask(T, m.cfg.span_len, 0.5, 2)
    plan = [w for w in longform.plan_windows(T, W, W // 2) if redraw[w.start + w.context:w.end].any()]
    assert len(spy.calls) == len(plan) >= 2
    for w, call in zip(plan, spy.calls):
        assert call["frames"] == w.frames and bool(call["keep"][:w.context].all())
        # each window continues the edited audio before it, and its new part is what comes back
        assert torch.equal(call["given"][..., :w.context], out[..., w.start:w.start + w.context])
        assert torch.equal(call["out"][..., w.context:], out[..., w.start + w.context:w.end])
        assert torch.equal(call["keep"][w.context:], ~redraw[w.start + w.context:w.end])
    total = len(spy.calls) * sum(STEPS)
    assert progress == [(i, total) for i in range(1, total + 1)]
    assert out.shape == clip.shape


def test_tail_model_sees_the_kept_codebooks_in_front(music_model, clip):
    lm = music_model.lm
    tail = edit._TailLM(lm, clip[:, :1])
    cond = music_model.encode_text(["x", "y"])
    mem = lm.memory(cond.hidden, cond.mask, null_rows=2)
    with torch.inference_mode():
        a = tail(clip[:, 1:], mem, stage=1, heads=[1])
        b = lm(clip, mem, stage=2, heads=[2])
    assert tail.cfg.n_q == lm.cfg.n_q - 1 and torch.allclose(a, b)


@pytest.mark.parametrize("kw,needle", [
    ({"strength": -0.1}, "between 0"), ({"strength": 1.5}, "between 0"), ({"strength": float("nan")}, "finite"),
    ({"strength": "lots"}, "number"), ({"keep_codebooks": 4}, "0 to 3"), ({"keep_codebooks": -1}, "0 to 3"),
    ({"keep_codebooks": 1.5}, "whole number"), ({"decoding_steps": (1, 2)}, "per codebook"),
    ({"temprature": 3.0}, "unknown sampling argument"),
])
def test_bad_vary_arguments_are_clear_errors(music_model, clip, kw, needle):
    with pytest.raises(MagnetError, match=needle):
        edit.vary(music_model, clip, "z", **{"strength": 0.5, "decoding_steps": STEPS, **kw})


def test_vary_refuses_codes_of_another_codec_and_clips_too_short(music_model, clip):
    m = music_model
    with pytest.raises(MagnetError, match="another codec"):
        edit.vary(m, clip + m.cfg.card, "z", strength=0.5)
    with pytest.raises(MagnetError, match="expected"):
        edit.vary(m, clip[:, :3], "z", strength=0.5)
    with pytest.raises(MagnetError, match="at least"):
        edit.vary(m, clip[..., :4], "z", strength=0.5)
    with pytest.raises(MagnetError, match="one prompt per row"):
        edit.vary(m, clip, ["a", "b", "c"], strength=0.5)


# --- seamless loops --------------------------------------------------------------------------------

def test_loop_lengths_are_exact_in_frames_and_samples(music_model):
    m = music_model
    for kw, seconds in (({"duration": 1.3}, 1.3), ({"bars": 1, "bpm": 150}, 1.6),
                        ({"bars": 1, "bpm": 137, "beats_per_bar": 4}, 240 / 137), ({"duration": 3.1}, 3.1)):
        codes = edit.generate_loop(m, "x", seed=0, decoding_steps=STEPS, **kw)
        assert codes.shape == (1, 4, round(seconds * m.frame_rate)), kw
        wav = edit.decode_loop(m, codes, duration=seconds)
        assert wav.shape == (1, m.channels, round(seconds * m.sample_rate)), kw
        assert edit.decode_loop(m, codes, duration=seconds, repeats=3).shape[-1] == 3 * wav.shape[-1]


def test_loopify_changes_only_the_frames_around_the_join(music_model, clip):
    m = music_model
    codes = clip[:1, :, :80]
    out = edit.loopify(m, codes, "x", seed=1, decoding_steps=STEPS)
    a, b = edit._join_region(m, 80, 40)
    r = (b - a) // 2
    assert torch.equal(out[..., r:80 - r], codes[..., r:80 - r])
    assert not torch.equal(out[..., :r], codes[..., :r]) and not torch.equal(out[..., 80 - r:], codes[..., 80 - r:])


def test_the_wrap_join_is_like_any_join_inside_the_loop(music_model):
    """The decoded loop played twice: the largest sample step around the wrap join ranked among the frame
    boundaries inside, over several seeds; the three-fold repetition has no join above the inside steps.
    Controls: two different clips butted together, and the same codes decoded as a plain clip and repeated
    (the naive loop), both rank their join at the top."""
    m = music_model
    hop, F = m.codec.hop_length, 60
    ranks, ratios, naive, cut = [], [], [], []
    for seed in range(6):
        codes = edit.generate_loop(m, "x", duration=F / m.frame_rate, seed=seed, decoding_steps=STEPS)
        loop = edit.decode_loop(m, codes)
        r, q = seam_ranks(frame_jumps(torch.cat([loop, loop], -1), hop, 2 * F), [F])
        ranks += list(r)
        ratios += list(q)
        three = edit.decode_loop(m, codes, repeats=3)
        _, q3 = seam_ranks(frame_jumps(three, hop, 3 * F), [F, 2 * F])
        assert q3.max() <= 1.1, q3
        plain = m.decode(codes)
        naive += list(seam_ranks(frame_jumps(torch.cat([plain, plain], -1), hop, 2 * F), [F])[0])
        other = m.decode(edit.generate_loop(m, "y", duration=F / m.frame_rate, seed=100 + seed,
                                            decoding_steps=STEPS))
        cut += list(seam_ranks(frame_jumps(torch.cat([loop, other], -1), hop, 2 * F), [F])[0])
    ranks, ratios = np.array(ranks), np.array(ratios)
    print("loop wrap-join ranks", ranks.round(2), "ratios", ratios.round(2), "naive", np.round(naive, 2),
          "cut", np.round(cut, 2))
    assert ranks.mean() <= 0.8 and ratios.max() <= 1.1, (ranks, ratios)
    assert np.mean(cut) > 0.9 and np.mean(naive) > 0.9, (cut, naive)


def test_a_loop_resampled_to_an_exact_length_still_wraps_smoothly(music_model):
    m = music_model
    seconds = 240 / 137                                  # 1.7518 s: not a whole number of frames
    codes = edit.generate_loop(m, "x", duration=seconds, seed=3, decoding_steps=STEPS)
    x = edit.decode_loop(m, codes, duration=seconds, repeats=2).mean(dim=1)[0]
    n = round(seconds * m.sample_rate)
    steps = (x[1:] - x[:-1]).abs()
    assert float(steps[n - 1]) <= float(torch.quantile(steps, 0.99))


@pytest.mark.parametrize("kw,needle", [
    ({"bars": 4, "bpm": 0}, "bpm"), ({"bars": 4, "bpm": -120}, "bpm"), ({"bars": 0, "bpm": 120}, "bars"),
    ({"bars": 4, "bpm": 120, "beats_per_bar": 0}, "beats_per_bar"), ({}, "give the loop's length"),
    ({"duration": 2.0, "bars": 4, "bpm": 120}, "not both"), ({"duration": 0.1}, "shorter than the model's context"),
    ({"duration": -1.0}, "more than 0"), ({"bars": 1, "bpm": float("inf")}, "finite"),
])
def test_bad_loop_arguments_are_clear_errors(music_model, kw, needle):
    with pytest.raises(MagnetError, match=needle):
        edit.generate_loop(music_model, "x", decoding_steps=STEPS, **kw)


def test_decode_loop_refuses_a_wrong_duration_repeats_and_foreign_codes(music_model, clip):
    m = music_model
    with pytest.raises(MagnetError, match="does not match"):
        edit.decode_loop(m, clip[..., :60], duration=2.0)
    with pytest.raises(MagnetError, match="repeats"):
        edit.decode_loop(m, clip[..., :60], repeats=0)
    with pytest.raises(MagnetError, match="not codes of this codec"):
        edit.decode_loop(m, clip[..., :60] + m.cfg.card)
    with pytest.raises(MagnetError, match="at least"):
        edit.loopify(m, clip[..., :8], "x")


# --- prompt timeline --------------------------------------------------------------------------------

def test_timeline_text_is_parsed_in_every_time_format():
    text = "0:00 calm piano intro\n\n# a comment\n0:30 drums come in\n1:10 - big orchestral finish\n1:02:03.5 coda"
    assert edit.parse_timeline(text) == [(0.0, "calm piano intro"), (30.0, "drums come in"),
                                         (70.0, "big orchestral finish"), (3723.5, "coda")]
    assert edit.parse_timeline("0 rain\n12.5 thunder") == [(0.0, "rain"), (12.5, "thunder")]
    assert edit.parse_timeline([(0, "a"), (2.5, "b")]) == [(0.0, "a"), (2.5, "b")]


@pytest.mark.parametrize("timeline,needle", [
    ("0:00 a\n0:20 b\n0:10 c", "must increase"), ("0:00 a\n0:00 b", "must increase"),
    ([(0, "a"), (-1, "b")], "negative"),
    ([(-1, "a")], "negative"), ("0:00 a\n0:05", "no prompt"), ("0:05 a", "first prompt must be at 0:00"),
    ("drums", "does not start with a time"), ("0:75 a", "below 60"), ("", "empty"), ([(0, "")], "no prompt"),
    (42, "list of"),
])
def test_bad_timelines_are_clear_errors(timeline, needle):
    with pytest.raises(MagnetError, match=needle):
        edit.parse_timeline(timeline)


def test_times_beyond_the_duration_are_refused(music_model):
    with pytest.raises(MagnetError, match="beyond the end"):
        edit.generate_timeline(music_model, "0:00 a\n0:05 b", duration=4.0, decoding_steps=STEPS)


@pytest.mark.parametrize("seconds", [1.5, 2.0, 3.3])
def test_a_one_prompt_timeline_is_exactly_generate(music_model, seconds):
    m = music_model
    a = edit.generate_timeline(m, "0:00 lofi beat", duration=seconds, seed=4, decoding_steps=STEPS)
    b = m.generate(["lofi beat"], duration=seconds, seed=4, decoding_steps=STEPS)
    assert torch.equal(a, b)


@pytest.mark.parametrize("seconds,timeline", [
    (1.9, "0:00 a\n0:01 b"),                                    # within one window
    (5.3, "0:00 a\n0:01.5 b\n3.1 c\n0:04 d"),                   # beyond it
])
def test_each_window_is_conditioned_on_the_prompt_over_its_new_part(music_model, monkeypatch, seconds, timeline):
    m = music_model
    want = m.generate(["a"], duration=seconds, decoding_steps=STEPS, seed=0).shape[-1]
    spy = Spy(monkeypatch)
    progress = []
    codes = edit.generate_timeline(m, timeline, duration=seconds, seed=1, decoding_steps=STEPS,
                                   progress=lambda d, t: progress.append((d, t)))
    assert codes.shape == (1, 4, want)
    entries = edit.parse_timeline(timeline)
    starts = [round(t * m.frame_rate) for t, _ in entries]
    done, seen = 0, []
    for call in spy.calls:
        context = 0 if call.get("prompt") is None else call["prompt"].shape[-1]
        new = call["out"].shape[-1] - context
        a, b = done, done + new
        (prompt,) = call["prompts"]
        i = [p for _, p in entries].index(prompt)
        lo, hi = starts[i], starts[i + 1] if i + 1 < len(starts) else want
        assert lo - m.cfg.span_len < a and b <= hi, (prompt, a, b, lo, hi)     # the new part lies in its section
        assert torch.equal(call["out"][..., context:], codes[..., a:b])
        seen.append(prompt)
        done = b
    assert done == want and sorted(set(seen)) == sorted(p for _, p in entries)
    total = len(spy.calls) * sum(STEPS)
    assert progress == [(i, total) for i in range(1, total + 1)]


def test_prompt_changes_join_like_the_boundaries_inside_a_window(music_model, monkeypatch):
    """The joins where a new prompt takes over (and the window joins of long parts), measured as the
    long-form seams are: ranked among the frame boundaries inside the windows."""
    m = music_model
    hop = m.codec.hop_length
    ranks, ratios = [], []
    for seed in range(3):
        spy = Spy(monkeypatch)
        codes = edit.generate_timeline(m, "0:00 a\n0:01.2 b\n2.4 c\n0:03.6 d", duration=5.0, seed=seed,
                                       decoding_steps=STEPS)
        joins, done = [], 0
        for call in spy.calls:
            context = 0 if call.get("prompt") is None else call["prompt"].shape[-1]
            if done:
                joins.append(done)
            done += call["out"].shape[-1] - context
        r, q = seam_ranks(frame_jumps(m.decode(codes), hop, codes.shape[-1]), joins)
        ranks += list(r)
        ratios += list(q)
        monkeypatch.undo()
    ranks, ratios = np.array(ranks), np.array(ratios)
    print("timeline join ranks", ranks.round(2), "ratios", ratios.round(2))
    assert len(ranks) >= 9 and ranks.mean() <= 0.8 and ratios.max() <= 1.1, (ranks, ratios)


def test_timeline_continues_prompt_audio(music_model, clip):
    m = music_model
    prompt = clip[:1, :, :40]
    codes = edit.generate_timeline(m, "0:00 a\n0:01 b", duration=2.6, prompt=prompt, seed=2, decoding_steps=STEPS)
    assert codes.shape[-1] == 130 and torch.equal(codes[..., :40], prompt)


# --- other model shapes -----------------------------------------------------------------------------

def test_other_windows_and_span_lengths(ref, tmp_path):
    from conftest import make_release
    from magnet import MagnetModel
    make_release(ref / "magnet-music", tmp_path / "r", seed=1, span_len=4, segment_duration=1.3)
    m = MagnetModel.from_pretrained(tmp_path / "r", text_encoder=ref / "t5-base", device="cpu")
    codes = m.generate(["x"], seed=0, decoding_steps=STEPS, duration=2.9)
    assert codes.shape[-1] == 145
    out = edit.vary(m, codes, "y", strength=0.5, keep_codebooks=2, seed=1, decoding_steps=STEPS)
    redraw = edit.redraw_mask(145, 4, 0.5, 1)
    assert torch.equal(out[:, :2], codes[:, :2]) and torch.equal(out[..., ~redraw], codes[..., ~redraw])
    loop = edit.generate_loop(m, "x", duration=2.07, seed=0, decoding_steps=STEPS)
    assert loop.shape[-1] == round(2.07 * 50)
    assert edit.decode_loop(m, loop, duration=2.07).shape[-1] == round(2.07 * m.sample_rate)
    with pytest.raises(MagnetError, match="shorter than the model's context"):
        edit.generate_loop(m, "x", duration=0.3)
    tl = edit.generate_timeline(m, "0:00 a\n0:01 b\n0:02 c", duration=2.9, seed=0, decoding_steps=STEPS)
    assert tl.shape[-1] == 145


# --- nodes -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def N():
    return load_pack().NODE_CLASS_MAPPINGS


NodeError = load_pack().magnet.errors.MagnetError         # the pack's own copy of the engine (as in ComfyUI)


def _handle(obj):
    from pack import load_pack as lp
    return lp().nodes.common.Handle(obj, "test")


SAMPLING = dict(decoding_steps="3,2,2,2", temperature=3.0, top_k=0, top_p=0.9, max_cfg_coef=10.0, min_cfg_coef=1.0,
                span_arrangement="nonoverlap", span_scoring="max")


def test_audio_to_audio_node(N, music_model, clip):
    common = load_pack().nodes.common
    m = music_model
    tokens = common.tokens_payload(clip, m.codec)
    cond = m.encode_text(["z"])
    (out,) = N["MagnetAudioToAudio"]().vary(_handle(m), cond, tokens, 7, 0.5, 1, **SAMPLING)
    assert out["codes"].shape == clip.shape and torch.equal(out["codes"][:, 0], clip[:, 0])
    with pytest.raises(NodeError, match=r"^MAGNeT Audio to Audio: strength"):
        N["MagnetAudioToAudio"]().vary(_handle(m), cond, tokens, 7, 1.5, 0, **SAMPLING)
    with pytest.raises(NodeError, match=r"^MAGNeT Audio to Audio: input `tokens`"):
        N["MagnetAudioToAudio"]().vary(_handle(m), cond, {**tokens, "n_q": 8}, 7, 0.5, 0, **SAMPLING)


def test_seamless_loop_and_decode_loop_nodes(N, music_model):
    m = music_model
    cond = m.encode_text(["x"])
    (tokens,) = N["MagnetSeamlessLoop"]().loop(_handle(m), cond, 1, 0.0, 1, 137.0, 4, **SAMPLING)
    seconds = 240 / 137
    assert tokens["codes"].shape[-1] == round(seconds * 50)
    loop, repeated = N["MagnetDecodeLoop"]().decode(_handle(m.codec), tokens, 3)
    assert loop["waveform"].shape[-1] == round(seconds * m.sample_rate)
    assert repeated["waveform"].shape[-1] == 3 * loop["waveform"].shape[-1]
    with pytest.raises(NodeError, match=r"^MAGNeT Seamless Loop: .*shorter than the model's context"):
        N["MagnetSeamlessLoop"]().loop(_handle(m), cond, 1, 0.1, 1, 120.0, 4, **SAMPLING)
    with pytest.raises(NodeError, match=r"^MAGNeT Seamless Loop: input `bpm`"):
        N["MagnetSeamlessLoop"]().loop(_handle(m), cond, 1, 0.0, 1, float("nan"), 4, **SAMPLING)


def test_prompt_timeline_node_gives_a_timeline_conditioning(N, music_model):
    m = music_model
    (cond,) = N["MagnetPromptTimeline"]().encode(_handle(m.text_encoder), "0:00 a\n0:01 b")
    assert isinstance(cond, load_pack().magnet.edit.TimelineCondition) and [t for t, _ in cond.timeline] == [0.0, 1.0]
    assert torch.equal(cond.timeline[1][1].hidden, m.encode_text(["b"]).hidden)
    with pytest.raises(NodeError, match=r"^MAGNeT Prompt Timeline: timeline times must increase"):
        N["MagnetPromptTimeline"]().encode(_handle(m.text_encoder), "0:10 a\n0:01 b")


def test_the_sampler_node_runs_a_prompt_timeline(N, music_model):
    m = music_model
    (cond,) = N["MagnetPromptTimeline"]().encode(_handle(m.text_encoder), "0:00 a\n0:01 b")
    (tokens,) = N["MagnetSampler"]().sample(_handle(m), cond, 3, 2.6, 0.0, **SAMPLING)
    want = edit.generate_timeline(m, "0:00 a\n0:01 b", duration=2.6, seed=3, decoding_steps=STEPS)
    assert torch.equal(tokens["codes"], want)


def test_seamless_loop_node_makes_given_tokens_loop(N, music_model, clip):
    common = load_pack().nodes.common
    m = music_model
    tokens = common.tokens_payload(clip[:1, :, :80], m.codec)
    (out,) = N["MagnetSeamlessLoop"]().loop(_handle(m), m.encode_text(["x"]), 2, 0.0, 1, 120.0, 4, **SAMPLING,
                                            tokens=tokens)
    codes = out["codes"]
    assert codes.shape == (1, 4, 80) and torch.equal(codes[..., 30:50], clip[:1, :, 30:50])
    assert not torch.equal(codes, clip[:1, :, :80])


def test_a_timeline_is_refused_where_one_prompt_is_expected(music_model, clip):
    cond = edit.encode_timeline(music_model, "0:00 a\n0:01 b")
    with pytest.raises(MagnetError, match="timeline"):
        edit.vary_from_condition(music_model, cond, clip[:1], strength=0.5,
                                 params=sampling_mod.SamplingParams(decoding_steps=STEPS))


class Cancelled(Exception):
    pass


@pytest.mark.parametrize("what", ["vary", "loop", "timeline"])
def test_cancel_from_progress_stops_within_one_decoding_step(music_model, clip, monkeypatch, what):
    m = music_model
    n = [0]
    real = m.lm.forward

    def forward(*a, **k):
        n[0] += 1
        return real(*a, **k)
    monkeypatch.setattr(m.lm, "forward", forward)
    stop_at = sum(STEPS) + 3                      # inside the second decoding

    def progress(done, total):
        assert total >= stop_at
        if done == stop_at:
            raise Cancelled

    with pytest.raises(Cancelled):
        if what == "vary":
            edit.vary(m, clip, "z", strength=0.8, keep_codebooks=1, seed=0, decoding_steps=(3, 3, 3, 3),
                      progress=progress)
        elif what == "loop":
            edit.generate_loop(m, "x", duration=1.5, seed=0, decoding_steps=STEPS, progress=progress)
        else:
            edit.generate_timeline(m, "0:00 a\n0:01 b", duration=2.0, seed=0, decoding_steps=STEPS,
                                   progress=progress)
    assert n[0] == stop_at


def test_a_rescorer_sees_whole_codes_and_real_codebooks_when_codebooks_are_kept(music_model, clip):
    seen = []

    class Rescorer:
        weight = 0.5

        def begin(self, cond, frames):
            seen.append(("begin", frames))

        def probs(self, codes, stage):
            seen.append((tuple(codes.shape), stage))
            return torch.full(codes[:, stage].shape, 0.5)

    m = music_model
    out = edit.vary(m, clip, "z", strength=0.5, keep_codebooks=2, seed=0, decoding_steps=STEPS, rescorer=Rescorer())
    stages = {s for shape, s in seen if shape != "begin"}
    assert stages == {2, 3} and all(shape[1] == 4 for shape, _ in seen if shape != "begin")
    assert torch.equal(out[:, :2], clip[:, :2])
