"""Audio utilities: resampling, channels, loudness, file I/O, waveform checks."""
import math

import numpy as np
import pytest
import torch

from magnet.audio import (check_waveform, convert_audio, fit_length, normalize_loudness, read_audio, resample,
                          seconds_to_samples, write_wav)
from magnet.errors import MagnetError


def _sine(freq=440.0, sr=32000, seconds=1.0, amp=0.5):
    t = torch.arange(int(sr * seconds)) / sr
    return amp * torch.sin(2 * math.pi * freq * t)


def _loudness(wav, sr):
    import pyloudnorm
    return pyloudnorm.Meter(sr).integrated_loudness(wav.double().numpy().T)


def _noise_burst(amp, sr=16000, seconds=2.0, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    wav = torch.zeros(channels, int(sr * seconds))
    wav[:, sr // 2: sr * 3 // 2] = amp * torch.randn(channels, sr, generator=g)
    return wav


# --- resample / channels ---------------------------------------------------------------------

def test_resample_identity_when_rates_equal():
    wav = torch.randn(1, 100)
    assert resample(wav, 32000, 32000) is wav
    assert torch.equal(convert_audio(wav[None], 32000, 32000, 1), wav[None])     # same rate and channels: unchanged


def test_resample_keeps_a_sine_and_scales_length():
    wav = _sine(440.0, 32000)[None]
    out = resample(wav, 32000, 16000)
    assert out.shape == (1, 16000)
    expected = _sine(440.0, 16000)[None]
    assert (out - expected)[:, 200:-200].abs().max() < 1e-2  # edges aside, the same tone


def test_resample_fractional_ratio_44100_to_32000():
    out = resample(torch.randn(2, 1, 44100), 44100, 32000)
    assert out.shape == (2, 1, 32000)


def test_convert_audio_downmixes_stereo_to_mono_by_mean():
    wav = torch.stack([torch.full((10,), 0.2), torch.full((10,), 0.6)])
    out = convert_audio(wav, 16000, 16000, 1)
    assert out.shape == (1, 10) and torch.allclose(out, torch.full((1, 10), 0.4))


def test_convert_audio_repeats_mono_to_stereo_batched():
    wav = torch.randn(3, 1, 50)
    out = convert_audio(wav, 16000, 16000, 2)
    assert out.shape == (3, 2, 50) and torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], wav[:, 0])


def test_convert_audio_resamples_after_channels():
    out = convert_audio(torch.randn(2, 48000), 48000, 32000, 1)
    assert out.shape == (1, 32000)


def test_convert_audio_cannot_invent_channels_from_stereo():
    with pytest.raises(MagnetError, match="not mono"):
        convert_audio(torch.randn(2, 10), 16000, 16000, 3)


# --- loudness --------------------------------------------------------------------------------

def test_normalize_loudness_reaches_target_on_noise_burst():
    wav = _noise_burst(0.01)[None]
    out = normalize_loudness(wav, 16000, target_lufs=-20.0)
    assert abs(_loudness(out[0], 16000) - (-20.0)) < 0.5


def test_normalize_loudness_treats_batch_items_separately():
    wav = torch.stack([_noise_burst(0.01, seed=1), _noise_burst(0.2, seed=2)])
    out = normalize_loudness(wav, 16000, target_lufs=-23.0)
    for item in out:
        assert abs(_loudness(item, 16000) - (-23.0)) < 0.5


def test_normalize_loudness_peak_guard_never_exceeds_one():
    wav = _noise_burst(0.001)
    wav[0, 100] = 0.9  # one click: the gain to reach -5 LUFS would clip it
    out = normalize_loudness(wav[None], 16000, target_lufs=-5.0)
    assert out.abs().max() <= 1.0 + 1e-6
    assert out.abs().max() >= 1.0 - 1e-6  # but it was raised as far as it could go


def test_normalize_loudness_leaves_silence_unchanged():
    wav = torch.zeros(2, 1, 32000)
    out = normalize_loudness(wav, 32000)
    assert torch.equal(out, wav) and torch.isfinite(out).all()


def test_normalize_loudness_leaves_too_short_audio_unchanged():
    wav = 0.1 * torch.randn(1, 1, 1000)  # 62 ms, shorter than the 400 ms measuring block
    out = normalize_loudness(wav, 16000)
    assert torch.equal(out, wav)


# --- files -----------------------------------------------------------------------------------

def test_write_then_read_roundtrip_pcm16(tmp_path):
    wav = 0.5 * torch.rand(2, 1000) - 0.25
    path = write_wav(tmp_path / "out.wav", wav, 32000)
    back, sr = read_audio(path)
    assert sr == 32000 and back.dtype == torch.float32 and back.shape == (2, 1000)
    assert (back - wav).abs().max() <= 1 / 32768 + 1e-7
    assert [p.name for p in tmp_path.iterdir()] == ["out.wav"]  # no temp file left


def test_write_wav_clips_to_unit_range(tmp_path):
    wav = torch.tensor([[2.0, -3.0, 0.5]])
    back, _ = read_audio(write_wav(tmp_path / "loud.wav", wav[None], 16000))
    assert back.abs().max() <= 1.0 and back[0, 0] > 0.99 and back[0, 1] < -0.99


def test_write_wav_failure_leaves_no_partial_file(tmp_path):
    with pytest.raises(MagnetError):
        write_wav(tmp_path / "out.wav", torch.zeros(1, 10), 16000, subtype="NOT_A_SUBTYPE")
    with pytest.raises(MagnetError):
        write_wav(tmp_path / "out.unknown_extension", torch.zeros(1, 10), 16000)
    assert list(tmp_path.iterdir()) == []


