"""EnCodec through transformers: parity with the reference fixtures, the pointer form, clear errors."""
import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from magnet.codec import CODEC_DIR_ENV, Codec
from magnet.errors import MagnetError

# `ref` (the ../shared/reference folder; skip, or fail on CI, when missing) and `golden` come from conftest.py


@pytest.fixture(scope="module")
def music_codec(ref):
    return Codec.from_release_file(ref / "magnet-music" / "compression_state_dict.bin")


@pytest.fixture(scope="module")
def audio_codec(ref):
    return Codec.from_release_file(ref / "magnet-audio" / "compression_state_dict.bin")


@pytest.fixture
def no_codec_env(monkeypatch):
    monkeypatch.delenv(CODEC_DIR_ENV, raising=False)


def _pointer_copy(ref: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    return Path(shutil.copy(ref / "pointer" / "compression_state_dict.bin", folder))


# --- parity with the reference ---------------------------------------------------------------

def test_decode_matches_reference_music(music_codec, golden):
    wav = music_codec.decode(golden["music.greedy.nonoverlap.max"])
    assert wav.dtype == torch.float32 and wav.shape == golden["music.decoded_wav"].shape
    assert (wav - golden["music.decoded_wav"]).abs().max() <= 1e-5


def test_decode_matches_reference_audio(audio_codec, golden):
    wav = audio_codec.decode(golden["audio.greedy.nonoverlap.max"])
    assert wav.shape == golden["audio.decoded_wav"].shape
    assert (wav - golden["audio.decoded_wav"]).abs().max() <= 1e-5


def test_encode_matches_reference_sine_codes(music_codec, golden):
    codes = music_codec.encode(golden["music.sine_wav"])
    assert codes.dtype == torch.long
    assert torch.equal(codes, golden["music.sine_codes"])


def test_encode_matches_reference_chirp_codes(audio_codec, golden):
    assert torch.equal(audio_codec.encode(golden["audio.chirp_wav"]), golden["audio.chirp_codes"])


def test_codec_numbers_come_from_xp_cfg(music_codec, audio_codec):
    assert (music_codec.sample_rate, audio_codec.sample_rate) == (32000, 16000)
    assert music_codec.frame_rate == audio_codec.frame_rate == 50
    assert isinstance(music_codec.frame_rate, int)
    assert (music_codec.channels, music_codec.n_q, music_codec.card) == (1, 4, 64)
    assert music_codec.model.config.upsampling_ratios == [8, 5, 4, 4]
    assert audio_codec.model.config.upsampling_ratios == [8, 5, 4, 2]


# --- the pointer form ------------------------------------------------------------------------

def test_pointer_codec_found_beside_release(ref, golden, no_codec_env):
    codec = Codec.from_release_file(ref / "pointer" / "compression_state_dict.bin")
    wav = codec.decode(golden["music.greedy.nonoverlap.max"])
    assert (wav - golden["pointer.decoded_wav"]).abs().max() <= 1e-5
    assert torch.equal(codec.encode(golden["music.sine_wav"]), golden["pointer.sine_codes"])


def test_pointer_codec_found_in_search_dirs(ref, tmp_path, no_codec_env):
    release = _pointer_copy(ref, tmp_path / "models" / "magnet-small")
    codec = Codec.from_release_file(release, search_dirs=[ref])
    assert codec.sample_rate == 32000


def test_pointer_codec_found_beside_symlinked_release(ref, tmp_path, no_codec_env):
    # the Hugging Face cache layout: the release file is a symlink into a blob store
    blob = _pointer_copy(ref, tmp_path / "blobs")
    (tmp_path / "models" / "magnet-small").mkdir(parents=True)
    (tmp_path / "models" / "magnet-small" / "compression_state_dict.bin").symlink_to(blob)
    shutil.copytree(ref / "encodec_32khz", tmp_path / "models" / "encodec_32khz")
    codec = Codec.from_release_file(tmp_path / "models" / "magnet-small" / "compression_state_dict.bin")
    assert codec.sample_rate == 32000


def test_pointer_codec_dir_argument_and_env_var(ref, tmp_path, monkeypatch, no_codec_env):
    release = _pointer_copy(ref, tmp_path / "release")
    assert Codec.from_release_file(release, codec_dir=ref / "encodec_32khz").n_q == 4
    monkeypatch.setenv(CODEC_DIR_ENV, str(ref))  # a folder holding encodec_32khz works too
    assert Codec.from_release_file(release).n_q == 4


def test_pointer_codec_missing_names_folders_searched(ref, tmp_path, no_codec_env):
    release = _pointer_copy(ref, tmp_path / "models" / "magnet-small")
    elsewhere = tmp_path / "elsewhere"
    with pytest.raises(MagnetError) as err:
        Codec.from_release_file(release, search_dirs=[elsewhere])
    message = str(err.value)
    for folder in (release.parent, release.parent.parent, elsewhere):
        assert str(folder) in message
    assert "encodec_32khz" in message and "python -m magnet download encodec_32khz" in message


def test_pointer_codec_wrong_codec_dir_is_a_clear_error(ref, tmp_path, no_codec_env):
    with pytest.raises(MagnetError, match="is a transformers EnCodec folder"):
        Codec.from_release_file(ref / "pointer" / "compression_state_dict.bin", codec_dir=tmp_path)


def test_transformers_folder_without_safetensors_is_a_clear_error(ref, tmp_path, no_codec_env):
    release = _pointer_copy(ref, tmp_path / "release")
    (tmp_path / "encodec_32khz").mkdir()
    shutil.copy(ref / "encodec_32khz" / "config.json", tmp_path / "encodec_32khz")
    with pytest.raises(MagnetError, match="lacks model.safetensors"):
        Codec.from_release_file(release)


# --- bad files -------------------------------------------------------------------------------

def test_truncated_codec_file_is_a_clear_error(ref, tmp_path):
    data = (ref / "magnet-music" / "compression_state_dict.bin").read_bytes()
    bad = tmp_path / "compression_state_dict.bin"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(MagnetError, match="truncated or corrupt") as err:
        Codec.from_release_file(bad)
    assert str(bad) in str(err.value)


def test_missing_codec_file_is_a_clear_error(tmp_path):
    with pytest.raises(MagnetError, match="not found"):
        Codec.from_release_file(tmp_path / "compression_state_dict.bin")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_with_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "compression_state_dict.bin"
    torch.save({"best_state": _Payload(str(marker)), "xp.cfg": ""}, bad)
    assert not marker.exists()
    with pytest.raises(MagnetError, match="not loaded"):
        Codec.from_release_file(bad)
    assert not marker.exists()
    with open(tmp_path / "plain.bin", "wb") as f:  # a bare pickle, not torch.save's zip
        pickle.dump(_Payload(str(marker)), f, protocol=2)
    with pytest.raises(MagnetError):
        Codec.from_release_file(tmp_path / "plain.bin")
    assert not marker.exists()


def test_dict_without_weights_or_pointer_is_a_clear_error(tmp_path):
    bad = tmp_path / "compression_state_dict.bin"
    torch.save({"something": torch.zeros(1)}, bad)
    with pytest.raises(MagnetError, match="neither codec weights") as err:
        Codec.from_release_file(bad)
    assert str(bad) in str(err.value)


def test_codec_weights_not_matching_config_is_a_clear_error(ref, tmp_path):
    obj = torch.load(ref / "magnet-music" / "compression_state_dict.bin", weights_only=True)
    del obj["best_state"]["decoder.model.15.conv.conv.bias"]
    obj["best_state"]["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "compression_state_dict.bin"
    torch.save(obj, bad)
    with pytest.raises(MagnetError) as err:
        Codec.from_release_file(bad)
    message = str(err.value)
    assert str(bad) in message and "decoder.layers.15.conv.bias" in message and "extra.weight" in message


def test_xp_cfg_without_rvq_is_a_clear_error(ref, tmp_path):
    import yaml
    obj = torch.load(ref / "magnet-music" / "compression_state_dict.bin", weights_only=True)
    cfg = yaml.safe_load(obj["xp.cfg"])
    del cfg["rvq"]
    obj["xp.cfg"] = yaml.safe_dump(cfg)
    bad = tmp_path / "compression_state_dict.bin"
    torch.save(obj, bad)
    with pytest.raises(MagnetError, match="lacks 'rvq.n_q'"):
        Codec.from_release_file(bad)


def test_real_release_sizes_map_to_their_codebook_count():
    from transformers import EncodecConfig

    from magnet.codec import _bandwidth_for
    for n_q, bins, sr, ratios in [(4, 2048, 32000, [8, 5, 4, 4]), (4, 2048, 16000, [8, 5, 4, 2]), (9, 1024, 24000, [8, 5, 4, 2])]:
        config = EncodecConfig(sampling_rate=sr, upsampling_ratios=ratios, codebook_size=bins,
                               target_bandwidths=[_bandwidth_for(n_q, bins, sr // math.prod(ratios))])
        assert config.num_quantizers == n_q


# --- export, device/dtype, bad inputs --------------------------------------------------------

def test_export_roundtrip_identical(music_codec, golden, tmp_path):
    from safetensors.torch import load_file, save_file
    config, state = music_codec.export()
    save_file(state, str(tmp_path / "codec.safetensors"), metadata={"config": json.dumps(config)})
    rebuilt = Codec.from_config_and_state(json.loads(json.dumps(config)), load_file(str(tmp_path / "codec.safetensors")))
    original = music_codec.model.state_dict()
    assert original.keys() == rebuilt.model.state_dict().keys()
    assert all(torch.equal(v, rebuilt.model.state_dict()[k]) for k, v in original.items())
    codes = golden["music.greedy.nonoverlap.max"]
    assert torch.equal(rebuilt.decode(codes), music_codec.decode(codes))


def test_codec_follows_module_dtype(ref, golden, music_codec):
    codec = Codec.from_release_file(ref / "magnet-music" / "compression_state_dict.bin").to(torch.float64)
    assert all(p.dtype == torch.float64 for p in codec.parameters())
    codes = golden["music.greedy.nonoverlap.max"][:, :, :10]
    wav = codec.decode(codes)
    assert wav.dtype == torch.float32 and wav.shape == (2, 1, 10 * 640)
    torch.testing.assert_close(wav, music_codec.decode(codes), atol=1e-4, rtol=1e-3)   # the same codec, in float64
    sine = codec.encode(golden["music.sine_wav"])
    assert sine.shape == (1, 4, 100)
    assert (sine == golden["music.sine_codes"]).float().mean() > 0.95


def test_decode_rejects_mask_token_codes(music_codec):
    codes = torch.full((1, 4, 5), music_codec.card)  # the LM's mask token id
    with pytest.raises(MagnetError, match="outside"):
        music_codec.decode(codes)


def test_encode_rejects_wrong_channel_count(music_codec):
    with pytest.raises(MagnetError, match="convert_audio"):
        music_codec.encode(torch.zeros(1, 2, 640))
    with pytest.raises(MagnetError, match="batch, channels, samples"):
        music_codec.encode(torch.zeros(640))
