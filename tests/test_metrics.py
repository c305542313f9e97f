"""Set metrics (magnet.metrics: Frechet distance, statistics files, FAD-inf, farthest clips) and the set
embeddings and scores built on them (magnet.embeddings), on random embeddings, the tiny reference codec and a
tiny random CLAP model."""
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from magnet import embeddings, metrics
from magnet.audio import write_wav
from magnet.errors import MagnetError

from tiny_clap import tiny_clap as _tiny_clap

try:
    import scipy.linalg as _scipy_linalg
except ImportError:          # scipy is not a dependency: an independent eigenvalue computation stands in
    _scipy_linalg = None


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: thread hand-offs cost more than the work


def _reference_fd(a, b, use_scipy=True):
    """The textbook formula in float64: sqrtm(S1 S2) by scipy (else, or with use_scipy=False, by the
    eigenvalues of S1 S2, fadtk's other method), real part, pytorch-fid's 1e-6 diagonal offset when it is not
    finite."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)

    def tr_sqrt(x, y):
        if use_scipy and _scipy_linalg is not None:
            root = _scipy_linalg.sqrtm(x @ y)
            if not np.isfinite(root).all():
                return float("nan")
            return float(np.trace(root).real)
        return float(np.sqrt(np.linalg.eigvals(x @ y).astype(complex)).sum().real)

    tr = tr_sqrt(s1, s2)
    if not math.isfinite(tr):
        off = np.eye(len(m1)) * 1e-6
        tr = tr_sqrt(s1 + off, s2 + off)
    return float((m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * tr)


def _correlated(rng, n, d, shift=0.0):
    mix = rng.standard_normal((d, d)) / math.sqrt(d)
    return rng.standard_normal((n, d)) @ mix + shift


# --- the Frechet distance ---------------------------------------------------------------------

@pytest.mark.parametrize("n,d", [(2000, 16), (1000, 64), (600, 32), (800, 96)])
def test_frechet_distance_equals_the_reference_formula_on_well_conditioned_sets(n, d):
    rng = np.random.default_rng(d)
    for _ in range(2):
        a, b = _correlated(rng, n, d, 0.1), _correlated(rng, n + 7, d)
        got = metrics.frechet_distance(a, b)
        assert got == pytest.approx(_reference_fd(a, b), rel=1e-9)          # measured: <= 2e-12 relative
        assert got == pytest.approx(_reference_fd(a, b, use_scipy=False), rel=1e-9)


@pytest.mark.parametrize("n,d", [(10, 16), (16, 16), (30, 64), (64, 64), (40, 96)])
def test_frechet_distance_where_sets_have_no_more_rows_than_dimensions(n, d):
    rng = np.random.default_rng(n + d)
    a, b = rng.standard_normal((n, d)), 1.3 * rng.standard_normal((n + 3, d)) + 0.2
    assert metrics.frechet_distance(a, b) == pytest.approx(_reference_fd(a, b), rel=1e-5)   # measured <= 3e-8


def test_frechet_distance_of_known_gaussians():
    # commuting (diagonal) covariances: tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    want = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert metrics.frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)
    # the same in a rotated basis: the distance does not depend on the basis
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((3, 3)))
    got = metrics.frechet_distance_from_stats(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(want, rel=1e-10)


def test_a_shifted_copy_is_the_squared_shift_away_and_a_set_is_zero_from_itself():
    rng = np.random.default_rng(1)
    a = _correlated(rng, 500, 24)
    shift = rng.standard_normal(24)
    assert metrics.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-9)
    assert abs(metrics.frechet_distance(a, a)) < 1e-9 * float(np.trace(np.cov(a, rowvar=False)))


def test_frechet_distance_takes_torch_tensors_and_is_symmetric():
    rng = np.random.default_rng(2)
    a, b = _correlated(rng, 300, 8), _correlated(rng, 200, 8, 0.3)
    d = metrics.frechet_distance(a, b)
    assert metrics.frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == d
    assert metrics.frechet_distance(b, a) == pytest.approx(d, rel=1e-9)
    f32 = metrics.frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b).half())
    assert f32 == pytest.approx(d, rel=1e-2)


def test_the_diagonal_offset_is_added_when_the_square_root_is_not_finite(monkeypatch):
    calls = []
    real = metrics._trace_sqrt

    def flaky(s1, s2):
        calls.append(s1.copy())
        return float("nan") if len(calls) == 1 else real(s1, s2)
    monkeypatch.setattr(metrics, "_trace_sqrt", flaky)
    s = np.diag([1.0, 2.0])
    got = metrics.frechet_distance_from_stats(np.zeros(2), s, np.zeros(2), s)
    assert len(calls) == 2 and np.allclose(calls[1], s + 1e-6 * np.eye(2))
    assert got == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("a,b,match", [
    (np.zeros((1, 3)), np.zeros((5, 3)), "1 embedding row"),
    (np.zeros((5, 3)), np.zeros((5, 4)), "different widths"),
    (np.full((5, 3), np.nan), np.zeros((5, 3)), "NaN"),
    (np.zeros(5), np.zeros((5, 3)), r"\[rows, width\]"),
    (np.zeros((5, 3), dtype=np.int64), np.zeros((5, 3)), "float"),
])
def test_frechet_distance_refuses_bad_sets(a, b, match):
    with pytest.raises(MagnetError, match=match):
        metrics.frechet_distance(a, b)


def test_stats_of_mismatched_shapes_are_refused():
    with pytest.raises(MagnetError, match="do not fit"):
        metrics.frechet_distance_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- set statistics and their files -------------------------------------------------------------

def test_set_stats_are_the_mean_and_unbiased_covariance_of_all_rows():
    rng = np.random.default_rng(3)
    clips = [rng.standard_normal((n, 6)).astype(np.float32) * 3 + 100 for n in (1, 4, 9, 2)]
    s = metrics.set_stats(clips, "x:1")
    rows = np.concatenate(clips).astype(np.float64)
    np.testing.assert_allclose(s.mean, rows.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.cov, np.cov(rows, rowvar=False), rtol=1e-10, atol=1e-12)
    assert (s.count, s.clips, s.embedding, s.width) == (16, 4, "x:1", 6)
    assert metrics.fad(s, metrics.set_stats([torch.from_numpy(c) for c in clips], "x:1")) == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize("clips,match", [
    ([np.zeros((5, 3))], "1 clip: .*at least 2 clips"),
    ([], "0 clips"),
    ([np.zeros((1, 3)), np.zeros((1, 4))], "width 4 but clip 0 has 3"),
    ([np.zeros((2, 3)), np.full((2, 3), np.inf)], "clip 1 .* NaN or infinite"),
    ([np.zeros((0, 3)), np.zeros((2, 3))], r"rows >= 1"),
    (np.zeros((4, 3)), r"one \[rows, width\] array of embeddings per clip"),
])
def test_sets_too_small_or_inconsistent_are_refused(clips, match):
    with pytest.raises(MagnetError, match=match):
        metrics.set_stats(clips, "x")


def test_stats_of_different_embeddings_are_not_compared():
    rng = np.random.default_rng(4)
    clips = [rng.standard_normal((3, 4)) for _ in range(5)]
    with pytest.raises(MagnetError, match="embedded differently"):
        metrics.fad(metrics.set_stats(clips, "clap:aa@-14LUFS"), metrics.set_stats(clips, "clap:aa@as-is"))


def test_stats_file_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    s = metrics.set_stats([rng.standard_normal((4, 5)) for _ in range(3)], "encodec:0123456789abcdef@-14LUFS")
    path = metrics.save_stats(tmp_path / "sub" / "ref.npz", s)
    back = metrics.load_stats(path, "encodec:0123456789abcdef@-14LUFS")
    assert (back.count, back.clips, back.embedding) == (s.count, s.clips, s.embedding)
    assert np.array_equal(back.mean, s.mean) and np.array_equal(back.cov, s.cov)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["ref.npz"]        # no temporary file left
    with np.load(path, allow_pickle=False) as data:                             # plain arrays, no pickle
        assert str(data["embedding"]) == s.embedding


def test_stats_files_of_another_embedding_or_damaged_are_refused(tmp_path):
    rng = np.random.default_rng(6)
    s = metrics.set_stats([rng.standard_normal((4, 5)) for _ in range(3)], "clap:aaaa@-14LUFS")
    good = metrics.save_stats(tmp_path / "ref.npz", s)
    with pytest.raises(MagnetError, match=r"ref\.npz holds statistics of another embedding \(clap:aaaa"):
        metrics.load_stats(good, "clap:bbbb@-14LUFS")
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(MagnetError, match=r"cut\.npz is not a readable statistics file"):
        metrics.load_stats(cut)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, mu=s.mean, sigma=s.cov)
    with pytest.raises(MagnetError, match=r"foreign\.npz is not a statistics file of this package"):
        metrics.load_stats(foreign)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, format=np.array("magnet-fad-stats"), version=np.array(1), mean=np.array([object()] * 5),
             cov=s.cov, count=np.array(12), clips=np.array(3), embedding=np.array("clap:aaaa@-14LUFS"))
    with pytest.raises(MagnetError, match=r"pickled\.npz is not a readable statistics file"):
        metrics.load_stats(pickled)
    bad = tmp_path / "nan.npz"
    metrics.save_stats(bad, metrics.SetStats(s.mean * np.nan, s.cov, s.count, s.embedding, s.clips))
    with pytest.raises(MagnetError, match=r"nan\.npz holds NaN"):
        metrics.load_stats(bad)
    shape = tmp_path / "shape.npz"
    metrics.save_stats(shape, metrics.SetStats(s.mean, s.cov[:3], s.count, s.embedding, s.clips))
    with pytest.raises(MagnetError, match=r"shape\.npz is damaged"):
        metrics.load_stats(shape)
    with pytest.raises(MagnetError, match="not found"):
        metrics.load_stats(tmp_path / "missing.npz")
    with pytest.raises(MagnetError, match=r"ending in \.npz"):
        metrics.save_stats(tmp_path / "ref.stats", s)


# --- FAD-inf ------------------------------------------------------------------------------------

def _clip_set(rng, n, d=4, rows=3, shift=0.0):
    return [rng.standard_normal((rows, d)) + shift for _ in range(n)]


def test_fad_inf_fits_fad_against_one_over_n_on_subsets_of_clips():
    rng = np.random.default_rng(7)
    ref = metrics.set_stats(_clip_set(rng, 60), "x")
    gen = _clip_set(rng, 64, shift=0.5)
    inf = metrics.fad_inf(ref, gen)
    assert inf.sizes[0] == 25 and inf.sizes[-1] == 64 and inf.sizes == sorted(set(inf.sizes))
    assert len(inf.sizes) == metrics.FAD_INF_STEPS
    # the whole set is the last subset; each point is the FAD of that many clips drawn without replacement
    assert inf.fads[-1] == pytest.approx(metrics.fad(ref, metrics.set_stats(gen, "x")), rel=1e-12)
    draw = np.random.default_rng(0)
    for n, f in zip(inf.sizes, inf.fads):
        pick = np.sort(draw.choice(len(gen), size=n, replace=False))
        assert f == pytest.approx(metrics.fad(ref, metrics.set_stats([gen[i] for i in pick], "x")), rel=1e-12)
    slope, intercept = np.polyfit(1.0 / np.array(inf.sizes), inf.fads, 1)
    assert (inf.score, inf.slope) == pytest.approx((intercept, slope), rel=1e-12)
    assert inf == metrics.fad_inf(ref, gen)                                     # seeded: the same every run


def test_fad_inf_removes_most_of_the_small_set_bias():
    # GEN drawn from REF's own distribution: the true distance is 0; FAD of 60 clips is biased upwards
    rng = np.random.default_rng(8)
    fads, infs = [], []
    for _ in range(8):
        ref = metrics.set_stats(_clip_set(rng, 60), "x")
        gen = _clip_set(rng, 60)
        fads.append(metrics.fad(ref, metrics.set_stats(gen, "x")))
        infs.append(metrics.fad_inf(ref, gen).score)
    assert np.mean(infs) < 0.75 * np.mean(fads)


def test_fad_inf_needs_fifty_clips_in_each_set():
    rng = np.random.default_rng(9)
    with pytest.raises(MagnetError, match="at least 50 clips in each set .*REF has 60, GEN 49"):
        metrics.fad_inf(metrics.set_stats(_clip_set(rng, 60), "x"), _clip_set(rng, 49))
    with pytest.raises(MagnetError, match="REF has 40"):
        metrics.fad_inf(metrics.set_stats(_clip_set(rng, 40), "x"), _clip_set(rng, 60))


# --- the farthest clips ---------------------------------------------------------------------------

def test_farthest_clips_are_the_ones_planted_far_from_ref():
    rng = np.random.default_rng(10)
    ref = metrics.set_stats(_clip_set(rng, 80, d=6), "x")
    gen = _clip_set(rng, 30, d=6)
    gen[7] = gen[7] + 6.0
    gen[21] = gen[21] * 4.0
    names = [f"{i:02d}.wav" for i in range(30)]
    worst = metrics.farthest_clips(ref, gen, names)
    assert [n for n, _ in worst[:2]] == ["07.wav", "21.wav"] and len(worst) == 5
    assert [d for _, d in worst] == sorted((d for _, d in worst), reverse=True)
    typical = [d for n, d in metrics.farthest_clips(ref, gen, names, k=30) if n not in ("07.wav", "21.wav")]
    assert 0.3 < np.median(typical) < 3                    # about 1 for clips drawn from REF's distribution
    with pytest.raises(MagnetError, match="one name per clip"):
        metrics.farthest_clips(ref, gen, names[:3])


def test_farthest_clips_work_when_ref_has_fewer_rows_than_dimensions():
    rng = np.random.default_rng(11)
    ref = metrics.set_stats(_clip_set(rng, 5, d=32, rows=1), "x")              # covariance of rank 4
    gen = _clip_set(rng, 6, d=32, rows=1)
    gen[2] = gen[2] + 5.0
    worst = metrics.farthest_clips(ref, gen, [str(i) for i in range(6)], k=2)
    assert worst[0][0] == "2" and all(math.isfinite(d) for _, d in worst)


# --- embeddings of audio folders ----------------------------------------------------------------

def _tone(seconds, sr, freq, seed=0, noise=0.05):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(round(seconds * sr))) / sr
    return (0.3 * torch.sin(2 * math.pi * freq * t) + noise * torch.randn(t.shape, generator=g))[None]


def _folder(path, n, sr=32000, seconds=0.2, base=220.0, loud=None):
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        wav = _tone(seconds, sr, base + 37.0 * (i % 11), seed=i)
        if loud is not None and i == loud:
            wav = torch.randn(wav.shape, generator=torch.Generator().manual_seed(99)).clamp(-1, 1)
        write_wav(path / f"{i:03d}.wav", wav, sr)
    return path


@pytest.fixture(scope="module")
def codec(music_model):
    return music_model.codec


def test_encodec_embedding_is_the_encoder_output_per_frame(codec):
    emb = embeddings.EncodecEmbedding(codec, loudness=None)
    wav = _tone(0.5, 16000, 300.0)                           # another rate: converted to the codec's first
    rows = emb.embed(wav, 16000)
    from magnet.audio import convert_audio
    x = convert_audio(wav, 16000, codec.sample_rate, codec.channels)
    with torch.inference_mode():
        want = codec.model.encoder(x[None])[0].T.numpy()
    assert rows.shape == (25, want.shape[1]) and rows.dtype == np.float32       # 50 frames a second
    np.testing.assert_array_equal(rows, want)
    assert emb.identity.startswith("encodec:") and emb.identity.endswith("@as-is")
    assert embeddings.EncodecEmbedding(codec).identity.endswith("@-14LUFS")
    assert embeddings.EncodecEmbedding(codec).identity.split("@")[0] == emb.identity.split("@")[0]


def test_encodec_embedding_from_a_release_folder_has_the_same_identity(codec, ref):
    emb = embeddings.make_embedder("encodec", model=ref / "magnet-music", device="cpu")
    assert emb.identity == embeddings.EncodecEmbedding(codec).identity


def test_embed_folder_skips_unreadable_and_hidden_files_with_a_warning(tmp_path, codec):
    folder = _folder(tmp_path / "set", 3)
    (folder / "broken.wav").write_bytes(b"RIFF....not audio")
    (folder / ".00000_0.1234abcd.tmp.wav").write_bytes(b"partial")
    (folder / "notes.txt").write_text("not audio")
    skipped = []
    with pytest.warns(UserWarning, match=r"skipped .*broken\.wav"):
        clips, names = embeddings.embed_folder(folder, embeddings.EncodecEmbedding(codec), skipped=skipped)
    assert names == ["000.wav", "001.wav", "002.wav"] and len(clips) == 3
    assert [Path(s["file"]).name for s in skipped] == ["broken.wav"]
    with pytest.raises(MagnetError, match="holds no audio files"):
        embeddings.embed_folder(tmp_path, embeddings.EncodecEmbedding(codec))


def test_fad_between_folders_and_statistics_files_agree(tmp_path, codec):
    ref_dir = _folder(tmp_path / "ref", 6)
    gen_dir = _folder(tmp_path / "gen", 5, base=260.0, loud=3)
    r = embeddings.fad_between(ref_dir, gen_dir, "encodec", model=codec, save_ref_stats=tmp_path / "ref.npz",
                               save_gen_stats=tmp_path / "gen.npz")
    assert (r["ref_count"], r["gen_count"], r["ref_rows"]) == (6, 5, 6 * 10)
    assert r["fad"] > 0 and r["embedding"] == embeddings.EncodecEmbedding(codec).identity
    assert "fad_inf" not in r                                  # fewer than 50 clips
    assert r["outliers"][0]["file"] == "003.wav" and len(r["outliers"]) == 5
    # the same distance from the saved statistics, either side
    assert embeddings.fad_between(tmp_path / "ref.npz", gen_dir, "encodec", model=codec)["fad"] == \
        pytest.approx(r["fad"], rel=1e-12)
    both = embeddings.fad_between(tmp_path / "ref.npz", tmp_path / "gen.npz", "encodec")   # no model needed
    assert both["fad"] == pytest.approx(r["fad"], rel=1e-12) and "outliers" not in both
    import json
    json.dumps(r)                                              # JSON-ready


def test_fad_between_refuses_mismatched_or_too_small_sets(tmp_path, codec):
    ref_dir, gen_dir = _folder(tmp_path / "ref", 3), _folder(tmp_path / "gen", 1)
    embeddings.fad_between(ref_dir, ref_dir, "encodec", model=codec, save_ref_stats=tmp_path / "ref.npz")
    with pytest.raises(MagnetError, match=r"GEN .* has 1 clip: .*at least 2 clips"):
        embeddings.fad_between(ref_dir, gen_dir, "encodec", model=codec)
    with pytest.raises(MagnetError, match="holds statistics of another embedding"):
        embeddings.fad_between(tmp_path / "ref.npz", ref_dir, "encodec", model=codec, loudness=None)
    with pytest.raises(MagnetError, match="statistics of the encodec embedding .*not clap"):
        embeddings.fad_between(tmp_path / "ref.npz", tmp_path / "ref.npz", "clap")
    with pytest.raises(MagnetError, match="needs the release"):
        embeddings.fad_between(ref_dir, ref_dir, "encodec")
    with pytest.raises(MagnetError, match="needs a CLAP model"):
        embeddings.fad_between(ref_dir, ref_dir, "clap")
    with pytest.raises(MagnetError, match="choose clap or encodec"):
        embeddings.fad_between(ref_dir, ref_dir, "vggish")
    with pytest.raises(MagnetError, match="does not exist"):
        embeddings.fad_between(tmp_path / "nowhere", ref_dir, "encodec", model=codec)
    with pytest.raises(MagnetError, match="already a statistics file"):
        embeddings.fad_between(tmp_path / "ref.npz", ref_dir, "encodec", model=codec,
                               save_ref_stats=tmp_path / "again.npz")


def test_fad_between_gives_fad_inf_from_fifty_clips(tmp_path, codec):
    ref_dir = _folder(tmp_path / "ref", 50, seconds=0.06)
    gen_dir = _folder(tmp_path / "gen", 52, seconds=0.06, base=240.0)
    r = embeddings.fad_between(ref_dir, gen_dir, "encodec", model=codec)
    assert math.isfinite(r["fad_inf"]) and r["fad_inf_fit"]["sizes"][-1] == 52
    assert r["fad_inf_fit"]["fads"][-1] == pytest.approx(r["fad"], rel=1e-12)


# --- CLAP ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    from magnet.clap import ClapScorer
    return ClapScorer.from_pretrained(_tiny_clap(tmp_path_factory.mktemp("clap") / "tiny-clap"), device="cpu")


def test_clap_embedding_is_the_scorers_window_embeddings(scorer):
    emb = embeddings.ClapEmbedding(scorer)
    wav = _tone(1.3, 32000, 440.0)                            # the tiny model's window is 0.5 s: 3 windows
    rows = emb.embed(wav, 32000)
    want = scorer.audio_embeddings([wav], 32000)[0].numpy()
    assert rows.shape == (3, want.shape[1])
    np.testing.assert_allclose(rows, want, atol=1e-6)
    assert emb.identity.startswith("clap:") and emb.identity.endswith("@-14LUFS")
    silent = emb.embed(torch.zeros(1, 8000), 32000)           # silence is embedded (the set counts it)
    assert silent.shape == (1, want.shape[1]) and np.isfinite(silent).all()


def test_fad_between_with_clap(tmp_path, scorer):
    ref_dir = _folder(tmp_path / "ref", 4, sr=48000)
    gen_dir = _folder(tmp_path / "gen", 3, sr=32000, loud=0)
    r = embeddings.fad_between(ref_dir, gen_dir, "clap", clap=scorer)
    assert r["embedding"].startswith("clap:") and r["gen_rows"] == 3 and math.isfinite(r["fad"])


def test_clap_score_set_pairs_each_file_with_its_prompt(tmp_path, scorer):
    from magnet import batch
    folder = tmp_path / "out"
    jobs = [batch.Job(0, "a calm piano"), batch.Job(1, "loud drums", name="drums"), batch.Job(2, "")]
    for stem, k, freq in (("00000", 0, 220.0), ("00000", 1, 330.0), ("drums", 0, 440.0), ("00002", 0, 550.0)):
        write_wav(folder / f"{stem}_{k}.wav", _tone(0.3, 32000, freq), 32000)
    write_wav(folder / "stray.wav", _tone(0.3, 32000, 100.0), 32000)              # not of the set: ignored
    write_wav(folder / "drums_1.wav", torch.zeros(1, 3200), 32000)                 # silent: skipped
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = embeddings.clap_score_outputs(folder, jobs, scorer)
    assert [p["file"] for p in s["per_file"]] == ["00000_0.wav", "00000_1.wav", "drums_0.wav"]
    assert [p["prompt"] for p in s["per_file"]] == ["a calm piano", "a calm piano", "loud drums"]
    assert sorted(Path(x["file"]).name for x in s["skipped"]) == ["00002_0.wav", "drums_1.wav"]
    assert any("drums_1.wav" in str(w.message) for w in caught)
    from magnet.audio import read_audio
    clips = [read_audio(folder / p["file"]) for p in s["per_file"]]
    want = scorer.score([w for w, _ in clips], [sr for _, sr in clips], [p["prompt"] for p in s["per_file"]])
    np.testing.assert_allclose([p["score"] for p in s["per_file"]], want.numpy(), atol=1e-6)
    assert s["mean"] == pytest.approx(float(want.double().mean()), abs=1e-6)
    assert s["std"] == pytest.approx(float(want.double().std(unbiased=False)), abs=1e-6)
    assert s["count"] == 3 and s["clap"] == "tiny-clap"
    with pytest.raises(MagnetError, match="no clips named as generate --prompts names them"):
        embeddings.clap_score_outputs(tmp_path, jobs, scorer)
    with pytest.raises(MagnetError, match="one prompt per file"):
        embeddings.clap_score_set([folder / "00000_0.wav"], ["a", "b"], scorer)
