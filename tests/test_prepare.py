"""Preparing a dataset (magnet.prepare, magnet.tagging): captions from CLAP tags (+ tempo and key with librosa),
the manifest and training reading it, the loudness option of the training data, and the Prepare Dataset node;
on a tiny random CLAP model and short tone files."""
from __future__ import annotations

import json
import math
import sys
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from magnet import dataset as D
from magnet import tagging
from magnet.clap import ClapScorer
from magnet.errors import MagnetError
from magnet.prepare import prepare_folder

from tiny_clap import tiny_clap

CATEGORIES = [c.name for c in tagging.VOCABULARY]


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: thread hand-offs cost more than the work


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    return ClapScorer.from_pretrained(tiny_clap(tmp_path_factory.mktemp("clap") / "tiny-clap"), device="cpu")


@pytest.fixture()
def no_librosa(monkeypatch):
    """librosa cannot be imported (as when the optional extra is not installed)."""
    monkeypatch.setitem(sys.modules, "librosa", None)


def tone(path, seconds=1.0, sr=22050, channels=1, freq=330.0, amp=0.3):
    t = np.arange(int(seconds * sr)) / sr
    x = amp * np.sin(2 * np.pi * freq * t)
    sf.write(str(path), np.stack([x] * channels, 1).astype(np.float32), sr)
    return path


def manifest(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / D.MANIFEST).read_text(encoding="utf-8").splitlines()]


# -- captions and the manifest ---------------------------------------------------------------------------------

def test_files_without_a_caption_get_one_and_existing_captions_are_kept(scorer, tmp_path, no_librosa):
    tone(tmp_path / "a.wav")
    tone(tmp_path / "b.wav", freq=440.0)
    (tmp_path / "b.txt").write_text("my own words\n")
    tone(tmp_path / "c.flac", sr=44100, channels=2)
    (tmp_path / "c.json").write_text(json.dumps({"description": "From audiocraft.", "genre": "rock"}))
    (tmp_path / "sub").mkdir()
    tone(tmp_path / "sub" / "d.ogg", 0.7, freq=550.0)
    (tmp_path / ".hidden.wav").write_bytes((tmp_path / "a.wav").read_bytes())
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = prepare_folder(tmp_path, scorer, log=lambda m: None)
    assert result.files == 4 and result.analysed == 4 and not result.skipped
    assert sorted(p.relative_to(tmp_path).as_posix() for p in result.written) == ["a.txt", "sub/d.txt"]
    assert (tmp_path / "b.txt").read_text() == "my own words\n"                     # kept as it is
    assert not (tmp_path / "c.txt").exists() and not (tmp_path / ".hidden.txt").exists()
    for name, data in before.items():                                               # nothing else changed
        assert next(tmp_path.rglob(name)).read_bytes() == data, name
    caption = (tmp_path / "a.txt").read_text().strip()
    words = caption.split(", ")
    labels = {c.name: c.labels for c in tagging.VOCABULARY}
    assert words[0] in labels["genre"] and words[-1] in labels["tempo"]             # no bpm / key without librosa
    assert any(w in labels["vocals"] for w in words)


def test_the_manifest_lists_every_file_with_caption_length_tags_tempo_and_key(scorer, tmp_path, no_librosa):
    tone(tmp_path / "a.wav", 1.5)
    tone(tmp_path / "b.wav", 0.8)
    (tmp_path / "b.txt").write_text("  my own words ")
    (tmp_path / "sub").mkdir()
    tone(tmp_path / "sub" / "c.wav", 0.6, sr=48000)
    result = prepare_folder(tmp_path, scorer, log=lambda m: None)
    lines = manifest(tmp_path)
    assert [e["file"] for e in lines] == ["a.wav", "b.wav", "sub/c.wav"]
    assert result.manifest_text == (tmp_path / D.MANIFEST).read_text(encoding="utf-8")
    for e, seconds in zip(lines, (1.5, 0.8, 0.6)):
        assert list(e) == ["file", "caption", "seconds", "tags", "bpm", "key"]
        assert e["seconds"] == pytest.approx(seconds, abs=1e-3)
        assert list(e["tags"]) == CATEGORIES and e["bpm"] is None and e["key"] is None
        for cat in tagging.VOCABULARY:
            tags = e["tags"][cat.name]
            assert 1 <= len(tags) <= cat.keep and set(tags) <= set(cat.labels)
            scores = list(tags.values())
            assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)
            assert all(s >= tagging.RELATIVE_KEEP * scores[0] - 1e-3 for s in scores)
    assert lines[0]["caption"] == (tmp_path / "a.txt").read_text().strip()
    assert lines[0]["caption"] == ", ".join(label for tags in lines[0]["tags"].values() for label in tags)
    assert lines[1]["caption"] == "my own words"                                    # the caption it has


