"""The ComfyUI nodes, run as plain Python (no ComfyUI) on the reference models."""
import contextlib
import math
import re
from collections.abc import Mapping

import pytest
import torch

from pack import load_pack, widget_inputs

STEPS = "3,2,2,2"


@pytest.fixture(scope="module")
def pack(ref):
    mp = pytest.MonkeyPatch()
    mp.setenv("MAGNET_MODELS_DIR", str(ref))
    mp.setenv("MAGNET_TEXT_ENCODERS_DIR", str(ref))
    yield load_pack()
    mp.undo()


@pytest.fixture(scope="module")
def N(pack):
    return pack.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def music(N):
    model, codec = N["MagnetModelLoader"]().load("magnet-music", "auto", "auto")
    te, = N["MagnetTextEncoderLoader"]().load("t5-base", "auto")
    return model, codec, te


def sample(N, model, cond, **kw):
    args = dict(seed=1, duration=1.0, overlap=0.0, decoding_steps=STEPS, temperature=3.0, top_k=0, top_p=0.9, max_cfg_coef=10.0,
                min_cfg_coef=1.0, span_arrangement="nonoverlap", span_scoring="max")
    args.update(kw)
    return N["MagnetSampler"]().sample(model, cond, **args)[0]


def test_every_node_declares_a_valid_comfyui_interface(pack):
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"} and "required" in spec, name
        for section in ("required", "optional"):
            for inp, entry in spec.get(section, {}).items():
                assert isinstance(entry, tuple) and 1 <= len(entry) <= 2, (name, inp)
                typ = entry[0]
                assert isinstance(typ, (str, list)), (name, inp)
                opts = entry[1] if len(entry) > 1 else {}
                assert isinstance(opts, dict)
                if isinstance(typ, list) and typ and "default" in opts:
                    assert opts["default"] in typ, (name, inp)
                if typ in ("INT", "FLOAT") and "default" in opts:
                    assert opts.get("min", -float("inf")) <= opts["default"] <= opts.get("max", float("inf")), (name, inp)
                if isinstance(typ, str) and typ.isupper() and typ not in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                    assert typ.startswith("MAGNET_") or typ in ("AUDIO", "IMAGE", "VIDEO", "VHS_VIDEOINFO"), (name, typ)
        assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in cls.RETURN_TYPES)
        assert len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)
        assert callable(getattr(cls, cls.FUNCTION)), name
        assert cls.CATEGORY.startswith("audio/MAGNeT")
        # the function accepts every declared input by name (the sampling widgets may come as **kwargs)
        import inspect
        params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
        rest = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for section in ("required", "optional"):
            for inp in spec.get(section, {}):
                assert inp in params or (rest and inp in pack.nodes.common.SAMPLING_WIDGETS), (name, inp)


def test_seed_widget_has_control_after_generate(N):
    seed = dict((n, o) for n, _, o in widget_inputs(N["MagnetSampler"]))["seed"]
    assert seed["control_after_generate"] is True and seed["max"] == 0xFFFFFFFFFFFFFFFF


def test_loaders_list_what_is_on_disk(N):
    releases = N["MagnetModelLoader"].INPUT_TYPES()["required"]["release"][0]
    assert {"magnet-music", "magnet-audio"} <= set(releases)
    assert N["MagnetTextEncoderLoader"].INPUT_TYPES()["required"]["text_encoder"][0] == ["t5-base", "t5-large"]


def test_same_file_in_two_loaders_is_one_object_and_switching_releases_it(pack, N):
    from magnet_node_pack.magnet.cache import CACHE
    CACHE.clear()     # loaders of earlier tests may still hold these releases; the counts below are this test's own
    a, b = N["MagnetModelLoader"](), N["MagnetModelLoader"]()
    m1, c1 = a.load("magnet-audio", "auto", "auto")
    m2, c2 = b.load("magnet-audio", "auto", "auto")
    assert m1.obj is m2.obj and c1.obj is c2.obj
    n = len(CACHE)
    a.load("magnet-music", "auto", "auto")
    assert len(CACHE) == n + 1                # b still holds the audio model
    b.load("magnet-music", "auto", "auto")
    assert len(CACHE) == n                    # nobody holds the audio model any more: released


