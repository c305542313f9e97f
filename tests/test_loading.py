"""Loading releases: other architectures, the converted single file, and clear errors for bad files."""
import os
import pickle
import shutil

import pytest
import torch

from conftest import make_release
from magnet import MagnetModel
from magnet.checkpoints import convert_release
from magnet.errors import MagnetError

STEPS = (3, 2, 2, 2)


def _load(path, ref, **kw):
    return MagnetModel.from_pretrained(path, text_encoder=kw.pop("text_encoder", ref / "t5-base"), device="cpu", **kw)


@pytest.mark.parametrize("arch", [
    dict(dim=48, num_heads=3, num_layers=3, hidden_scale=2, subcodes_context=3, segment_duration=1),
    dict(dim=96, num_heads=8, num_layers=1, hidden_scale=4, span_len=2, segment_duration=3),
    dict(dim=32, num_heads=2, num_layers=2, bias_ff=True, bias_attn=True, bias_proj=True, subcodes_context=-1),
])
def test_any_architecture_from_xp_cfg_loads_and_generates(ref, tmp_path, arch):
    rel = make_release(ref / "magnet-music", tmp_path / "rel", **dict(arch))
    model = _load(rel, ref)
    assert model.cfg.dim == arch["dim"] and model.cfg.num_layers == arch["num_layers"]
    seg = arch.get("segment_duration", 2)
    assert model.segment_duration == seg
    for arrangement in ("nonoverlap", "stride1"):
        codes = model.generate(["a", "b"], seed=0, decoding_steps=STEPS, span_arrangement=arrangement)
        L = model.cfg.span_len
        T = seg * 50
        assert codes.shape == (2, 4, T - T % L if arrangement == "nonoverlap" else T)
    assert model.decode(codes).shape[0] == 2


def test_band_attention_limits_context_for_stages_after_the_first(ref, tmp_path):
    """Changing a frame far outside the band must not change stage >= 1 logits nearby; stage 0 sees it."""
    rel = make_release(ref / "magnet-music", tmp_path / "rel", subcodes_context=2)
    model = _load(rel, ref)
    cond = model.encode_text(["x"])
    mem = model.lm.memory(cond.hidden, cond.mask)
    codes = torch.randint(0, 64, (1, 4, 40))
    other = codes.clone()
    other[..., 30] = (other[..., 30] + 1) % 64
    with torch.inference_mode():
        for stage in range(4):
            a, b = model.lm(codes, mem, stage=stage), model.lm(other, mem, stage=stage)
            far = (a[..., :25, :] - b[..., :25, :]).abs().max().item()
            near = (a[..., 28:33, :] - b[..., 28:33, :]).abs().max().item()
            assert near > 0
            if stage == 0:
                assert far > 0
            else:
                # two layers of a band of 2 reach 4 frames: frame 30 cannot influence frames < 26
                assert far == 0


def test_converted_safetensors_gives_identical_outputs(ref, golden, golden_cfg, tmp_path, music_model):
    out = convert_release(ref / "magnet-music", tmp_path / "music.safetensors")
    assert out.exists() and not list(tmp_path.glob("*.partial"))
    conv = _load(out, ref)
    assert conv.cfg == music_model.cfg and conv.sample_rate == music_model.sample_rate
    for k, v in music_model.lm.state_dict().items():
        assert torch.equal(conv.lm.state_dict()[k], v), k
    kw = dict(decoding_steps=golden_cfg["decoding_steps"], use_sampling=False)
    a = music_model.generate(["techno"], **kw)
    b = conv.generate(["techno"], **kw)
    assert torch.equal(a, b)
    assert torch.equal(conv.decode(a), music_model.decode(a))
    assert torch.equal(conv.encode(golden["music.sine_wav"], 32000), golden["music.sine_codes"])
    s1 = music_model.generate(["techno"], seed=5, decoding_steps=STEPS)
    assert torch.equal(s1, conv.generate(["techno"], seed=5, decoding_steps=STEPS))


def test_converted_pointer_release_embeds_the_codec(ref, golden, tmp_path):
    rel = tmp_path / "rel"
    rel.mkdir()
    shutil.copy(ref / "magnet-music" / "state_dict.bin", rel)
    shutil.copy(ref / "pointer" / "compression_state_dict.bin", rel)
    out = convert_release(rel, tmp_path / "out" / "m.safetensors", codec_dir=ref / "encodec_32khz")
    model = _load(out, ref)
    wav = model.decode(golden["music.greedy.nonoverlap.max"])
    assert (wav - golden["pointer.decoded_wav"]).abs().max().item() <= 1e-5


# -- errors -----------------------------------------------------------------------------------------

def _copy_release(ref, tmp_path, name="magnet-music"):
    rel = tmp_path / name
    shutil.copytree(ref / name, rel)
    return rel


def test_missing_release_folder_names_it(ref, tmp_path):
    with pytest.raises(MagnetError, match="release not found"):
        _load(tmp_path / "nope", ref)


def test_folder_without_lm_file_names_the_files_expected(ref, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MagnetError, match="state_dict.bin"):
        _load(tmp_path / "empty", ref)