def test_overwrite_replaces_captions_and_manifest_lines(scorer, tmp_path, no_librosa):
    tone(tmp_path / "a.wav")
    (tmp_path / "a.txt").write_text("old words")
    (tmp_path / D.MANIFEST).write_text(json.dumps({"file": "a.wav", "caption": "edited"}) + "\n")
    kept = prepare_folder(tmp_path, scorer, log=lambda m: None)
    assert kept.written == [] and kept.analysed == 0 and (tmp_path / "a.txt").read_text() == "old words"
    assert manifest(tmp_path) == [{"file": "a.wav", "caption": "edited"}]
    again = prepare_folder(tmp_path, scorer, overwrite=True, log=lambda m: None)
    assert again.written == [tmp_path / "a.txt"] and again.analysed == 1
    new = (tmp_path / "a.txt").read_text().strip()
    assert new != "old words" and manifest(tmp_path)[0]["caption"] == new and len(manifest(tmp_path)) == 1


def test_a_second_run_analyses_only_new_files_and_keeps_the_users_lines(scorer, tmp_path, no_librosa):
    tone(tmp_path / "a.wav")
    prepare_folder(tmp_path, scorer, log=lambda m: None)
    lines = (tmp_path / D.MANIFEST).read_text().splitlines()
    edited = json.loads(lines[0])
    edited["caption"] = "what I hear"
    bad = "{not json"
    gone = json.dumps({"file": "removed.wav", "caption": "a file no longer here"})
    (tmp_path / D.MANIFEST).write_text("\n".join([json.dumps(edited), bad, gone]) + "\n")
    tone(tmp_path / "b.wav", freq=600.0)
    messages = []
    result = prepare_folder(tmp_path, scorer, log=messages.append)
    assert result.analysed == 1 and [p.name for p in result.written] == ["b.txt"] and result.bad_lines == [2]
    text = (tmp_path / D.MANIFEST).read_text().splitlines()
    assert text[:3] == [json.dumps(edited), bad, gone]                               # verbatim, in place
    assert json.loads(text[3])["file"] == "b.wav" and len(text) == 4
    assert any("line 2" in m and "kept as it is" in m for m in messages)
    assert "line" in result.summary() and "2" in result.summary()