def test_text_to_music_chain_yields_core_audio(N, music):
    model, codec, te = music
    cond, = N["MagnetTextEncode"]().encode(te, "80s thrash metal intro riff\n\nlovely piano sonata", 2)
    assert cond.prompts == ["80s thrash metal intro riff"] * 2 + ["lovely piano sonata"] * 2
    tokens = sample(N, model, cond)
    assert tokens["codes"].shape == (4, 4, 48) and tokens["codes"].device.type == "cpu"
    audio, = N["MagnetDecodeAudio"]().decode(codec, tokens)
    assert type(audio) is dict and set(audio) == {"waveform", "sample_rate"}
    wav = audio["waveform"]
    assert wav.dtype == torch.float32 and wav.device.type == "cpu" and wav.shape == (4, 1, 48 * 640)
    assert audio["sample_rate"] == 32000
    loud, = N["MagnetLoudness"]().normalize(audio, -14.0)
    assert loud["waveform"].shape == wav.shape and loud["waveform"].abs().max() <= 1.0


def test_same_seed_same_tokens_through_the_node(N, music):
    model, _, te = music
    cond, = N["MagnetTextEncode"]().encode(te, "x", 1)
    assert torch.equal(sample(N, model, cond, seed=5)["codes"], sample(N, model, cond, seed=5)["codes"])
    assert not torch.equal(sample(N, model, cond, seed=5)["codes"], sample(N, model, cond, seed=6)["codes"])


class LazyAudio(Mapping):
    """What VideoHelperSuite hands over: a Mapping that decodes on first access, not a dict."""

    def __init__(self, wav, sr):
        self._d = {"waveform": wav, "sample_rate": sr}

    def __getitem__(self, k):
        return self._d[k]

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return 2


@pytest.mark.parametrize("channels,sr", [(1, 32000), (2, 44100), (2, 16000)])
def test_encode_takes_any_rate_and_channels_from_a_mapping(N, music, channels, sr):
    _, codec, _ = music
    wav = torch.randn(1, channels, sr) * 0.1
    tokens, = N["MagnetEncodeAudio"]().encode(codec, LazyAudio(wav, sr), 0.0, 0.0)
    assert tokens["codes"].shape == (1, 4, 50)
    part, = N["MagnetEncodeAudio"]().encode(codec, LazyAudio(wav, sr), 0.2, 0.5)
    assert part["codes"].shape == (1, 4, 25)


def test_continuation_keeps_the_prompt_tokens(N, music):
    model, codec, te = music
    tokens, = N["MagnetEncodeAudio"]().encode(codec, {"waveform": torch.randn(1, 1, 16000) * 0.1,
                                                      "sample_rate": 32000}, 0.0, 0.0)
    cond, = N["MagnetTextEncode"]().encode(te, "a\nb", 1)
    out = sample(N, model, cond, prompt_tokens=tokens)
    assert torch.equal(out["codes"][..., :25], tokens["codes"].expand(2, -1, -1))


def test_progress_every_step_and_cancel_leaves_the_model_usable(N, music, monkeypatch, pack):
    model, _, te = music
    cond, = N["MagnetTextEncode"]().encode(te, "x", 1)
    calls = []

    class Cancel(Exception):
        pass

    def check():
        calls.append(1)
        if len(calls) == 3:
            raise Cancel()
    monkeypatch.setattr(pack.nodes.comfy, "check_interrupt", check)
    with pytest.raises(Cancel):
        sample(N, model, cond)
    assert len(calls) == 3                    # stopped at the step that saw the cancel
    monkeypatch.setattr(pack.nodes.comfy, "check_interrupt", lambda: calls.append(1))
    calls.clear()
    sample(N, model, cond, decoding_steps="2,1,1,1")
    assert len(calls) == 5                    # one call per decoding step


def _error(pack):
    return pack.magnet.errors.MagnetError


@contextlib.contextmanager
def node_error(pack, node_type, pattern=""):
    """The node's MagnetError: starts with its display name and a colon, names it only there, then matches."""
    node = pack.NODE_DISPLAY_NAME_MAPPINGS[node_type]
    with pytest.raises(_error(pack)) as info:
        yield info
    msg = str(info.value)
    assert re.match(r"^" + re.escape(node) + r": \S", msg), msg
    assert msg.count(node) == 1, f"node name twice: {msg}"
    assert not re.search(r"from_pretrained|MagnetModel|MusicGenModel|Codec\.|model\.\w+\(|\w+=<", msg), \
        f"a Python call in a node's message: {msg}"
    assert re.search(pattern, msg[len(node) + 2:]), f"{pattern!r} not in {msg!r}"


