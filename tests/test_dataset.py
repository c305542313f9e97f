"""A folder of audio as training data: formats, rates and channels, captions, the token cache, windows, and
the files and folders that are refused or skipped."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from magnet import dataset as D
from magnet.errors import MagnetError


def tone(path, seconds=1.0, sr=22050, channels=2, freq=330.0, amp=0.3, fmt=None):
    t = np.arange(int(seconds * sr)) / sr
    x = amp * np.sin(2 * np.pi * freq * t)
    sf.write(str(path), np.stack([x] * channels, 1).astype(np.float32), sr, format=fmt)
    return path


def test_any_format_rate_and_channel_count_becomes_codec_tokens(music_model, tmp_path):
    tone(tmp_path / "a.wav", 1.0, sr=22050, channels=2)
    tone(tmp_path / "b.flac", 0.5, sr=48000, channels=1)
    tone(tmp_path / "c.ogg", 0.8, sr=44100, channels=1)
    data = D.AudioFolder(tmp_path, music_model)
    assert [c.path.name for c in data.clips] == ["a.wav", "b.flac", "c.ogg"]
    fr = music_model.frame_rate
    for clip, seconds in zip(data.clips, (1.0, 0.5, 0.8)):
        assert clip.codes.dtype == torch.long and clip.codes.shape[0] == music_model.cfg.n_q
        assert abs(clip.frames - seconds * fr) <= 1
        assert int(clip.codes.min()) >= 0 and int(clip.codes.max()) < music_model.cfg.card
    # the same tokens as encoding the file by hand
    from magnet.audio import read_audio
    wav, sr = read_audio(tmp_path / "a.wav")
    assert torch.equal(data.clips[0].codes, music_model.encode(wav[None], sr)[0])


def test_captions_from_txt_then_audiocraft_json_then_the_file_name_with_the_trigger_first(tmp_path):
    a, b, c = tmp_path / "one.wav", tmp_path / "two.wav", tmp_path / "slow_piano-take.wav"
    (tmp_path / "one.txt").write_text("  warm analog pad\n")
    (tmp_path / "one.json").write_text(json.dumps({"description": "ignored: the txt wins"}))
    (tmp_path / "two.json").write_text(json.dumps({"description": "A calm piano.", "genre": "ambient", "bpm": 90,
                                                   "moods": ["calm", "soft"], "title": "not used"}))
    assert D.caption_for(a) == "warm analog pad"
    assert D.caption_for(b) == "A calm piano. bpm: 90. genre: ambient. moods: calm, soft"
    assert D.caption_for(c) == "slow piano take"
    assert D.caption_for(a, "zqx") == "zqx warm analog pad"
    (tmp_path / "three.json").write_text(json.dumps({"genre": "rock", "keywords": ["loud"]}))
    assert D.caption_for(tmp_path / "three.wav") == "genre: rock. keywords: loud"
    (tmp_path / "four.json").write_text(json.dumps({"description": "Just this."}))
    assert D.caption_for(tmp_path / "four.wav") == "Just this."


def test_tokens_are_cached_by_content_and_codec_so_a_second_run_does_not_encode(music_model, tmp_path,
                                                                                  monkeypatch):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    tone(data_dir / "a.wav")
    first = D.AudioFolder(data_dir, music_model, trigger="x")
    assert len(list((data_dir / D.CACHE_DIR).glob("*.safetensors"))) == 1
    calls = []
    real = D.encode_file
    monkeypatch.setattr(D, "encode_file", lambda m, p: calls.append(p) or real(m, p))
    again = D.AudioFolder(data_dir, music_model, trigger="other settings")
    assert calls == [] and torch.equal(first.clips[0].codes, again.clips[0].codes)
    tone(data_dir / "a.wav", freq=550.0)                    # new content: encoded again
    D.AudioFolder(data_dir, music_model)
    assert len(calls) == 1
    monkeypatch.setattr(D, "codec_identity", lambda codec: "another codec")
    D.AudioFolder(data_dir, music_model)                      # another codec: encoded again
    assert len(calls) == 2
    cache = tmp_path / "elsewhere"
    D.AudioFolder(data_dir, music_model, cache_dir=cache)
    assert len(list(cache.glob("*.safetensors"))) == 1


def test_long_clips_give_random_crops_and_short_ones_are_padded_without_loss(music_model, tmp_path):
    tone(tmp_path / "long.wav", 3.0)
    tone(tmp_path / "short.wav", 0.4)
    data = D.AudioFolder(tmp_path, music_model)
    long_i = [c.path.name for c in data.clips].index("long.wav")
    clip = data.clips[long_i]          # random tokens (the tiny fixture codec gives a tone a few repeated ones)
    clip.codes = torch.randint(0, music_model.cfg.card, clip.codes.shape, generator=torch.Generator().manual_seed(0))
    frames = 50
    starts = set()
    for s in range(8):
        codes, valid = data.window(long_i, frames, torch.Generator().manual_seed(s))
        assert codes.shape == (music_model.cfg.n_q, frames) and bool(valid.all())
        full = data.clips[long_i].codes
        hits = [a for a in range(full.shape[-1] - frames + 1) if torch.equal(full[:, a:a + frames], codes)]
        assert hits
        starts.add(hits[0])
    assert len(starts) > 1
    short_i = 1 - long_i
    codes, valid = data.window(short_i, frames)
    n = data.clips[short_i].frames
    assert n < frames and bool(valid[:n].all()) and not bool(valid[n:].any())
    assert torch.equal(codes[:, :n], data.clips[short_i].codes)


def test_empty_folder_and_missing_folder_are_refused_naming_them(music_model, tmp_path):
    (tmp_path / "notes.txt").write_text("no audio here")
    with pytest.raises(MagnetError, match="holds no audio files") as e:
        D.AudioFolder(tmp_path, music_model)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(MagnetError, match="not found"):
        D.AudioFolder(tmp_path / "nope", music_model)


def test_unreadable_and_silent_files_are_skipped_with_a_warning_naming_them(music_model, tmp_path):
    tone(tmp_path / "good.wav")
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    tone(tmp_path / "silent.wav", amp=0.0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        data = D.AudioFolder(tmp_path, music_model)
    text = " ".join(str(x.message) for x in w)
    assert "broken.wav" in text and "silent.wav" in text and "silent" in text
    assert [c.path.name for c in data.clips] == ["good.wav"]
    assert sorted(p.name for p, _ in data.skipped) == ["broken.wav", "silent.wav"]
    (tmp_path / "good.wav").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(MagnetError, match="no usable audio"):
            D.AudioFolder(tmp_path, music_model)


def _quiet(fn, *a, **k):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn(*a, **k)
    return out, " ".join(str(x.message) for x in w)


def test_a_caption_over_the_t5_limit_skips_that_file_naming_it(music_model, tmp_path):
    tone(tmp_path / "good.wav")
    tone(tmp_path / "long_caption.wav")
    (tmp_path / "long_caption.txt").write_text("a very long description " * 200)
    data, text = _quiet(D.AudioFolder, tmp_path, music_model)
    assert [c.path.name for c in data.clips] == ["good.wav"]
    assert "long_caption" in text and "T5 tokens" in text
    (tmp_path / "good.wav").unlink()
    with pytest.raises(MagnetError, match="long_caption.wav: its caption is .* T5 tokens"):
        _quiet(D.AudioFolder, tmp_path, music_model)


def test_caption_files_that_cannot_be_read_count_as_absent(tmp_path, monkeypatch):
    from pathlib import Path
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)         # too deep for the JSON parser
    (tmp_path / "latin.json").write_bytes(b'{"description": "caf\xe9"}')
    (tmp_path / "broken.txt").write_text("never read")
    real = Path.read_text

    def read_text(self, *a, **k):
        if self.name == "broken.txt":
            raise OSError(5, "Input/output error")
        return real(self, *a, **k)
    monkeypatch.setattr(Path, "read_text", read_text)
    for name in ("deep", "latin", "broken"):
        caption, text = _quiet(D.caption_for, tmp_path / f"{name}.wav")
        assert caption == name and f"{name}." in text


def test_a_file_name_that_is_not_utf8_is_skipped_with_a_warning(music_model, tmp_path):
    import os
    tone(tmp_path / "good.wav")
    tone(tmp_path / "x.wav")
    os.rename(os.fsencode(tmp_path / "x.wav"), os.path.join(os.fsencode(tmp_path), b"caf\xe9.wav"))
    data, text = _quiet(D.AudioFolder, tmp_path, music_model)
    assert [c.path.name for c in data.clips] == ["good.wav"] and "UTF-8" in text and "caf" in text


def test_a_read_failing_for_any_reason_skips_the_file(music_model, tmp_path, monkeypatch):
    tone(tmp_path / "a.wav")
    tone(tmp_path / "b.wav", freq=550.0)
    real = sf.SoundFile.read

    def read(self, *a, **k):
        if self.name.endswith("b.wav"):
            raise IndexError("a parser bug")
        return real(self, *a, **k)
    monkeypatch.setattr(sf.SoundFile, "read", read)
    data, text = _quiet(D.AudioFolder, tmp_path, music_model)
    assert [c.path.name for c in data.clips] == ["a.wav"] and "b.wav" in text and "a parser bug" in text


def test_files_are_read_and_encoded_in_pieces_never_whole(music_model, tmp_path, monkeypatch):
    sr = 22050
    tone(tmp_path / "long.wav", seconds=2.3, sr=sr)
    monkeypatch.setattr(D, "ENCODE_CHUNK_SECONDS", 0.5)
    sizes = []
    real = sf.SoundFile.read

    def read(self, frames=-1, *a, **k):
        sizes.append(frames)
        return real(self, frames, *a, **k)
    monkeypatch.setattr(sf.SoundFile, "read", read)
    codes = D.encode_file(music_model, tmp_path / "long.wav")
    assert sizes and all(0 < n <= sr // 2 for n in sizes)
    wav, _ = sf.read(str(tmp_path / "long.wav"), dtype="float32", always_2d=True)
    x = torch.from_numpy(wav.T.copy())
    want = torch.cat([music_model.encode(x[None, :, a:a + sr // 2], sr)[0] for a in range(0, x.shape[-1], sr // 2)], -1)
    assert torch.equal(codes, want)


@pytest.mark.parametrize("bad", ["codebooks", "range", "float", "empty"])
def test_a_cache_entry_that_is_not_codes_of_this_codec_is_encoded_again(music_model, tmp_path, monkeypatch, bad):
    from safetensors.torch import save_file
    tone(tmp_path / "a.wav")
    first = D.AudioFolder(tmp_path, music_model)
    (entry,) = (tmp_path / D.CACHE_DIR).glob("*.safetensors")
    good = first.clips[0].codes
    other = {"codebooks": good[:2], "range": good + music_model.codec.card, "float": good.float(),
             "empty": good[:, :0]}[bad]
    save_file({"codes": other.to(torch.float32 if bad == "float" else torch.int32).contiguous()}, str(entry))
    calls = []
    real = D.encode_file
    monkeypatch.setattr(D, "encode_file", lambda m, p: calls.append(p) or real(m, p))
    again = D.AudioFolder(tmp_path, music_model)
    assert len(calls) == 1 and torch.equal(again.clips[0].codes, good)