def test_unreadable_and_silent_files_are_skipped_and_named(scorer, tmp_path, no_librosa):
    tone(tmp_path / "good.wav")
    (tmp_path / "broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    sf.write(str(tmp_path / "silent.wav"), np.zeros(22050, dtype=np.float32), 22050)
    messages = []
    result = prepare_folder(tmp_path, scorer, log=messages.append)
    assert {p.name: why.split(" (")[0] for p, why in result.skipped} == {"broken.wav": "cannot read it",
                                                                         "silent.wav": "it is silent"}
    assert [e["file"] for e in manifest(tmp_path)] == ["good.wav"]
    assert not (tmp_path / "broken.txt").exists() and not (tmp_path / "silent.txt").exists()
    assert any("broken.wav" in m for m in messages) and "silent.wav" in result.summary()


def test_bad_input_is_refused_naming_the_fix(scorer, tmp_path, monkeypatch):
    with pytest.raises(MagnetError, match="not found"):
        prepare_folder(tmp_path / "nowhere", scorer)
    with pytest.raises(MagnetError, match="holds no audio files"):
        prepare_folder(tmp_path, scorer)
    tone(tmp_path / "a.wav")
    with pytest.raises(MagnetError, match="between -70 and 0"):
        prepare_folder(tmp_path, scorer, loudness=5.0)
    monkeypatch.setenv("MAGNET_CLAP_DIR", str(tmp_path / "models"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MagnetError, match="python -m magnet download larger_clap_music"):
        prepare_folder(tmp_path, None)
    assert not (tmp_path / D.MANIFEST).exists() and not (tmp_path / "a.txt").exists()


def test_without_librosa_tempo_and_key_are_left_out_and_it_is_said_once(scorer, tmp_path, no_librosa):
    for i in range(3):
        tone(tmp_path / f"t{i}.wav", 1.0, freq=300.0 + 100 * i)
    messages = []
    result = prepare_folder(tmp_path, scorer, log=messages.append)
    assert result.tempo_and_key is False
    about = [m for m in messages if "librosa" in m]
    assert len(about) == 1 and 'pip install "magnet-audio[prepare]"' in about[0]
    assert all(e["bpm"] is None and e["key"] is None for e in manifest(tmp_path))
    assert all("bpm" not in (tmp_path / f"t{i}.txt").read_text() for i in range(3))
    assert "left out" in result.summary()


def test_the_vocabulary_is_embedded_as_the_clap_score_embeds_text(scorer):
    prompts = [c.prompt(label) for c in tagging.VOCABULARY for label in c.labels]
    assert len(set(prompts)) == len(prompts)
    torch.testing.assert_close(tagging._short_text_embeddings(scorer, prompts), scorer.text_embeddings(prompts),
                               atol=1e-5, rtol=0)


def test_the_key_is_the_best_krumhansl_schmuckler_profile():
    assert tagging.key_of_chroma(np.roll(tagging.MAJOR_PROFILE, 7)) == "G major"
    assert tagging.key_of_chroma(np.roll(tagging.MINOR_PROFILE, 9)) == "A minor"
    assert tagging.key_of_chroma(np.roll(tagging.MINOR_PROFILE, 3)) == "Eb minor"
    assert tagging.key_of_chroma(np.ones(12)) is None


def test_with_librosa_captions_end_with_tempo_and_key(scorer, tmp_path, monkeypatch):
    pytest.importorskip("librosa")
    sr = 22050
    t = np.arange(8 * sr) / sr
    chord = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 261.63, 329.63))        # A, C, E: A minor
    beat = np.zeros_like(t)
    for start in np.arange(0, 8, 0.5):                                              # 120 BPM clicks
        i = int(start * sr)
        beat[i:i + 400] = np.exp(-np.arange(len(beat[i:i + 400])) / 60.0)
    sf.write(str(tmp_path / "a.wav"), (0.15 * chord + 0.5 * beat).astype(np.float32), sr)
    result = prepare_folder(tmp_path, scorer, log=lambda m: None)
    (e,) = manifest(tmp_path)
    assert result.tempo_and_key is True
    assert e["key"] == "A minor" and abs(e["bpm"] - 120) <= 3
    assert e["caption"].endswith(f", {e['bpm']} bpm, A minor")
    lr = sys.modules["librosa"]

    def broken(*args, **kwargs):
        raise RuntimeError("no luck")
    monkeypatch.setattr(lr.onset, "onset_strength", broken)
    messages = []
    prepare_folder(tmp_path, scorer, overwrite=True, log=messages.append)            # the tags still stand
    (e,) = manifest(tmp_path)
    assert e["bpm"] is None and e["key"] is None and e["tags"]
    assert any("a.wav: no tempo and key: librosa failed on it (RuntimeError: no luck)" in m for m in messages)


# -- training reads the manifest -------------------------------------------------------------------------------

def test_training_takes_captions_from_the_manifest_before_txt_with_the_trigger_first(music_model, tmp_path):
    tone(tmp_path / "a.wav")
    tone(tmp_path / "b.wav", freq=440.0)
    (tmp_path / "sub").mkdir()
    tone(tmp_path / "sub" / "c.wav", freq=550.0)
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(f"txt of {name}")
    lines = [{"file": "a.wav", "caption": " from the manifest "}, {"file": "./sub/c.wav", "caption": "deep"}]
    (tmp_path / D.MANIFEST).write_text("".join(json.dumps(e) + "\n" for e in lines))
    data = D.AudioFolder(tmp_path, music_model, trigger="zqx")
    assert data.captions == ["zqx from the manifest", "zqx txt of b", "zqx deep"]
    assert D.caption_for(tmp_path / "a.wav") == "txt of a"                          # the old helper is unchanged