def test_user_mistakes_name_the_node_input_and_the_fix(pack, N, music):
    model, codec, te = music
    cond, = N["MagnetTextEncode"]().encode(te, "x", 1)
    with node_error(pack, "MagnetSampler", "^decoding_steps .* one step count per codebook"):
        sample(N, model, cond, decoding_steps="20,10")
    with node_error(pack, "MagnetSampler", "^decoding_steps .*whole numbers"):
        sample(N, model, cond, decoding_steps="twenty")
    te_large, = N["MagnetTextEncoderLoader"]().load("t5-large", "auto")
    cond_large, = N["MagnetTextEncode"]().encode(te_large, "x", 1)
    with node_error(pack, "MagnetSampler", "width 1024.*t5-base"):
        sample(N, model, cond_large)
    _, audio_codec = N["MagnetModelLoader"]().load("magnet-audio", "auto", "auto")
    sfx_tokens, = N["MagnetEncodeAudio"]().encode(audio_codec, {"waveform": torch.zeros(1, 1, 8000),
                                                                "sample_rate": 16000}, 0, 0)
    with node_error(pack, "MagnetSampler", "^input `prompt_tokens` .*16000 Hz"):
        sample(N, model, cond, prompt_tokens=sfx_tokens)
    with node_error(pack, "MagnetDecodeAudio", "^input `tokens`"):
        N["MagnetDecodeAudio"]().decode(codec, sfx_tokens)
    regen = dict(seed=3, start=0.2, end=0.4, decoding_steps=STEPS, temperature=3.0, top_k=0, top_p=0.9,
                 max_cfg_coef=10.0, min_cfg_coef=1.0, span_arrangement="nonoverlap", span_scoring="max")
    with node_error(pack, "MagnetRegenerateRegion", "^input `tokens`"):
        N["MagnetRegenerateRegion"]().regenerate(model, cond, sfx_tokens, **regen)
    with node_error(pack, "MagnetEncodeAudio", "^input `start`"):
        N["MagnetEncodeAudio"]().encode(codec, {"waveform": torch.zeros(1, 1, 100), "sample_rate": 32000}, 5.0, 0)
    with node_error(pack, "MagnetEncodeAudio", "^input `audio` is not AUDIO"):
        N["MagnetEncodeAudio"]().encode(codec, torch.zeros(1, 1, 100), 0, 0)
    with node_error(pack, "MagnetLoudness", "^input `audio` has a waveform of shape"):
        N["MagnetLoudness"]().normalize({"waveform": torch.zeros(1, 1, 0), "sample_rate": 32000}, -14.0)
    with node_error(pack, "MagnetFitAudioLength", "^input `audio` has sample rate"):
        N["MagnetFitAudioLength"]().fit({"waveform": torch.zeros(1, 1, 10), "sample_rate": 0}, 1.0)
    with node_error(pack, "MagnetModelLoader", "^`release` 'nope' was not found"):
        N["MagnetModelLoader"]().load("nope", "auto", "auto")
    with node_error(pack, "MagnetModelLoader", "musicgen release.*MAGNeT MusicGen Loader"):
        N["MagnetModelLoader"]().load("musicgen", "auto", "auto")
    masked = dict(sfx_tokens, codes=torch.full((1, 4, 20), 2048), sample_rate=32000, card=codec.obj.card)
    with node_error(pack, "MagnetDecodeAudio", "^input `tokens` has code values outside"):
        N["MagnetDecodeAudio"]().decode(codec, masked)
    with node_error(pack, "MagnetRegenerateRegion", "^input `tokens`: codes must lie in"):
        N["MagnetRegenerateRegion"]().regenerate(model, cond, masked, **regen)


def test_user_errors_prefixes_exactly_once(pack):
    from magnet_node_pack.nodes.common import user_errors
    E = _error(pack)
    for inner in ("input `x` is bad: fix it.", "MAGNeT Sampler: input `x` is bad: fix it."):
        with pytest.raises(E) as info:
            with user_errors("MAGNeT Sampler"):
                with user_errors("MAGNeT Sampler"):
                    raise E(inner)
        assert str(info.value) == "MAGNeT Sampler: input `x` is bad: fix it."