def test_write_wav_refuses_a_batch_of_several(tmp_path):
    with pytest.raises(MagnetError, match="each item"):
        write_wav(tmp_path / "out.wav", torch.zeros(2, 1, 10), 16000)


def test_read_audio_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(MagnetError, match="not found"):
        read_audio(tmp_path / "nope.wav")


def test_read_audio_unreadable_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wave file" * 10)
    with pytest.raises(MagnetError, match="Cannot read audio file"):
        read_audio(bad)


def test_read_audio_empty_file_is_a_clear_error(tmp_path):
    import soundfile as sf
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros((0, 1), dtype=np.float32), 16000)
    with pytest.raises(MagnetError, match="no samples"):
        read_audio(empty)


# --- waveform checks -------------------------------------------------------------------------

@pytest.mark.parametrize("bad, problem", [
    ([0.0, 0.1], "torch tensor"),
    (torch.zeros(1, 10, dtype=torch.int16), "integer samples"),
    (torch.zeros(10), "shape"),
    (torch.zeros(1, 0), "empty"),
    (torch.tensor([[0.0, float("nan")]]), "NaN"),
])
def test_check_waveform_names_the_input_and_the_problem(bad, problem):
    with pytest.raises(MagnetError, match=problem) as err:
        check_waveform(bad, "prompt audio")
    assert "prompt audio" in str(err.value)


def test_check_waveform_accepts_clip_and_batch():
    for wav in (torch.zeros(1, 10), torch.zeros(2, 2, 10)):
        assert check_waveform(wav, "audio") is wav


# --- every bad argument is a MagnetError naming it, never a raw exception -----------------------

@pytest.mark.parametrize("call, problem", [
    (lambda: normalize_loudness(torch.zeros(1, 16000), 16000, float("nan")), "target_lufs nan"),
    (lambda: normalize_loudness(torch.zeros(1, 16000), 16000, float("inf")), "target_lufs inf"),
    (lambda: normalize_loudness(torch.zeros(1, 16000), 16000, 5.0), "between -70 and 0"),
    (lambda: normalize_loudness(torch.zeros(1, 16000), 16000, "-14"), "target_lufs"),
    (lambda: normalize_loudness(torch.zeros(1, 16000), 16000, -14, peak=float("nan")), "peak"),
    (lambda: resample(torch.zeros(1, 100), 0, 16000), "from_sr"),
    (lambda: resample(torch.zeros(1, 100), 16000, -8000), "to_sr"),
    (lambda: resample(torch.zeros(1, 100), float("nan"), 16000), "from_sr"),
    (lambda: resample([0.0, 0.1], 16000, 8000), "float tensor"),
    (lambda: resample(torch.zeros(1, 0), 16000, 8000), "non-empty"),
    (lambda: resample(torch.zeros(1, 100), 10 ** 12, 1), "Not enough memory"),
    (lambda: convert_audio(torch.zeros(1, 100), 16000, 16000, "2"), "channels"),
    (lambda: fit_length(torch.zeros(1, 10), -5), ">= 1"),
    (lambda: fit_length(torch.zeros(1, 10), 10 ** 30), "too long"),
    (lambda: seconds_to_samples(float("inf"), 32000), "finite"),
    (lambda: seconds_to_samples(1e300, 32000), "too long"),
    (lambda: seconds_to_samples(10 ** 400, 32000), "finite"),
    (lambda: write_wav(None, torch.zeros(1, 10), 16000), "not a path"),
    (lambda: write_wav("/tmp/x.wav", torch.zeros(1, 10), 10 ** 12), "too high"),
    (lambda: read_audio(None), "not a path"),
])
def test_bad_arguments_are_clear_errors(call, problem):
    with pytest.raises(MagnetError, match=problem):
        call()


def test_write_wav_under_a_regular_file_is_a_clear_error(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(MagnetError, match="Choose a folder you can write to"):
        write_wav(tmp_path / "file.txt" / "out.wav", torch.zeros(1, 10), 16000)
    with pytest.raises(MagnetError, match="it is a folder"):
        write_wav(tmp_path, torch.zeros(1, 10), 16000)


@pytest.mark.parametrize("failure", ["system", "short write", "oserror"])
def test_write_wav_on_a_full_disk_names_the_space_and_leaves_nothing(tmp_path, monkeypatch, failure):
    import errno

    import soundfile as sf

    def full(file, *args, **kwargs):
        open(file, "wb").write(b"RIFF")          # a partial file, as a real full disk leaves
        if failure == "system":
            raise sf.LibsndfileError(2, "Error opening file: ")    # what libsndfile reports for ENOSPC
        if failure == "short write":
            raise AssertionError()                 # soundfile's check that every frame was written
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(sf, "write", full)
    with pytest.raises(MagnetError, match="enough free space"):
        write_wav(tmp_path / "out.wav", torch.zeros(1, 10), 16000)
    assert list(tmp_path.iterdir()) == []


def test_read_audio_of_a_truncated_file_is_a_clear_error(tmp_path):
    good = write_wav(tmp_path / "good.flac", 0.1 * torch.randn(1, 16000), 16000)
    data = good.read_bytes()
    for n, cut in enumerate((30, len(data) // 2)):
        bad = tmp_path / f"cut{n}.flac"
        bad.write_bytes(data[:cut])
        with pytest.raises(MagnetError, match="Cannot read audio file"):
            read_audio(bad)


def test_valid_loudness_targets_give_bit_identical_results_for_int_and_float():
    wav = _noise_burst(0.01)[None]
    assert torch.equal(normalize_loudness(wav, 16000, -20), normalize_loudness(wav, 16000, -20.0))
