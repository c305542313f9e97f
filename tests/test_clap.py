"""CLAP scoring (magnet.clap) and `python -m magnet evaluate`, on a tiny random ClapModel built here."""
import json
import math

import numpy as np
import pytest
import torch

from magnet.audio import resample, write_wav
from magnet.clap import ClapScorer, _windows
from magnet.errors import MagnetError

from tiny_clap import SR, WINDOW
from tiny_clap import tiny_clap as _tiny_clap


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: thread hand-offs cost more than the work


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory):
    return _tiny_clap(tmp_path_factory.mktemp("clap") / "tiny-clap")


@pytest.fixture(scope="module")
def scorer(clap_dir):
    return ClapScorer.from_pretrained(clap_dir, device="cpu")


def _audio(seconds, sr=SR, channels=1, seed=0, batch=None):
    """Noise through a seed-dependent resonance plus a tone, so different seeds sound different."""
    g = torch.Generator().manual_seed(seed)
    n = int(round(seconds * sr))
    shape = (batch, channels, n) if batch else (channels, n)
    t = torch.arange(n) / sr
    freq = 200.0 + 150.0 * (seed % 7)
    return 0.05 * torch.randn(shape, generator=g) + 0.3 * torch.sin(2 * math.pi * freq * t)


def _reference_score(clap_dir, wav, sr, text):
    """The audiocraft/laion protocol written out with transformers directly (one clip up to one window)."""
    from transformers import ClapModel, ClapProcessor
    model = ClapModel.from_pretrained(clap_dir).eval()
    proc = ClapProcessor.from_pretrained(clap_dir)
    mono = resample(wav, sr, SR).mean(dim=0)                       # audiocraft: resample, then downmix
    feats = proc.feature_extractor([mono.numpy()], sampling_rate=SR, truncation="rand_trunc",
                                   padding="repeatpad", max_length=WINDOW, return_tensors="pt")
    tok = proc.tokenizer([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        a = model.get_audio_features(input_features=feats["input_features"])
        t = model.get_text_features(**tok)
    a, t = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (a, t))   # transformers 4 / 5
    return float(torch.nn.functional.cosine_similarity(a, t, dim=1, eps=1e-8)[0])


# --- scores ------------------------------------------------------------------------------------

def test_scores_are_cosine_similarities_in_range(scorer):
    wav = _audio(0.4, sr=32000, channels=2, batch=3)
    scores = scorer.score(wav, 32000, ["a calm piano", "loud drums", "birds"], loudness=None)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert bool(((scores >= -1) & (scores <= 1)).all())
    # the same number as cosine_similarity(embeddings): unit-norm embeddings, dot product
    a = torch.cat(scorer.audio_embeddings(wav, 32000, loudness=None))
    t = scorer.text_embeddings(["a calm piano", "loud drums", "birds"])
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(scores, torch.nn.functional.cosine_similarity(a, t, dim=1))


def test_score_matches_the_audiocraft_protocol_written_out(scorer, clap_dir):
    wav = _audio(0.3, sr=32000, channels=2, seed=3)                  # stereo, 32 kHz, shorter than a window
    got = float(scorer.score(wav[None], 32000, "lofi hip hop beat", loudness=None)[0])
    assert got == pytest.approx(_reference_score(clap_dir, wav, 32000, "lofi hip hop beat"), abs=1e-5)


def test_texts_are_truncated_to_77_tokens_like_laion(scorer):
    wav = _audio(0.3)
    long = "a" * 100                                                 # 100 tokens with the byte-level vocab
    assert float(scorer.score(wav, SR, long, loudness=None)) == pytest.approx(
        float(scorer.score(wav, SR, "a" * 75, loudness=None)), abs=1e-6)   # 75 + <s> + </s> = 77


def test_one_text_applies_to_every_clip(scorer):
    wav = _audio(0.3, batch=3)
    torch.testing.assert_close(scorer.score(wav, SR, "rain", loudness=None),
                               scorer.score(wav, SR, ["rain"] * 3, loudness=None))


# --- batches and windows -----------------------------------------------------------------------

def test_batch_scores_equal_single_scores(scorer):
    clips = [_audio(s, sr=32000, seed=i) for i, s in enumerate([0.2, 0.5, 1.3])]   # 1.3 s = several windows
    texts = ["cello", "synth bass", "a dog barks"]
    together = scorer.score(clips, 32000, texts, batch_size=2)
    alone = torch.cat([scorer.score([c], 32000, [t]) for c, t in zip(clips, texts)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    batch = torch.stack([_audio(0.4, sr=32000, seed=i) for i in range(3)])
    torch.testing.assert_close(scorer.score(batch, 32000, texts),
                               scorer.score(list(batch), [32000] * 3, texts), atol=1e-5, rtol=0)


def test_clip_repeated_twice_scores_the_same_as_once(scorer):
    one = _audio(WINDOW / SR, seed=5)                                 # exactly one window
    two = torch.cat([one, one], dim=-1)                              # two identical windows
    half = one[:, : WINDOW // 2]                                     # repeat-padded to the window...
    half2 = torch.cat([half, half], dim=-1)                          # ...which is this clip
    s = scorer.score([one, two, half, half2], SR, "a tone", loudness=None)
    assert float(s[1]) == pytest.approx(float(s[0]), abs=1e-5)
    assert float(s[3]) == pytest.approx(float(s[2]), abs=1e-5)
    # with the paper's loudness normalisation and resampling from 32 kHz: the same within tolerance
    one32 = resample(one, SR, 32000)
    s32 = scorer.score([one32, torch.cat([one32, one32], dim=-1)], 32000, "a tone")
    assert float(s32[1]) == pytest.approx(float(s32[0]), abs=1e-3)


def test_long_clip_scores_the_mean_over_evenly_spaced_windows(scorer):
    clip = _audio(2.5 * WINDOW / SR, seed=7)                          # 2.5 windows -> 3 overlapping windows
    starts = [0, int(0.75 * WINDOW), int(1.5 * WINDOW)]
    parts = [clip[:, s:s + WINDOW] for s in starts]
    per_window = scorer.score(parts, SR, "a tone", loudness=None)
    assert float(scorer.score(clip, SR, "a tone", loudness=None)) == pytest.approx(
        float(per_window.mean()), abs=1e-5)
    assert scorer.audio_embeddings(clip, SR, loudness=None)[0].shape[0] == 3


@pytest.mark.parametrize("length", [1, 100, WINDOW - 1, WINDOW, WINDOW + 1, 2 * WINDOW, 3 * WINDOW + 7])
def test_windows_are_full_length_and_cover_the_clip(length):
    x = np.arange(length, dtype=np.float32)
    ws = _windows(x, WINDOW)
    assert len(ws) == max(1, math.ceil(length / WINDOW))
    if length <= WINDOW:
        assert ws[0] is x
    else:
        assert all(w.shape[0] == WINDOW for w in ws)
        assert ws[0][0] == 0 and ws[-1][-1] == length - 1
        assert all(b[0] <= a[-1] + 1 for a, b in zip(ws, ws[1:]))   # no gap between windows


def test_loudness_normalisation_makes_the_score_gain_invariant(scorer):
    wav = _audio(0.5, sr=32000, seed=2)
    s = scorer.score([wav, 0.1 * wav], 32000, "a tone")              # default: -14 LUFS like the paper
    assert float(s[1]) == pytest.approx(float(s[0]), abs=1e-4)
    raw = scorer.score([wav, 0.1 * wav], 32000, "a tone", loudness=None)
    assert abs(float(raw[1] - raw[0])) > 1e-3                        # CLAP itself is not gain invariant


def test_fusion_models_score_without_randomness(tmp_path):
    fused = ClapScorer.from_pretrained(_tiny_clap(tmp_path / "fused", fusion=True), device="cpu")
    wav = _audio(0.3, batch=3)
    a = fused.score(wav, SR, "a tone", loudness=None)
    b = fused.score(wav, SR, "a tone", loudness=None)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[:1], fused.score(wav[:1], SR, "a tone", loudness=None))


# --- ranking -----------------------------------------------------------------------------------

def test_rank_orders_variations_best_first(scorer):
    wav = torch.cat([_audio(0.4, sr=32000, seed=i)[None] for i in range(5)])
    ranking = scorer.rank(wav, 32000, "a bright tone")
    torch.testing.assert_close(ranking.scores, scorer.score(wav, 32000, "a bright tone"))
    assert sorted(ranking.order) == list(range(5))
    ordered = ranking.scores[ranking.order]
    assert bool((ordered[:-1] >= ordered[1:]).all())
    assert ranking.order[0] == int(ranking.scores.argmax())


def test_rank_breaks_ties_by_position(scorer):
    wav = _audio(0.3, seed=1)
    assert scorer.rank(torch.stack([wav, wav, wav]), SR, "x", loudness=None).order == [0, 1, 2]


def test_rank_takes_one_prompt(scorer):
    with pytest.raises(MagnetError, match="one prompt"):
        scorer.rank(_audio(0.3, batch=2), SR, ["a", "b"])


# --- bad input ---------------------------------------------------------------------------------

def test_missing_folder_names_it_and_how_to_download(tmp_path):
    missing = tmp_path / "larger_clap_music"
    with pytest.raises(MagnetError) as e:
        ClapScorer.from_pretrained(missing)
    assert str(missing) in str(e.value) and "download laion/larger_clap_music" in str(e.value)


def test_folder_that_is_not_a_clap_model(tmp_path):
    with pytest.raises(MagnetError, match="no config.json"):
        ClapScorer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(MagnetError, match="holds a t5 model, not CLAP"):
        ClapScorer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(MagnetError, match="not readable JSON"):
        ClapScorer.from_pretrained(tmp_path)


def test_pickle_weights_are_refused(tmp_path, clap_dir):
    folder = tmp_path / "clap"
    folder.mkdir()
    (folder / "config.json").write_text((clap_dir / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(MagnetError, match="only pickle weights"):
        ClapScorer.from_pretrained(folder)


def test_folder_without_processor_files(tmp_path, clap_dir):
    folder = tmp_path / "clap"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((clap_dir / name).read_bytes())
    with pytest.raises(MagnetError, match="processor|tokenizer"):
        ClapScorer.from_pretrained(folder)


def test_weights_that_do_not_match_the_config(tmp_path, clap_dir):
    folder = tmp_path / "clap"
    folder.mkdir()
    for p in clap_dir.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = 2                      # one layer more than the weights hold
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MagnetError, match="lacks .* weights"):
        ClapScorer.from_pretrained(folder)


def test_silent_audio_is_refused(scorer):
    wav = _audio(0.3, batch=2)
    wav[1] = 0
    with pytest.raises(MagnetError, match="audio clip 1 is silent"):
        scorer.score(wav, SR, "rain")
    with pytest.raises(MagnetError, match="silent"):
        scorer.score(1e-6 * _audio(0.3), SR, "rain")


def test_empty_audio_is_refused(scorer):
    with pytest.raises(MagnetError, match="empty"):
        scorer.score(torch.zeros(1, 1, 0), SR, "rain")
    with pytest.raises(MagnetError, match="empty"):
        scorer.score([_audio(0.3), torch.zeros(1, 0)], SR, ["rain", "wind"])
    with pytest.raises(MagnetError, match="no audio"):
        scorer.score([], SR, "rain")


@pytest.mark.parametrize("texts, match", [(["a", "b", "c"], "2 audio clips but 3 texts"),
                                           (["a", "  "], "text 1 is empty"),
                                           (["a", None], "not a string")])
def test_bad_texts(scorer, texts, match):
    with pytest.raises(MagnetError, match=match):
        scorer.score(_audio(0.3, batch=2), SR, texts)


def test_bad_sample_rates(scorer):
    with pytest.raises(MagnetError, match="sample rates"):
        scorer.score([_audio(0.3), _audio(0.3)], [SR], ["a", "b"])
    with pytest.raises(MagnetError, match="sample_rate"):
        scorer.score(_audio(0.3), 0, "a")


# --- CLI ---------------------------------------------------------------------------------------

def _write_clips(tmp_path, n=3, sr=32000):
    paths = []
    for i in range(n):
        p = tmp_path / f"take_{i + 1}.wav"
        write_wav(p, _audio(0.6, sr=sr, seed=i), sr)
        paths.append(str(p))
    return paths


def test_cli_evaluate_prints_each_score_and_the_mean(tmp_path, clap_dir, scorer, capsys):
    from magnet.__main__ import main
    from magnet.audio import read_audio

    files = _write_clips(tmp_path)
    prompts = ["warm jazz trio", "", "heavy metal riff", "808 drums"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")  # blank lines are skipped
    assert main(["evaluate", "--clap", str(clap_dir), "--prompts", str(tmp_path / "prompts.txt"),
                 "--device", "cpu", *files]) == 0
    out = capsys.readouterr().out.splitlines()
    clips = [read_audio(f) for f in files]
    want = scorer.score([w for w, _ in clips], [sr for _, sr in clips], [p for p in prompts if p]).tolist()
    assert out[0].split() == ["file", "prompt", "CLAP"]
    for line, f, p, s in zip(out[1:4], files, [p for p in prompts if p], want):
        assert line.startswith(f) and p in line and line.endswith(f"{s:.4f}")
    assert out[4].startswith(f"mean CLAP score: {sum(want) / 3:.4f} over 3 files")


def test_cli_evaluate_one_prompt_sorted_best_first(tmp_path, clap_dir, capsys):
    from magnet.__main__ import main

    files = _write_clips(tmp_path, n=4)
    assert main(["evaluate", "--clap", str(clap_dir), "--prompt", "a tone", "--sort", "--loudness", "off",
                 "--device", "cpu", *files]) == 0
    rows = capsys.readouterr().out.splitlines()[1:5]
    scores = [float(r.split()[-1]) for r in rows]
    assert scores == sorted(scores, reverse=True) and sorted(r.split()[0] for r in rows) == sorted(files)


@pytest.mark.parametrize("extra, match", [
    (["--prompts", "PROMPTS2"], "3 audio files but 2 prompts"),
    (["--prompts", "MISSING"], "prompts file not found"),
    (["--prompt", "x", "--loudness", "loud"], "--loudness 'loud'"),
])
def test_cli_evaluate_errors_exit_2_with_the_fix(tmp_path, clap_dir, capsys, extra, match):
    from magnet.__main__ import main

    files = _write_clips(tmp_path)
    (tmp_path / "p2.txt").write_text("one\ntwo\n")
    extra = [{"PROMPTS2": str(tmp_path / "p2.txt"), "MISSING": str(tmp_path / "nope.txt")}.get(x, x)
             for x in extra]
    assert main(["evaluate", "--clap", str(clap_dir), *extra, *files]) == 2
    assert match in capsys.readouterr().err


def test_cli_evaluate_missing_model_folder(tmp_path, capsys):
    from magnet.__main__ import main

    files = _write_clips(tmp_path, n=1)
    assert main(["evaluate", "--clap", str(tmp_path / "clap"), "--prompt", "x", *files]) == 2
    err = capsys.readouterr().err
    assert "CLAP model folder not found" in err and "--local-dir" in err


def test_cli_generates_a_set_then_scores_it_and_measures_fad_between_sets(ref, tmp_path, clap_dir, capsys):
    import json
    from magnet.__main__ import main
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a low tone\n\nbright noise\n")
    model = ["--model", str(ref / "magnet-music"), "--text-encoder", str(ref / "t5-base"), "--device", "cpu",
             "--steps", "1,1,1,1", "--seconds", "0.4", "--no-download"]
    out = tmp_path / "set"
    assert main(["generate", "--prompts", str(prompts), "--out", str(out), "--per-prompt", "2", "--seed", "3",
                 *model]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000_0.wav", "00000_1.wav", "00001_0.wav", "00001_1.wav"]
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "00001_1.wav").unlink()
    assert main(["generate", "--prompts", str(prompts), "--out", str(out), "--per-prompt", "2", "--seed", "3",
                 "--batch", "4", *model]) == 0                  # a rerun makes only what is missing, the same bytes
    assert "wrote 1 clip(s), 3 already there" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert main(["evaluate", str(out), "--prompts", str(prompts), "--clap", str(clap_dir), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["count"] == 4 and -1 <= r["mean"] <= 1 and {x["prompt"] for x in r["per_file"]} == {"a low tone",
                                                                                                   "bright noise"}
    other = tmp_path / "other"
    assert main(["generate", "--prompts", str(prompts), "--out", str(other), "--per-prompt", "2", "--seed", "9",
                 *model]) == 0
    capsys.readouterr()
    stats = tmp_path / "ref.npz"
    assert main(["evaluate", "--fad", str(out), str(other), "--embedding", "encodec", "--model",
                 str(ref / "magnet-music"), "--no-download", "--json", "--save-stats", str(stats)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["fad"] > 0 and r["ref_count"] == 4 and stats.is_file()
    assert main(["evaluate", "--fad", str(stats), str(other), "--embedding", "encodec", "--model",
                 str(ref / "magnet-music"), "--no-download", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fad"] == pytest.approx(r["fad"], rel=1e-9)
    assert main(["evaluate", "--fad", str(stats), str(other), "--embedding", "clap", "--clap", str(clap_dir)]) == 2
    assert "encodec" in capsys.readouterr().err                      # statistics of another embedding refused