def test_bad_manifest_lines_are_skipped_with_a_warning_naming_the_line(music_model, tmp_path):
    for name in ("a", "b", "c", "d", "e"):
        tone(tmp_path / f"{name}.wav")
    lines = [json.dumps({"file": "a.wav", "caption": "good"}), "{not json", json.dumps({"file": "b.wav"}),
             json.dumps({"file": "c.wav", "caption": 3}), json.dumps(["d.wav", "x"]), "",
             json.dumps({"file": "a.wav", "caption": "again"}), json.dumps({"file": "e.wav", "caption": "  "})]
    (tmp_path / D.MANIFEST).write_bytes(("\n".join(lines) + "\n").encode() + b'{"file": "x\xff"}\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = D.AudioFolder(tmp_path, music_model)
    said = [str(w.message) for w in caught]
    assert data.captions == ["good", "b", "c", "d", "e"]                            # the others: the file name
    for number, why in ((2, "not JSON"), (3, 'no "caption"'), (4, "not a text"), (5, "not an object"),
                        (7, "already listed"), (8, "empty"), (9, "not UTF-8")):
        assert any(f"line {number} skipped" in s and why in s for s in said), (number, said)
    assert not any("line 1 skipped" in s or "line 6 skipped" in s for s in said)


def test_a_manifest_that_cannot_be_read_is_a_warning_not_an_error(music_model, tmp_path):
    tone(tmp_path / "a.wav")
    (tmp_path / "a.txt").write_text("from the txt")
    (tmp_path / D.MANIFEST).mkdir()                                                   # not a file
    with pytest.warns(UserWarning, match="not readable"):
        data = D.AudioFolder(tmp_path, music_model)
    assert data.captions == ["from the txt"]
    with pytest.raises(MagnetError, match="cannot be read"):                         # never replaced
        prepare_folder(tmp_path, object.__new__(ClapScorer))


def test_a_txt_edited_after_the_manifest_is_named_in_a_warning(music_model, tmp_path):
    import os
    tone(tmp_path / "a.wav")
    (tmp_path / D.MANIFEST).write_text(json.dumps({"file": "a.wav", "caption": "listed"}) + "\n")
    (tmp_path / "a.txt").write_text("edited later")
    m = (tmp_path / D.MANIFEST).stat().st_mtime
    os.utime(tmp_path / "a.txt", (m + 10, m + 10))
    with pytest.warns(UserWarning, match="edit its line in magnet_dataset.jsonl"):
        data = D.AudioFolder(tmp_path, music_model)
    assert data.captions == ["listed"]


# -- loudness of the training data ---------------------------------------------------------------------------

def test_streaming_loudness_matches_pyloudnorm(tmp_path, monkeypatch):
    import pyloudnorm
    g = np.random.default_rng(0)
    sr = 16000
    x = 0.05 * g.standard_normal((3 * sr, 2))
    x[: sr // 2] *= 0.001                                                            # a quiet start (gated out)
    x[:, 1] *= 0.5
    sf.write(str(tmp_path / "n.wav"), x.astype(np.float32), sr, subtype="FLOAT")
    want = pyloudnorm.Meter(sr).integrated_loudness(x.astype(np.float32).astype(np.float64))
    for chunk in (0.37, 60.0):                                                        # pieces, or whole
        monkeypatch.setattr(D, "ENCODE_CHUNK_SECONDS", chunk)
        lufs, peak = D.file_loudness(tmp_path / "n.wav")
        assert lufs == pytest.approx(want, abs=0.05) and peak == pytest.approx(np.abs(x).max(), rel=1e-6)
    sf.write(str(tmp_path / "short.wav"), x[:1000].astype(np.float32), sr)
    assert math.isnan(D.file_loudness(tmp_path / "short.wav")[0]) and D.loudness_gain(tmp_path / "short.wav", -14) == 1


def test_loudness_changes_what_is_encoded_never_the_file_and_is_in_the_cache_key(music_model, tmp_path,
                                                                                monkeypatch):
    import pyloudnorm
    path = tone(tmp_path / "quiet.wav", 2.0, sr=32000, amp=0.02)
    original = path.read_bytes()
    seen = []
    real = music_model.encode

    def spy(wav, sr):
        seen.append(wav.clone())
        return real(wav, sr)
    monkeypatch.setattr(music_model, "encode", spy)
    monkeypatch.setattr(D, "ENCODE_CHUNK_SECONDS", 0.75)                             # several pieces: one gain
    plain = D.AudioFolder(tmp_path, music_model)
    loud = D.AudioFolder(tmp_path, music_model, loudness=-14)
    assert path.read_bytes() == original
    assert len(seen) == 6                                                             # 3 pieces each
    before, after = torch.cat(seen[:3], -1)[0], torch.cat(seen[3:], -1)[0]
    ratio = after / before.where(before.abs() > 1e-3, torch.ones(()))
    gains = ratio[before.abs() > 1e-3]
    assert float(gains.std()) < 1e-4 * float(gains.mean())                            # one gain for the file
    measured = pyloudnorm.Meter(32000).integrated_loudness(after.numpy().T.astype(np.float64))
    assert measured == pytest.approx(-14.0, abs=0.2)
    assert not torch.equal(plain.clips[0].codes, loud.clips[0].codes)
    assert len(list((tmp_path / D.CACHE_DIR).glob("*.safetensors"))) == 2             # two cache entries
    D.AudioFolder(tmp_path, music_model, loudness=-14.0)                                # the same target: cached
    D.AudioFolder(tmp_path, music_model)
    assert len(seen) == 6
    D.AudioFolder(tmp_path, music_model, loudness=-20)                                  # another: encoded again
    assert len(seen) == 9 and len(list((tmp_path / D.CACHE_DIR).glob("*.safetensors"))) == 3
    with pytest.raises(MagnetError, match="loudness"):
        D.AudioFolder(tmp_path, music_model, loudness=float("nan"))


def test_loudness_never_pushes_a_peak_over_full_scale(tmp_path):
    sr = 16000
    x = np.zeros(2 * sr)
    x[::800] = 0.9                                                                    # quiet, but peaky
    sf.write(str(tmp_path / "p.wav"), x.astype(np.float32), sr, subtype="FLOAT")
    gain = D.loudness_gain(tmp_path / "p.wav", -14.0)
    assert gain == pytest.approx(1 / 0.9, rel=1e-6)


# -- the node ------------------------------------------------------------------------------------------------

def test_the_node_prepares_a_folder_under_the_input_folder(pack, N, scorer, tmp_path, monkeypatch, no_librosa):
    from magnet_node_pack.nodes.common import Handle
    folder = tmp_path / "input" / "clips"
    folder.mkdir(parents=True)
    tone(folder / "a.wav")
    tone(folder / "b.wav", freq=500.0)
    (folder / "b.txt").write_text("mine")
    monkeypatch.setenv("MAGNET_INPUT_DIR", str(tmp_path / "input"))
    node = N["MagnetPrepareDataset"]
    assert "clips" in node.INPUT_TYPES()["required"]["dataset"][0]
    state = node.IS_CHANGED(dataset="clips", path="")
    out = node().prepare(Handle(scorer, "tiny"), "clips", "", False)
    text, written = out["result"]
    assert written == 1 and [json.loads(line)["file"] for line in text.splitlines()] == ["a.wav", "b.wav"]
    assert "2 audio files" in out["ui"]["text"][0] and "1 captions written" in out["ui"]["text"][0]
    assert node.IS_CHANGED(dataset="clips", path="") != state                        # it wrote files
    again = node().prepare(Handle(scorer, "tiny"), "none", str(folder), True)["result"]
    assert again[1] == 2 and (folder / "b.txt").read_text() != "mine"
    with pytest.raises(pack.magnet.errors.MagnetError, match="^MAGNeT Prepare Dataset: no dataset"):
        node().prepare(Handle(scorer, "tiny"), "none", "", False)


def test_cli_prepare_writes_captions_and_the_manifest(tmp_path, capsys, no_librosa):
    import json
    from magnet.__main__ import main
    data = tmp_path / "data"
    data.mkdir()
    tone(data / "a.wav")
    tone(data / "b.wav", freq=550.0)
    (data / "b.txt").write_text("my own words")
    clap = tiny_clap(tmp_path / "clap" / "tiny-clap")
    assert main(["prepare", str(data), "--clap", str(clap), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert (data / "a.txt").is_file() and (data / "b.txt").read_text() == "my own words"
    lines = [json.loads(x) for x in (data / "magnet_dataset.jsonl").read_text().splitlines()]
    assert sorted(x["file"] for x in lines) == ["a.wav", "b.wav"] and "magnet_dataset.jsonl" in out
    assert main(["prepare", str(data), "--no-download", "--models-dir", str(tmp_path / "empty")]) == 2
    assert "larger_clap_music" in capsys.readouterr().err