def test_interrupts_and_other_errors_pass_through_unchanged(pack, monkeypatch):
    from magnet_node_pack.nodes import comfy
    from magnet_node_pack.nodes.common import user_errors

    class Interrupt(Exception):
        pass
    monkeypatch.setattr(comfy, "is_interrupt", lambda e: isinstance(e, Interrupt))
    for exc in (Interrupt("cancel"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with user_errors("MAGNeT Sampler"):
                raise exc


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_at_the_node_boundary_are_clear_errors(pack, N, music, bad):
    model, codec, te = music
    cond, = N["MagnetTextEncode"]().encode(te, "x", 1)
    audio = {"waveform": torch.zeros(1, 1, 3200), "sample_rate": 32000}
    with node_error(pack, "MagnetEncodeAudio", "^input `start` is"):
        N["MagnetEncodeAudio"]().encode(codec, audio, bad, 0.0)
    with node_error(pack, "MagnetEncodeAudio", "^input `length` is"):
        N["MagnetEncodeAudio"]().encode(codec, audio, 0.0, bad)
    with node_error(pack, "MagnetSampler", "^input `duration` is"):
        sample(N, model, cond, duration=bad)
    with node_error(pack, "MagnetSampler", "^input `overlap` is"):
        sample(N, model, cond, overlap=bad)
    with node_error(pack, "MagnetSampler", "^input `seed` is"):
        sample(N, model, cond, seed=bad)
    with node_error(pack, "MagnetSampler", "^input `temperature` is"):
        sample(N, model, cond, temperature=bad)
    with node_error(pack, "MagnetFitAudioLength", "^input `duration` is"):
        N["MagnetFitAudioLength"]().fit(audio, bad)
    with node_error(pack, "MagnetVideoDuration", "^input `fps` is"):
        N["MagnetVideoDuration"]().duration(images=torch.zeros(4, 8, 8, 3), fps=bad)
    long = sample(N, model, cond, duration=1.0)
    regen = dict(seed=3, start=0.2, end=bad, decoding_steps=STEPS, temperature=3.0, top_k=0, top_p=0.9,
                 max_cfg_coef=10.0, min_cfg_coef=1.0, span_arrangement="nonoverlap", span_scoring="max")
    with node_error(pack, "MagnetRegenerateRegion", "^input `end` is"):
        N["MagnetRegenerateRegion"]().regenerate(model, cond, long, **regen)


def test_fractional_seed_is_a_clear_error_and_whole_ones_work(pack, N, music):
    model, _, te = music
    cond, = N["MagnetTextEncode"]().encode(te, "x", 1)
    with node_error(pack, "MagnetSampler", "^input `seed` is 1.5"):
        sample(N, model, cond, seed=1.5)
    with node_error(pack, "MagnetSampler", "^input `seed` 'abc' must be a whole number"):
        sample(N, model, cond, seed="abc")
    two = sample(N, model, cond, seed=2, decoding_steps="2,1,1,1")["codes"]
    assert torch.equal(sample(N, model, cond, seed=2.0, decoding_steps="2,1,1,1")["codes"], two)  # from a link
    top = sample(N, model, cond, seed=0xFFFFFFFFFFFFFFFF, decoding_steps="2,1,1,1")["codes"]
    assert torch.equal(sample(N, model, cond, seed=-1, decoding_steps="2,1,1,1")["codes"], top)   # wraps


def test_a_device_this_machine_lacks_is_a_clear_error(pack, N, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with node_error(pack, "MagnetModelLoader", "^device 'cuda': this machine .*has no CUDA"):
        N["MagnetModelLoader"]().load("magnet-music", "cuda", "auto")
    with node_error(pack, "MagnetTextEncoderLoader", "^device 'cuda:1'"):
        N["MagnetTextEncoderLoader"]().load("t5-base", "cuda:1")
    with node_error(pack, "MagnetModelLoader", "^dtype 'fp8' is not a weight type"):
        N["MagnetModelLoader"]().load("magnet-music", "cpu", "fp8")


def test_unreadable_lazy_audio_is_a_clear_error(pack, N, music):
    _, codec, _ = music

    class NoTrack(Mapping):
        def __getitem__(self, k):
            raise RuntimeError("VHS failed to extract audio from clip.mp4")

        def __iter__(self):
            raise RuntimeError("VHS failed to extract audio")

        def __len__(self):
            return 2
    with node_error(pack, "MagnetEncodeAudio", "no audio track"):
        N["MagnetEncodeAudio"]().encode(codec, NoTrack(), 0, 0)


def test_video_duration_from_each_kind_of_input_and_exact_fit(N):
    class Video:
        def get_duration(self):
            return 2.5
    vd = N["MagnetVideoDuration"]()
    assert vd.duration(video=Video()) == (2.5,)
    assert vd.duration(images=torch.zeros(36, 8, 8, 3), fps=24.0) == (1.5,)
    assert vd.duration(video_info={"loaded_duration": 3.25, "loaded_fps": 8, "loaded_frame_count": 26}) == (3.25,)
    audio = {"waveform": torch.ones(1, 2, 1000), "sample_rate": 16000}
    for seconds in (0.1, 1.2345, 3.0):
        out, = N["MagnetFitAudioLength"]().fit(audio, seconds)
        assert out["waveform"].shape == (1, 2, round(seconds * 16000))


def test_sampler_goes_beyond_the_window_and_regenerate_keeps_the_rest(N, music):
    model, codec, te = music
    cond, = N["MagnetTextEncode"]().encode(te, "x", 1)
    window = model.obj.segment_duration
    long = sample(N, model, cond, duration=window * 2.5, overlap=0.5)
    assert long["codes"].shape[-1] == int(window * 2.5 * 50)
    regen = dict(seed=3, start=1.0, end=1.5, decoding_steps=STEPS, temperature=3.0, top_k=0, top_p=0.9,
                 max_cfg_coef=10.0, min_cfg_coef=1.0, span_arrangement="nonoverlap", span_scoring="max")
    out, = N["MagnetRegenerateRegion"]().regenerate(model, cond, long, **regen)
    a, b = 50, 75
    assert torch.equal(out["codes"][..., :a], long["codes"][..., :a])
    assert torch.equal(out["codes"][..., b:], long["codes"][..., b:])
    assert not torch.equal(out["codes"][..., a:b], long["codes"][..., a:b])


def test_clap_rank_keeps_the_best_clips_in_order_and_reports_scores(pack, N, tmp_path, monkeypatch):
    from tiny_clap import SR, tiny_clap
    tiny_clap(tmp_path / "larger_clap_music")
    monkeypatch.setenv("MAGNET_CLAP_DIR", str(tmp_path))
    assert N["MagnetClapLoader"].INPUT_TYPES()["required"]["clap"][0] == ["larger_clap_music"]
    clap, = N["MagnetClapLoader"]().load("larger_clap_music", "auto")
    g = torch.Generator().manual_seed(0)
    wav = torch.randn(4, 1, SR // 2, generator=g) * torch.tensor([0.05, 0.2, 0.1, 0.3]).view(4, 1, 1)
    out = N["MagnetClapRank"]().rank(clap, {"waveform": wav, "sample_rate": SR}, "a calm piano", 2)
    best, report = out["result"]
    ranking = clap.obj.rank(wav, SR, "a calm piano")
    assert torch.equal(best["waveform"], wav[ranking.order[:2]])
    assert report.count("CLAP") == 4 and report.count("(kept)") == 2 and out["ui"]["text"] == [report]
    with node_error(pack, "MagnetClapRank", "^input `text` is empty"):
        N["MagnetClapRank"]().rank(clap, {"waveform": wav, "sample_rate": SR}, "  ", 1)


def test_ar_prompt_then_sampler_keeps_musicgens_seconds(N, music):
    model, _, te = music
    ar, = N["MagnetMusicGenLoader"]().load("musicgen", "auto", "auto")
    cond, = N["MagnetTextEncode"]().encode(te, "80s pop", 1)
    prompt, = N["MagnetARPrompt"]().generate(ar, model, cond, 4, 0.5, 1.0, 250, 0.0, 3.0)
    assert prompt["codes"].shape == (1, 4, 25)
    out = sample(N, model, cond, prompt_tokens=prompt)
    assert torch.equal(out["codes"][..., :25], prompt["codes"])


def test_rescorer_weight_zero_is_exactly_unrescored(N, music):
    model, _, te = music
    ar, = N["MagnetMusicGenLoader"]().load("musicgen", "auto", "auto")
    cond, = N["MagnetTextEncode"]().encode(te, "x", 1)
    plain = sample(N, model, cond, seed=9)
    r0, = N["MagnetRescorer"]().build(ar, 0.0, 3.0)
    assert torch.equal(sample(N, model, cond, seed=9, rescorer=r0)["codes"], plain["codes"])
    r1, = N["MagnetRescorer"]().build(ar, 1.0, 3.0)
    assert sample(N, model, cond, seed=9, rescorer=r1)["codes"].shape == plain["codes"].shape


def test_musicgen_with_a_mismatched_magnet_names_both(pack, N):
    ar, = N["MagnetMusicGenLoader"]().load("musicgen", "auto", "auto")
    sfx, _ = N["MagnetModelLoader"]().load("magnet-audio", "auto", "auto")
    te, = N["MagnetTextEncoderLoader"]().load("t5-large", "auto")
    cond, = N["MagnetTextEncode"]().encode(te, "x", 1)
    with node_error(pack, "MagnetARPrompt", "magnet-audio.*musicgen|musicgen.*magnet-audio"):
        N["MagnetARPrompt"]().generate(ar, sfx, cond, 0, 0.5, 1.0, 250, 0.0, 3.0)
    r, = N["MagnetRescorer"]().build(ar, 0.5, 3.0)
    with node_error(pack, "MagnetSampler", "magnet-audio"):
        sample(N, sfx, cond, rescorer=r)
    with node_error(pack, "MagnetRescorer", "^input `weight`"):
        N["MagnetRescorer"]().build(ar, 1.5, 3.0)
    with node_error(pack, "MagnetARPrompt", "^input `seconds` is"):
        N["MagnetARPrompt"]().generate(ar, sfx, cond, 0, math.nan, 1.0, 250, 0.0, 3.0)
    with node_error(pack, "MagnetMusicGenLoader", "MAGNeT release.*MAGNeT Model Loader"):
        N["MagnetMusicGenLoader"]().load("magnet-music", "auto", "auto")


def test_auto_decoding_steps_are_the_releases_own_and_numbers_win(N, music, monkeypatch, pack):
    model, _, te = music
    cond, = N["MagnetTextEncode"]().encode(te, "x", 1)
    calls = []
    monkeypatch.setattr(pack.nodes.comfy, "check_interrupt", lambda: calls.append(1))
    sample(N, model, cond, decoding_steps="auto", duration=0.3)
    assert len(calls) == 60 + 10 + 10 + 10            # this fixture stores 60,10,10,10 (like the 30 s releases)
    calls.clear()
    sample(N, model, cond, decoding_steps=" 3, 2,2,2 ", duration=0.3)
    assert len(calls) == 9
    sfx, _ = N["MagnetModelLoader"]().load("magnet-audio", "auto", "auto")
    te_large, = N["MagnetTextEncoderLoader"]().load("t5-large", "auto")
    cond_large, = N["MagnetTextEncode"]().encode(te_large, "x", 1)
    calls.clear()
    sample(N, sfx, cond_large, decoding_steps="auto", duration=0.3)
    assert len(calls) == 20 + 10 + 10 + 10            # audio-magnet: 20,10,10,10


def test_fast_switch_caps_the_later_codebooks_steps(N, music, monkeypatch, pack):
    model, _, te = music
    cond, = N["MagnetTextEncode"]().encode(te, "x", 1)
    calls = []
    monkeypatch.setattr(pack.nodes.comfy, "check_interrupt", lambda: calls.append(1))
    exact = sample(N, model, cond, seed=2, decoding_steps="4,8,8,8")
    assert len(calls) == 28
    calls.clear()
    fast = sample(N, model, cond, seed=2, decoding_steps="4,8,8,8", fast=True)
    assert len(calls) == 4 + 5 + 5 + 5            # fast mode: at most 5 steps for codebooks >= 1
    assert fast["codes"].shape == exact["codes"].shape


def test_regenerate_region_has_the_fast_switch(N, music, monkeypatch, pack):
    model, _, te = music
    spec = N["MagnetRegenerateRegion"].INPUT_TYPES()["optional"]["fast"]
    assert spec == N["MagnetSampler"].INPUT_TYPES()["optional"]["fast"] and spec[1]["tooltip"]
    cond, = N["MagnetTextEncode"]().encode(te, "x", 1)
    clip = sample(N, model, cond, duration=2.0)
    regen = dict(seed=3, start=0.5, end=1.0, decoding_steps="4,8,8,8", temperature=3.0, top_k=0, top_p=0.9,
                 max_cfg_coef=10.0, min_cfg_coef=1.0, span_arrangement="nonoverlap", span_scoring="max")
    calls = []
    monkeypatch.setattr(pack.nodes.comfy, "check_interrupt", lambda: calls.append(1))
    N["MagnetRegenerateRegion"]().regenerate(model, cond, clip, **regen)
    assert len(calls) == 4 + 8 + 8 + 8
    calls.clear()
    out, = N["MagnetRegenerateRegion"]().regenerate(model, cond, clip, fast=True, **regen)
    assert len(calls) == 4 + 5 + 5 + 5            # fast mode: at most 5 steps for codebooks >= 1
    assert torch.equal(out["codes"][..., :25], clip["codes"][..., :25])


# -- the sampling widgets: one group, shared by every node that samples MAGNeT -------------------------------

SAMPLERS = {"MagnetSampler": "sample", "MagnetRegenerateRegion": "regenerate", "MagnetAudioToAudio": "vary",
            "MagnetSeamlessLoop": "loop"}


def _own_inputs(node, tokens):
    """A sampling node's own inputs besides model, conditioning and seed (valid ones)."""
    return {"MagnetSampler": dict(duration=1.0, overlap=0.0),
            "MagnetRegenerateRegion": dict(tokens=tokens, start=0.3, end=0.6),
            "MagnetAudioToAudio": dict(tokens=tokens, strength=0.5, keep_codebooks=0),
            "MagnetSeamlessLoop": dict(duration=0.6, bars=1, bpm=120.0, beats_per_bar=4)}[node]


class FieldsModel:
    """A stand-in model that hands back the SamplingParams fields a node asks for."""

    class Asked(Exception):
        pass

    def __init__(self, stop=False):
        self.stop = stop

    def sampling_params(self, **fields):
        if self.stop:
            raise self.Asked(fields)
        return fields


def test_every_sampling_node_has_the_one_seed_and_the_sampling_widgets_last_in_one_order(pack, N):
    widgets = list(pack.nodes.common.SAMPLING_WIDGETS)
    assert widgets[:9] == ["decoding_steps", "temperature", "top_k", "top_p", "max_cfg_coef", "min_cfg_coef",
                           "span_arrangement", "span_scoring", "fast"]     # saved workflows map values by position
    # the nodes that run MAGNeT's decoding (AR Prompt's temperature, top_k and top_p are MusicGen's own)
    having = {name for name, cls in N.items() if "decoding_steps" in {n for n, _, _ in widget_inputs(cls)}}
    assert having == set(SAMPLERS)
    seed = pack.nodes.common.seed_input()
    for node in SAMPLERS:
        names = [n for n, _, _ in widget_inputs(N[node])]
        assert names[-len(widgets):] == widgets, node
        assert N[node].INPUT_TYPES()["required"]["seed"][0] == seed[0]
        assert {k: v for k, v in N[node].INPUT_TYPES()["required"]["seed"][1].items() if k != "tooltip"} == \
            {k: v for k, v in seed[1].items() if k != "tooltip"}, node


def test_a_new_sampling_widget_is_one_edit_and_reaches_every_sampling_node(pack, N, monkeypatch):
    common = pack.nodes.common
    monkeypatch.setitem(common.SAMPLING_WIDGETS, "anneal_temp",
                        ("BOOLEAN", {"default": True, "tooltip": "anneal the temperature within each codebook"}))
    model = common.Handle(FieldsModel(stop=True), "stand-in")
    tokens = {"codes": torch.zeros(1, 4, 50, dtype=torch.long), "n_q": 4, "card": 2048, "sample_rate": 32000}
    for node, method in SAMPLERS.items():
        assert [n for n, _, _ in widget_inputs(N[node])][-1] == "anneal_temp", node
        with pytest.raises(FieldsModel.Asked) as asked:
            getattr(N[node](), method)(model=model, conditioning=None, seed=0, anneal_temp=0, top_p=0.5,
                                       span_scoring="release", **_own_inputs(node, tokens))
        assert asked.value.args[0] == {"anneal_temp": False, "top_p": 0.5, "span_scoring": None}, node


def test_the_widgets_defaults_are_the_releases_own_and_typed_values_win(pack, N, music):
    common = pack.nodes.common
    defaults = {name: entry[1]["default"] for name, entry in common.SAMPLING_WIDGETS.items()}
    own = common.sampling_params(FieldsModel(), **defaults)
    assert own == dict(decoding_steps="auto", temperature=None, top_k=None, top_p=None, max_cfg_coef=None,
                       min_cfg_coef=None, span_arrangement=None, span_scoring=None, fast=False)
    assert common.sampling_params(FieldsModel()) == {}            # a widget left out: the release's own too
    typed = common.sampling_params(FieldsModel(), temperature=0.0, top_k=0, max_cfg_coef=1, span_arrangement="stride1")
    assert typed == dict(temperature=0.0, top_k=0, max_cfg_coef=1, span_arrangement="stride1")   # 0 is a value

    def settings(p):
        return (p.temperature, p.top_k, p.top_p, p.max_cfg_coef, p.min_cfg_coef, p.span_arrangement, p.span_scoring)
    sfx, _ = N["MagnetModelLoader"]().load("magnet-audio", "auto", "auto")
    assert settings(common.sampling_params(sfx.obj, **defaults)) == (3.5, 0, 0.8, 20.0, 1.0, "nonoverlap", "max")
    assert settings(common.sampling_params(music[0].obj, **defaults)) == (3.0, 0, 0.9, 10.0, 1.0, "nonoverlap", "max")
    mixed = common.sampling_params(sfx.obj, **{**defaults, "temperature": 2.0, "top_k": 5, "span_scoring": "prod"})
    assert settings(mixed) == (2.0, 5, 0.8, 20.0, 1.0, "nonoverlap", "prod")


def test_the_sound_effect_release_samples_with_its_own_settings_by_default(N):
    sfx, _ = N["MagnetModelLoader"]().load("magnet-audio", "auto", "auto")
    te, = N["MagnetTextEncoderLoader"]().load("t5-large", "auto")
    cond, = N["MagnetTextEncode"]().encode(te, "rain on a tin roof", 1)
    run = dict(seed=4, duration=1.0, overlap=0.0, decoding_steps=STEPS)
    own = N["MagnetSampler"]().sample(sfx, cond, **run)[0]["codes"]
    stored = dict(temperature=3.5, top_k=0, top_p=0.8, max_cfg_coef=20.0, min_cfg_coef=1.0,
                  span_arrangement="nonoverlap", span_scoring="max")
    assert torch.equal(N["MagnetSampler"]().sample(sfx, cond, **run, **stored)[0]["codes"], own)
    music_values = dict(stored, temperature=3.0, top_p=0.9, max_cfg_coef=10.0)
    assert not torch.equal(N["MagnetSampler"]().sample(sfx, cond, **run, **music_values)[0]["codes"], own)


@pytest.mark.parametrize("name,value", [("temperature", -0.5), ("top_k", -2), ("max_cfg_coef", -3.0)])
def test_a_negative_setting_other_than_minus_one_is_refused(pack, N, music, name, value):
    model, _, te = music
    cond, = N["MagnetTextEncode"]().encode(te, "x", 1)
    with node_error(pack, "MagnetSampler", rf"^input `{name}` is {value:g}: use -1 for the release's own"):
        sample(N, model, cond, **{name: value})


def test_the_seed_in_the_tokens_is_the_one_the_engine_returns(pack, N, music, monkeypatch):
    model, codec, te = music
    m = model.obj
    cond, = N["MagnetTextEncode"]().encode(te, "x", 1)
    # the nodes take the seed from the engine's result, never from the model's last_seed
    monkeypatch.setattr(type(m), "last_seed", property(lambda self: pytest.fail("a node read last_seed"),
                                                       lambda self, value: None), raising=False)
    clip = sample(N, model, cond, seed=5, duration=1.2, decoding_steps="2,1,1,1")
    assert clip["seed"] == 5
    light = dict(decoding_steps="2,1,1,1")
    for node, method in SAMPLERS.items():
        out, = getattr(N[node](), method)(model=model, conditioning=cond, seed=11, **light,
                                          **_own_inputs(node, clip))
        assert out["seed"] == 11, node
    Generated = pack.magnet.model.Generated
    real = m.generate_from_condition
    monkeypatch.setattr(m, "generate_from_condition", lambda *a, **k: Generated(real(*a, **k).codes, 4242))
    assert sample(N, model, cond, seed=5, decoding_steps="2,1,1,1")["seed"] == 4242


# -- bad inputs at the boundary of the loop and timeline nodes ------------------------------------------------

def test_decode_loop_refuses_empty_tokens_and_absurd_repeats_naming_the_node(pack, N, music):
    _, codec, _ = music
    c = codec.obj

    def tokens(codes, **extra):
        return {"codes": codes, "n_q": c.n_q, "card": c.card, "sample_rate": c.sample_rate, **extra}
    for codes in (torch.zeros(0, c.n_q, 20, dtype=torch.long), torch.zeros(1, c.n_q, 0, dtype=torch.long)):
        with node_error(pack, "MagnetDecodeLoop", r"\S"):
            N["MagnetDecodeLoop"]().decode(codec, tokens(codes, loop_duration=0.4), 2)
    loop = tokens(torch.randint(0, c.card, (1, c.n_q, 20)), loop_duration=0.4)
    with node_error(pack, "MagnetDecodeLoop", "repeats"):
        N["MagnetDecodeLoop"]().decode(codec, loop, 10 ** 7)
    with node_error(pack, "MagnetDecodeLoop", "^input `repeats` 2.5 must be a whole number"):
        N["MagnetDecodeLoop"]().decode(codec, loop, 2.5)
    with node_error(pack, "MagnetDecodeLoop", "^input `repeats` is nan"):
        N["MagnetDecodeLoop"]().decode(codec, loop, math.nan)
    once, twice = N["MagnetDecodeLoop"]().decode(codec, loop, 2)
    assert twice["waveform"].shape[-1] == 2 * once["waveform"].shape[-1] == 2 * round(0.4 * c.sample_rate)
    assert torch.equal(twice["waveform"], once["waveform"].repeat(1, 1, 2))


@pytest.mark.parametrize("timeline", ["0:00 a\n1:30,5 drums", "0:00 a\n0:00:01:12 b"])
def test_prompt_timeline_refuses_a_misread_time_naming_the_node(pack, N, music, timeline):
    _, _, te = music
    with node_error(pack, "MagnetPromptTimeline", re.escape(timeline.splitlines()[1].split()[0])):
        N["MagnetPromptTimeline"]().encode(te, timeline)