@pytest.mark.parametrize("which", ["state_dict.bin", "compression_state_dict.bin"])
def test_truncated_file_is_a_clear_error(ref, tmp_path, which):
    rel = _copy_release(ref, tmp_path)
    data = (rel / which).read_bytes()
    (rel / which).write_bytes(data[: len(data) // 2])
    with pytest.raises(MagnetError, match="(?i)truncated or corrupt.*download"):
        _load(rel, ref)


def test_corrupt_file_is_a_clear_error(ref, tmp_path):
    rel = _copy_release(ref, tmp_path)
    (rel / "state_dict.bin").write_bytes(b"not a checkpoint at all" * 100)
    with pytest.raises(MagnetError, match="truncated or corrupt"):
        _load(rel, ref)


def test_empty_file_is_a_clear_error(ref, tmp_path):
    rel = _copy_release(ref, tmp_path)
    (rel / "state_dict.bin").write_bytes(b"")
    with pytest.raises(MagnetError, match="empty"):
        _load(rel, ref)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['MAGNET_TEST_MARKER']}",))


def test_pickle_that_carries_code_is_refused_and_not_run(ref, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("MAGNET_TEST_MARKER", str(marker))
    rel = _copy_release(ref, tmp_path)
    pkg = torch.load(rel / "state_dict.bin", weights_only=True)
    pkg["payload"] = _Evil()
    with open(rel / "state_dict.bin", "wb") as f:
        torch.save(pkg, f, pickle_module=pickle)
    with pytest.raises(MagnetError, match="could run code"):
        _load(rel, ref)
    assert not marker.exists()


def test_codec_that_does_not_match_the_lm_is_refused(ref, tmp_path):
    rel = make_release(ref / "magnet-music", tmp_path / "rel", card=32)
    with pytest.raises(MagnetError, match="codebooks of 64 entries.*expects 4 of 32"):
        _load(rel, ref)
    rel = make_release(ref / "magnet-music", tmp_path / "rel2", n_q=3)
    with pytest.raises(MagnetError, match="expects 3 of 64"):
        _load(rel, ref)


def test_text_encoder_of_the_wrong_width_is_refused(ref):
    with pytest.raises(MagnetError, match="width 1024.*expects 768.*t5-base"):
        _load(ref / "magnet-music", ref, text_encoder=ref / "t5-large")


def test_text_encoder_folder_errors_name_the_fix(ref, tmp_path):
    with pytest.raises(MagnetError, match="text encoder folder not found"):
        _load(ref / "magnet-music", ref, text_encoder=tmp_path / "t5-base")
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text("{}")
    with pytest.raises(MagnetError, match="model.safetensors"):
        _load(ref / "magnet-music", ref, text_encoder=tmp_path / "t5")


def test_text_encoder_is_found_beside_the_release(ref, music_model):
    model = MagnetModel.from_pretrained(ref / "magnet-audio", device="cpu")
    assert model.text_encoder.folder.name == "t5-large"


def test_generation_without_text_encoder_says_what_to_pass(ref, tmp_path):
    rel = _copy_release(ref, tmp_path)          # no t5-base beside the copy
    model = MagnetModel.from_pretrained(rel, device="cpu")
    assert model.text_encoder is None
    with pytest.raises(MagnetError, match="text_encoder="):
        model.generate(["x"])


def test_unsupported_release_features_are_named(ref, tmp_path):
    rel = _copy_release(ref, tmp_path)
    pkg = torch.load(rel / "state_dict.bin", weights_only=True)
    pkg["xp.cfg"] = pkg["xp.cfg"].replace("positional_embedding: sin", "positional_embedding: rope")
    torch.save(pkg, rel / "state_dict.bin")
    with pytest.raises(MagnetError, match="positional_embedding"):
        _load(rel, ref)


def test_safetensors_file_that_is_not_a_release_is_refused(ref, tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(MagnetError, match="not a converted MAGNeT release"):
        _load(tmp_path / "other.safetensors", ref)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(MagnetError, match="corrupt|could not be read"):
        _load(tmp_path / "bad.safetensors", ref)


# -- the release formats and the generation settings a release stores --------------------------------

def test_one_format_table_decides_what_a_path_is_its_kind_and_its_name(ref, tmp_path):
    from magnet import checkpoints, hub
    from magnet.checkpoints import CONVERTED, OFFICIAL, release_format, release_kind, release_label
    conv = convert_release(ref / "musicgen", tmp_path / "mg.safetensors")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.bin").write_bytes(b"x")
    cases = {ref / "magnet-music": (OFFICIAL, "magnet", "magnet-music"),
             ref / "musicgen": (OFFICIAL, "musicgen", "musicgen"),
             conv: (CONVERTED, "musicgen", "mg"),
             tmp_path / "empty": (None, None, "empty"),
             tmp_path / "notes.bin": (None, None, "notes.bin")}
    for path, (fmt, kind, name) in cases.items():
        assert release_format(path) is fmt and release_kind(path) == kind and release_label(path) == name, path
        if fmt is not None:
            assert checkpoints.load_release(path).lm_config.kind == kind
    assert checkpoints.RELEASE_FORMATS == (OFFICIAL, CONVERTED)
    assert set(OFFICIAL.files) <= set(hub.PATTERNS["release"])     # a download fetches what the format is


def test_a_file_in_no_release_format_is_refused_naming_both_formats(ref, tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(MagnetError, match=r"not a release: .*state_dict\.bin.*\.safetensors"):
        _load(tmp_path / "model.ckpt", ref)


def test_every_stored_generation_setting_is_kept_in_both_formats(ref, tmp_path, audio_model):
    stored = {"temp": 3.5, "top_k": 0, "top_p": 0.8, "max_cfg_coef": 20.0, "min_cfg_coef": 1.0,
              "decoding_steps": [20, 10, 10, 10], "span_arrangement": "nonoverlap", "span_scoring": "max"}
    assert audio_model.generation_defaults == stored
    conv = _load(convert_release(ref / "magnet-audio", tmp_path / "a.safetensors"), ref,
                 text_encoder=ref / "t5-large")
    assert conv.generation_defaults == stored


@pytest.mark.parametrize("key, bad", [
    ("temp", "hot"), ("temp", float("nan")), ("temp", -1.0), ("temp", True), ("temp", 10 ** 400), ("top_k", 2.5),
    ("top_k", [1]), ("top_p", 1.5), ("max_cfg_coef", None), ("min_cfg_coef", {"a": 1}),
    ("decoding_steps", [20, 0, 10, 10]), ("decoding_steps", "20,10,10,10"), ("decoding_steps", []),
    ("span_arrangement", "diagonal"), ("span_scoring", 1)])
def test_a_stored_generation_setting_of_the_wrong_type_is_left_out_not_fatal(key, bad):
    from magnet.checkpoints import _generation_defaults
    good = {"temp": 3.0, "top_k": 0, "top_p": 0.9, "max_cfg_coef": 10, "min_cfg_coef": 1,
            "decoding_steps": [60, 10, 10, 10], "span_arrangement": "stride1", "span_scoring": "prod"}
    got = _generation_defaults({"generate": {"lm": {**good, key: bad, "use_sampling": True}}})
    assert key not in got and got == {k: v for k, v in good.items() if k != key}
    assert isinstance(got["max_cfg_coef"] if key != "max_cfg_coef" else got["temp"], float)
    for damaged in ({}, {"generate": None}, {"generate": {"lm": "temp: 3"}}, {"generate": []}):
        assert _generation_defaults(damaged) == {}


def _with_xp(src, dst, edit):
    """A copy of release `src` whose xp.cfg was changed by `edit(xp)`."""
    import yaml
    from magnet.checkpoints import parse_xp_cfg
    dst.mkdir(parents=True)
    shutil.copy(src / "compression_state_dict.bin", dst / "compression_state_dict.bin")
    pkg = torch.load(src / "state_dict.bin", weights_only=True)
    xp = parse_xp_cfg(pkg["xp.cfg"], "fixture")
    edit(xp)
    torch.save({**pkg, "xp.cfg": yaml.safe_dump(xp)}, dst / "state_dict.bin")
    return dst


def test_what_a_release_is_and_its_training_dropout_are_read_once_at_load_and_kept_by_convert(
        ref, tmp_path, music_model, audio_model, monkeypatch):
    assert (music_model.content, music_model.training_defaults) == ("music", {"dropout": 0.3})
    assert (audio_model.content, audio_model.training_defaults) == ("sound", {"dropout": 0.1})
    # an unusual stored dropout and kind are the release's, in both formats; training reads no file for them
    odd = _with_xp(ref / "magnet-music", tmp_path / "odd", lambda xp: (
        xp["classifier_free_guidance"].update(training_dropout=0.25), xp.update(solver="audio_magnet")))
    m = _load(odd, ref)
    conv = _load(convert_release(odd, tmp_path / "odd.safetensors"), ref)
    for model in (m, conv):
        assert (model.content, model.training_defaults) == ("sound", {"dropout": 0.25})
    from magnet import train
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("the release was read again"))
    assert train.release_training(m) == {"dropout": 0.25, "span_len": m.cfg.span_len}


@pytest.mark.parametrize("dropout", ["high", None, 1.0, -0.1, float("nan"), [0.2]])
def test_an_unusable_stored_dropout_or_unknown_solver_falls_back_to_the_kind_of_release(ref, tmp_path, dropout):
    def edit(xp):
        xp["classifier_free_guidance"]["training_dropout"] = dropout
        xp["solver"] = "something_else"
    m = _load(_with_xp(ref / "magnet-audio", tmp_path / "r", edit), ref, text_encoder=ref / "t5-large")
    assert (m.content, m.training_defaults) == ("sound", {"dropout": 0.1})     # from its t5-large


def test_a_file_converted_before_it_kept_the_release_settings_gets_its_kinds(ref, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    new = convert_release(ref / "magnet-audio", tmp_path / "a.safetensors")
    with safe_open(str(new), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k not in ("training", "content")}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    m = _load(tmp_path / "old.safetensors", ref, text_encoder=ref / "t5-large")
    assert (m.content, m.training_defaults) == ("sound", {"dropout": 0.1})
