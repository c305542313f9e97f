"""MAGNeT's training objective against the reference solver's goldens, and the LoRA training loop.

Goldens: ../shared/reference/train_golden.* (magnet-music) and tests/goldens/train_*.* (magnet-audio, and a
release of other shapes and span length 4 rebuilt here with `make_release`), all made by audiocraft 1.3.0's
MagnetSolver code (`_calc_mean_maskrate_to_u_LUT`, `_spans_mask`, `_compute_cross_entropy_magnet`,
`compute_predictions(..., stage=s)`) on fixed codes, prompts and masks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_release
from magnet import MagnetModel
from magnet.errors import MagnetError
from magnet.train import spans_mask, span_starts_table, stage_loss

GOLDENS = Path(__file__).parent / "goldens"
REL_TOL = 1e-5


def _load_golden(path: Path):
    from safetensors.torch import load_file
    return load_file(str(path)), json.loads(path.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def cases(ref, music_model, audio_model, tmp_path_factory):
    """(model, golden tensors, golden notes) for each golden."""
    out = {"music": (music_model, *_load_golden(ref / "train_golden.safetensors")),
           "audio": (audio_model, *_load_golden(GOLDENS / "train_audio.safetensors"))}
    g, notes = _load_golden(GOLDENS / "train_wide.safetensors")
    spec = dict(notes["make_release"])
    src = ref / spec.pop("src")
    with torch.random.fork_rng():
        torch.manual_seed(spec["seed"])          # make_release draws the text projection from the global generator
        folder = make_release(src, tmp_path_factory.mktemp("wide") / notes["release"], **spec)
    wide = MagnetModel.from_pretrained(folder, text_encoder=ref / "t5-base", device="cpu")
    out["wide"] = (wide, g, notes)
    return out


@pytest.mark.parametrize("name", ["music", "audio", "wide"])
def test_span_starts_table_equals_the_reference_table(cases, name):
    _, g, notes = cases[name]
    table = span_starts_table(notes["T"], notes["span_len"])
    assert len(table) == 101
    assert table == g["lut"].tolist()


@pytest.mark.parametrize("name", ["music", "audio", "wide"])
def test_stage_loss_equals_the_reference_loss_for_every_stage(cases, name):
    model, g, notes = cases[name]
    for stage in range(notes["K"]):
        loss = stage_loss(model, g["codes"], notes["prompts"], stage, g[f"stage{stage}.mask"].bool())
        want = float(g[f"stage{stage}.loss"])
        assert loss.dim() == 0 and loss.dtype == torch.float32
        assert abs(float(loss) - want) <= REL_TOL * abs(want), (name, stage, float(loss), want)


@pytest.mark.parametrize("name", ["music", "wide"])
def test_spans_mask_draws_the_reference_spans_from_the_same_random_stream(cases, name):
    _, g, notes = cases[name]
    for stage in range(notes["K"]):
        torch.manual_seed(100 + stage)          # the goldens' masks were drawn with the global generator
        mask = spans_mask(g[f"stage{stage}.rates"], notes["T"], notes["span_len"], g["lut"])
        assert torch.equal(mask, g[f"stage{stage}.mask"].bool())


def test_stage_loss_is_differentiable_and_depends_on_the_masked_positions_only(music_model):
    torch.manual_seed(0)
    lm = music_model.lm
    codes = torch.randint(0, lm.cfg.card, (1, lm.cfg.n_q, 30))
    mask = torch.zeros(1, 30, dtype=torch.bool)
    mask[0, 6:12] = True
    w = lm.linears[1].weight
    w.requires_grad_(True)
    try:
        loss = stage_loss(music_model, codes, ["a prompt"], 1, mask)
        loss.backward()
        assert w.grad is not None and float(w.grad.abs().sum()) > 0
        # a target outside the mask changes nothing, but its input is given (stage 1 sees codebook 0 and
        # codebook 1 outside the mask): change a target inside the mask instead and the loss moves
        other = codes.clone()
        other[0, 1, 8] = (codes[0, 1, 8] + 1) % lm.cfg.card
        assert float(stage_loss(music_model, other, ["a prompt"], 1, mask).detach()) != float(loss.detach())
        far = codes.clone()
        far[0, 2:, 20] = (codes[0, 2:, 20] + 1) % lm.cfg.card    # codebooks above the stage are all masked
        assert float(stage_loss(music_model, far, ["a prompt"], 1, mask).detach()) == float(loss.detach())
    finally:
        w.requires_grad_(False)
        w.grad = None


def test_stage_loss_refuses_bad_arguments(music_model):
    K = music_model.cfg.n_q
    codes = torch.zeros(2, K, 12, dtype=torch.long)
    mask = torch.ones(2, 12, dtype=torch.bool)
    with pytest.raises(MagnetError, match="stage"):
        stage_loss(music_model, codes, ["a", None], K, mask)
    with pytest.raises(MagnetError, match="shape"):
        stage_loss(music_model, codes, ["a", None], 0, mask[:, :5])
    with pytest.raises(MagnetError, match="prompts"):
        stage_loss(music_model, codes, ["a"], 0, mask)
    with pytest.raises(MagnetError, match="integer codes"):
        stage_loss(music_model, codes.float(), ["a", None], 0, mask)


# -- the training loop ------------------------------------------------------------------------------------

from magnet import lora as L                                      # noqa: E402
from magnet.sampling import SamplingParams                         # noqa: E402
from magnet.train import TrainSettings, masked_loss, stage_inputs, text_memory, train_lora   # noqa: E402

CAPTION = "zqx glassy rising tone"


def clip_folder(tmp_path, monkeypatch, model, seed=0, name="data"):
    """A folder with one captioned clip whose tokens are random (the tiny fixture codec maps most sounds to a
    few tokens, which would make memorising trivial): the file is real, its encoding is replaced."""
    import numpy as np
    import soundfile as sf
    import magnet.dataset as D
    folder = tmp_path / name
    folder.mkdir()
    sf.write(str(folder / "clip.wav"), np.full((2205, 1), 0.1, np.float32), 22050)
    (folder / "clip.txt").write_text(CAPTION)
    codes = torch.randint(0, model.cfg.card, (model.cfg.n_q, model.max_frames),
                          generator=torch.Generator().manual_seed(seed))
    monkeypatch.setattr(D, "encode_file", lambda m, p, **k: codes.clone())
    return folder, codes


def fast(**kw):
    base = dict(steps=4, rank=4, lr=1e-3, warmup=1, seed=0, cache_dir=None, previews=False)
    base.update(kw)
    return TrainSettings(**base)


def test_training_on_one_clip_lowers_the_loss_and_greedy_generation_reproduces_it(music_model, tmp_path, monkeypatch):
    from magnet.train import validation_loss, _Captions
    from magnet.dataset import AudioFolder
    folder, codes = clip_folder(tmp_path, monkeypatch, music_model)
    before = {k: v.clone() for k, v in music_model.lm.state_dict().items()}
    res = train_lora(music_model, folder, tmp_path / "clip.safetensors",
                     TrainSettings(steps=300, rank=16, lr=5e-3, warmup=5, seed=0, val_dir=str(folder)))
    assert res.steps_done == 300 and len(res.losses) == 300 and not res.cancelled
    data = AudioFolder(folder, music_model)
    base_val = validation_loss(music_model.lm, data, _Captions(music_model, data.captions), music_model.max_frames,
                               music_model.cfg.span_len, "cpu")
    trained_val = res.val_losses[-1][1]
    assert trained_val < 0.6 * base_val, (trained_val, base_val)
    lw = L.load_lora(res.path)
    assert float(lw.meta["val_loss"]) == trained_val and lw.meta["steps"] == "300" and lw.meta["clips"] == "1"
    # the base model is untouched and frozen
    for k, v in music_model.lm.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(p.requires_grad for p in music_model.lm.parameters())
    # memorisation: greedy decoding with the caption gives back the clip's codebook-0 tokens
    p = SamplingParams(use_sampling=False)
    base = music_model.generate([CAPTION], seed=0, params=p)
    tuned = music_model.with_lora(res.path).generate([CAPTION], seed=0, params=p)
    T = tuned.shape[-1]
    share_base = float((base[0, 0] == codes[0, :T]).float().mean())
    share = float((tuned[0, 0] == codes[0, :T]).float().mean())
    chance = 1.0 / music_model.cfg.card
    assert share_base < 3 * chance + 0.03, share_base
    assert share >= 0.4, share           # measured 0.57 (chance 1/64 = 0.016; base 0.02)


def test_the_same_seed_on_the_cpu_gives_the_same_lora_bit_for_bit(music_model, tmp_path, monkeypatch):
    folder, _ = clip_folder(tmp_path, monkeypatch, music_model)
    runs = [L.load_lora(train_lora(music_model, folder, tmp_path / f"{i}.safetensors", fast(seed=s, dropout=0.1)).path)
            for i, s in enumerate((7, 7, 8))]
    assert runs[0].tensors.keys() == runs[1].tensors.keys()
    assert all(torch.equal(runs[0].tensors[k], runs[1].tensors[k]) for k in runs[0].tensors)
    assert any(not torch.equal(runs[0].tensors[k], runs[2].tensors[k]) for k in runs[0].tensors)


def test_gradient_checkpointing_gives_the_same_steps(music_model, tmp_path, monkeypatch):
    folder, _ = clip_folder(tmp_path, monkeypatch, music_model)
    a = train_lora(music_model, folder, tmp_path / "a.safetensors", fast(steps=3))
    b = train_lora(music_model, folder, tmp_path / "b.safetensors", fast(steps=3, checkpointing=True))
    assert a.losses == pytest.approx(b.losses, rel=1e-5)
    ta, tb = L.load_lora(a.path).tensors, L.load_lora(b.path).tensors
    assert all(torch.allclose(ta[k], tb[k], atol=1e-6) for k in ta)


def test_cancel_stops_within_a_step_and_leaves_a_complete_file_never_a_partial_one(music_model, tmp_path,
                                                                                     monkeypatch):
    folder, _ = clip_folder(tmp_path, monkeypatch, music_model)
    out_dir = tmp_path / "out"
    polls = []
    done = []

    def should_stop():
        polls.append(len(done))
        return len(done) >= 3
    res = train_lora(music_model, folder, out_dir / "lora.safetensors", fast(steps=50, save_every=2, grad_accum=2),
                     progress=lambda step, total, loss: done.append(step), should_stop=should_stop)
    assert res.cancelled and res.steps_done == 3 and done == [1, 2, 3]
    assert polls[-1] == 3 and len(polls) == 7           # polled before every micro-batch, stopped at the first
    lw = L.load_lora(res.path)
    assert lw.meta["steps"] == "3" and res.path == out_dir / "lora.step3.safetensors"
    # the periodic save of step 2 stays (its state replaced by the newer one); nothing under the name asked for
    assert sorted(p.name for p in out_dir.iterdir()) == ["lora.step2.safetensors", "lora.step3.safetensors",
                                                         "lora.step3.state.safetensors"]
    # cancelled before the first step, with no checkpoint yet: no file at all
    res = train_lora(music_model, folder, out_dir / "none.safetensors", fast(), should_stop=lambda: True)
    assert res.cancelled and res.path is None and not (out_dir / "none.safetensors").exists()


def test_a_failed_save_keeps_the_previous_file_and_leaves_no_partial_one(music_model, tmp_path, monkeypatch):
    import safetensors.torch as st
    path = tmp_path / "keep.safetensors"
    tensors = {"a.lora_A.weight": torch.ones(2, 3), "a.lora_B.weight": torch.zeros(3, 2)}
    L.save_lora(path, tensors, {"magnet_lora": "1"})
    old = path.read_bytes()
    real = st.save_file

    def half_then_fail(t, filename, metadata=None):
        real(t, filename, metadata=metadata)
        raise OSError("disk full")
    monkeypatch.setattr(st, "save_file", half_then_fail)
    with pytest.raises(OSError):
        L.save_lora(path, {k: v * 2 for k, v in tensors.items()}, {"magnet_lora": "1"})
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]


def _tensors(path):
    return L.load_lora(path).tensors


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("how", ["should_stop", "periodic"])
def test_a_stopped_run_resumed_from_its_file_ends_bit_identical_to_one_never_stopped(music_model, tmp_path,
                                                                                      monkeypatch, how):
    folder, _ = clip_folder(tmp_path, monkeypatch, music_model)
    kw = dict(steps=7, batch=2, grad_accum=2, dropout=0.1, warmup=2, seed=3, save_every=0)
    whole = train_lora(music_model, folder, tmp_path / "whole.safetensors", fast(**kw))
    out = tmp_path / "parts" / "lora.safetensors"
    if how == "should_stop":
        done = []
        part = train_lora(music_model, folder, out, fast(**kw), progress=lambda *a: done.append(a),
                          should_stop=lambda: len(done) >= 3)
        assert part.cancelled and part.path == out.with_name("lora.step3.safetensors") and not out.exists()
        resume = part.path
    else:
        part = train_lora(music_model, folder, out, fast(**dict(kw, steps=4)))   # a finished run of 4 ...
        resume = part.path                                                    # ... continued to 7
    assert part.state.is_file() and not _same(_tensors(part.path), _tensors(whole.path))
    rest = train_lora(music_model, folder, out, fast(**kw), resume=resume)
    assert rest.steps_done == 7 and rest.path == out and L.load_lora(out).meta["steps"] == "7"
    if how == "should_stop":
        assert _same(_tensors(out), _tensors(whole.path))
        assert rest.losses == whole.losses[3:]
    else:      # the schedule's total was 4 the first time (its cosine ended there): the same steps, other rates
        assert len(rest.losses) == 3


def test_resume_refuses_another_release_rank_alpha_targets_or_dataset_naming_both(music_model, tmp_path,
                                                                                 monkeypatch):
    folder, _ = clip_folder(tmp_path, monkeypatch, music_model)
    first = train_lora(music_model, folder, tmp_path / "a.safetensors", fast(steps=2))
    for kw, match in ((dict(rank=8), "rank is 4, this run's is 8"), (dict(alpha=2.0), "alpha is 4.0, this run's is 2.0"),
                      (dict(targets=("linear1",)), "targets")):
        with pytest.raises(MagnetError, match=match):
            train_lora(music_model, folder, tmp_path / "b.safetensors", fast(steps=6, **kw), resume=first.path)
    with pytest.raises(MagnetError, match="has 2 steps already"):
        train_lora(music_model, folder, tmp_path / "b.safetensors", fast(steps=2), resume=first.path)
    other, _ = clip_folder(tmp_path, monkeypatch, music_model, name="other")
    (other / "clip.txt").write_text("another caption")
    with pytest.raises(MagnetError, match="dataset differs.*other captions"):
        train_lora(music_model, other, tmp_path / "b.safetensors", fast(steps=6), resume=first.path)
    import magnet.train_state as TS
    state = TS.load_state(first.state)
    state.info["release"] = "magnet-medium-10secs"
    with pytest.raises(MagnetError, match="release is 'magnet-medium-10secs', this run's is 'magnet-music'"):
        TS.check_resume(state, {"release": "magnet-music", "rank": 4, "alpha": 4.0,
                                "targets": list(state.info["settings"]["targets"]), "dataset": state.info["dataset"]})


@pytest.mark.parametrize("damage", ["steps_text", "null_targets", "no_json", "garbage", "alpha_text", "no_adam"])
def test_a_damaged_training_state_is_refused_clearly(music_model, tmp_path, monkeypatch, damage):
    import json
    from safetensors import safe_open
    from safetensors.torch import save_file
    folder, _ = clip_folder(tmp_path, monkeypatch, music_model)
    first = train_lora(music_model, folder, tmp_path / "a.safetensors", fast(steps=2))
    with safe_open(str(first.state), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        info = json.loads(f.metadata()["state"])
    meta = {"state": info}
    if damage == "steps_text":
        info["step"] = "two"
    elif damage == "null_targets":
        info["settings"]["targets"] = None
    elif damage == "alpha_text":
        info["settings"]["alpha"] = "x"
    elif damage == "no_adam":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("adam.")}
    if damage == "garbage":
        first.state.write_bytes(b"\x00" * 100)
    else:
        save_file(tensors, str(first.state), metadata={} if damage == "no_json" else {"state": json.dumps(meta["state"])})
    with pytest.raises(MagnetError, match="training state|optimizer state"):
        train_lora(music_model, folder, tmp_path / "b.safetensors", fast(steps=4), resume=first.path)


def test_a_lora_without_a_state_resumes_from_its_step_count_and_its_alpha_is_compared(music_model, tmp_path,
                                                                                   monkeypatch):
    folder, _ = clip_folder(tmp_path, monkeypatch, music_model)
    first = train_lora(music_model, folder, tmp_path / "a.safetensors", fast(steps=4, alpha=8.0))
    first.state.unlink()
    logs = []
    res = train_lora(music_model, folder, tmp_path / "b.safetensors", fast(steps=6, alpha=8.0), resume=first.path,
                     log=logs.append)
    assert res.steps_done == 6 and len(res.losses) == 2 and any("not an exact resume" in x for x in logs)
    with pytest.raises(MagnetError, match="alpha is 8.0, this run's is 4.0"):
        train_lora(music_model, folder, tmp_path / "c.safetensors", fast(steps=6), resume=first.path)


def test_everything_is_checked_before_any_file_is_encoded(music_model, ref, tmp_path, monkeypatch):
    import magnet.dataset as D
    folder, _ = clip_folder(tmp_path, monkeypatch, music_model)
    monkeypatch.setattr(D, "encode_file", lambda m, p: pytest.fail("encoded before the checks"))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.safetensors").mkdir()
    for out, match in ((tmp_path / "adir.safetensors", "is a folder"),
                       (tmp_path / "afile" / "x.safetensors", "under .*afile.*which is a file"),
                       (Path("/proc/self/nope/x.safetensors"), "cannot write the LoRA"),
                       (tmp_path / "x.pt", "must end in .safetensors")):
        with pytest.raises(MagnetError, match=match):
            train_lora(music_model, folder, out, fast())
    from magnet.text import TextEncoder
    with pytest.raises(MagnetError, match="width 1024.*expects 768"):
        wrong = music_model._sharing(text_encoder=TextEncoder(ref / "t5-large"))
        train_lora(wrong, folder, tmp_path / "x.safetensors", fast())
    with pytest.raises(MagnetError, match="rank 100000 is more than the layer"):
        train_lora(music_model, folder, tmp_path / "x.safetensors", fast(rank=100000))
    for kw in (dict(steps="200"), dict(steps=2.5), dict(lr="0.001"), dict(seed=1.5), dict(seed=True),
               dict(preview_seconds=float("nan")), dict(preview_prompts=[""])):
        with pytest.raises(MagnetError):
            train_lora(music_model, folder, tmp_path / "x.safetensors", fast(**kw))
    assert not list(tmp_path.glob("x.safetensors*"))


@pytest.mark.parametrize("seed", [2 ** 64 - 1, 10 ** 30, -5])
def test_any_whole_seed_trains_and_reproduces(music_model, tmp_path, monkeypatch, seed):
    folder, _ = clip_folder(tmp_path, monkeypatch, music_model)
    a = train_lora(music_model, folder, tmp_path / "a.safetensors", fast(steps=2, seed=seed))
    b = train_lora(music_model, folder, tmp_path / "b.safetensors", fast(steps=2, seed=seed))
    assert _same(_tensors(a.path), _tensors(b.path))
    c = train_lora(music_model, folder, tmp_path / "c.safetensors", fast(steps=2, seed=seed + 1))
    assert not _same(_tensors(a.path), _tensors(c.path))


def test_lora_metadata_holds_no_absolute_path_and_files_follow_the_umask(music_model, tmp_path, monkeypatch):
    import os
    folder, _ = clip_folder(tmp_path, monkeypatch, music_model)
    val, _ = clip_folder(tmp_path, monkeypatch, music_model, name="held_out")
    old = os.umask(0o002)
    try:
        res = train_lora(music_model, folder, tmp_path / "out" / "a.safetensors",
                         fast(steps=2, val_dir=str(val), cache_dir=str(tmp_path / "cache")))
    finally:
        os.umask(old)
    meta = L.load_lora(res.path).meta
    assert not any(str(tmp_path) in v or "/tmp" in v for v in meta.values()), meta
    training = __import__("json").loads(meta["training"])
    assert training["val_dir"] == "held_out" and training["dataset"] == "data" and "cache_dir" not in training
    for p in (res.path, res.state):
        assert (p.stat().st_mode & 0o777) == 0o664, p


def test_previews_are_rendered_at_each_save_and_at_the_end_through_the_normal_generation(music_model, tmp_path,
                                                                                         monkeypatch):
    import soundfile as sf
    folder, _ = clip_folder(tmp_path, monkeypatch, music_model)
    out = tmp_path / "my.safetensors"
    res = train_lora(music_model, folder, out, fast(steps=4, save_every=2, previews=True, trigger="zqx",
                                                    preview_seconds=0.4, preview_dir=str(tmp_path / "my_previews")))
    assert [p["step"] for p in res.previews] == [2, 4]
    assert res.previews[0]["prompts"] == ["zqx", f"zqx {CAPTION}"]
    names = sorted(p.name for p in (tmp_path / "my_previews").iterdir())
    assert names == ["step000002_0.wav", "step000002_1.wav", "step000004_0.wav", "step000004_1.wav"]
    wav = res.previews[-1]["audio"]
    assert wav.shape[:2] == (2, music_model.channels) and wav.shape[-1] > 0.3 * music_model.sample_rate
    data, sr = sf.read(str(tmp_path / "my_previews" / "step000004_1.wav"))
    assert sr == music_model.sample_rate and len(data) == wav.shape[-1]
    # the previews are the normal generation with the adapters of that step, from a fixed seed
    from magnet.train_state import derive_seed
    tuned = music_model.with_lora(res.path)
    want = tuned.decode(tuned.generate(res.previews[-1]["prompts"], duration=0.4, seed=derive_seed(0, "preview")))
    assert torch.allclose(wav, want, atol=1e-5)
    # previews do not change the training: the same LoRA as without them
    plain = train_lora(music_model, folder, tmp_path / "plain.safetensors", fast(steps=4, save_every=2, trigger="zqx"))
    assert _same(_tensors(res.path), _tensors(plain.path))


def test_padding_takes_no_loss(music_model):
    lm = music_model.lm
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, lm.cfg.card, (1, lm.cfg.n_q, 40), generator=g)
    valid = torch.zeros(1, 40, dtype=torch.bool)
    valid[0, :25] = True
    mask = torch.ones(1, 40, dtype=torch.bool)
    inputs, loss_at = stage_inputs(codes, 0, mask, lm.mask_id, valid)
    assert bool((inputs[0, :, 25:] == lm.mask_id).all()) and not bool(loss_at[0, 25:].any())
    cond = music_model.encode_text([CAPTION])
    mem = text_memory(lm, cond.hidden[:1], cond.mask[:1])
    with torch.no_grad():
        a = masked_loss(lm, codes, mem, 0, mask, valid)
        other = codes.clone()
        other[..., 25:] = (other[..., 25:] + 1) % lm.cfg.card       # what lies in the padding does not matter
        b = masked_loss(lm, other, mem, 0, mask, valid)
        none = masked_loss(lm, codes, mem, 0, mask, torch.zeros_like(valid))
    assert float(a) == float(b) and float(none) == 0.0


@pytest.mark.parametrize("kw,match", [
    (dict(steps=0), "steps"), (dict(lr=0.0), "learning rate"), (dict(lr=float("nan")), "lr"),
    (dict(rank=0), "rank"), (dict(targets=("q_proj",)), "targets"), (dict(dropout=1.0), "dropout"),
    (dict(alpha=float("inf")), "alpha"), (dict(cond_dropout=1.5), "cond_dropout"),
])
def test_bad_training_settings_are_refused(music_model, tmp_path, kw, match):
    with pytest.raises(MagnetError, match=match):
        train_lora(music_model, tmp_path, tmp_path / "x.safetensors", fast(**kw))


def test_bad_output_and_empty_folder_are_refused(music_model, tmp_path):
    with pytest.raises(MagnetError, match="safetensors"):
        train_lora(music_model, tmp_path, tmp_path / "x.pt", fast())
    with pytest.raises(MagnetError, match="no audio files"):
        train_lora(music_model, tmp_path, tmp_path / "x.safetensors", fast())


def test_cli_trains_then_generates_and_varies_with_the_lora(ref, tmp_path, capsys):
    import numpy as np
    import soundfile as sf
    from magnet.__main__ import main
    data = tmp_path / "data"
    data.mkdir()
    t = np.arange(22050) / 22050
    sf.write(str(data / "a.wav"), (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 22050)
    (data / "a.txt").write_text(CAPTION)
    out = tmp_path / "my.safetensors"
    rc = main(["train", str(data), "--model", str(ref / "magnet-music"), "--text-encoder", str(ref / "t5-base"),
               "--out", str(out), "--steps", "3", "--rank", "2", "--lr", "1e-3", "--seed", "5", "--trigger", "zqx",
               "--device", "cpu"])
    o = capsys.readouterr()
    assert rc == 0 and out.is_file() and "wrote" in o.out, o.err
    lw = L.load_lora(out)
    assert lw.meta["trigger"] == "zqx" and lw.meta["steps"] == "3" and lw.rank == 2
    wav = tmp_path / "g.wav"
    rc = main(["generate", "zqx tone", "--model", str(ref / "magnet-music"), "--text-encoder", str(ref / "t5-base"),
               "--seconds", "0.5", "--steps", "2,1,1,1", "--seed", "1", "--device", "cpu", "-o", str(wav),
               "--lora", f"{out}:0.7", "--lora", str(out)])
    assert rc == 0 and wav.is_file(), capsys.readouterr().err
    rc = main(["vary", str(data / "a.wav"), "zqx", "--model", str(ref / "magnet-music"), "--text-encoder",
               str(ref / "t5-base"), "--seed", "1", "--steps", "2,1,1,1", "--device", "cpu", "-o",
               str(tmp_path / "v.wav"), "--lora", str(out)])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    for bad, msg in ((f"{out}:nan", "strength"), (str(tmp_path / "none.safetensors"), "not found")):
        rc = main(["generate", "x", "--model", str(ref / "magnet-music"), "--device", "cpu", "--lora", bad])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and err.count("\n") == 1, err


def test_cli_ctrl_c_then_resume_gives_the_lora_of_a_run_never_stopped_and_writes_previews(ref, tmp_path, capsys,
                                                                                         monkeypatch):
    import os
    import signal
    import numpy as np
    import soundfile as sf
    import magnet.train as T
    from magnet.__main__ import main
    data = tmp_path / "data"
    data.mkdir()
    t = np.arange(22050) / 22050
    sf.write(str(data / "a.wav"), (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 22050)
    common = ["--model", str(ref / "magnet-music"), "--text-encoder", str(ref / "t5-base"), "--steps", "4",
              "--rank", "2", "--lr", "1e-3", "--seed", str(2 ** 64 - 1), "--device", "cpu", "--no-preview"]
    assert main(["train", str(data), "--out", str(tmp_path / "whole.safetensors"), *common]) == 0
    real = T.train_lora

    def ctrl_c_after_two(*a, progress=None, **k):          # the user presses Ctrl-C during step 2
        def p(step, total, loss):
            progress(step, total, loss)
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)
        return real(*a, progress=p, **k)
    monkeypatch.setattr(T, "train_lora", ctrl_c_after_two)
    out = tmp_path / "my.safetensors"
    assert main(["train", str(data), "--out", str(out), *common]) == 0
    assert "continue with --resume" in capsys.readouterr().out and not out.exists()
    monkeypatch.setattr(T, "train_lora", real)
    part = tmp_path / "my.step2.safetensors"
    assert main(["train", str(data), "--out", str(out), *common[:-1], "--resume", str(part),
                 "--preview", "a tone", "--preview-seconds", "0.3"]) == 0
    a, b = L.load_lora(out).tensors, L.load_lora(tmp_path / "whole.safetensors").tensors
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (tmp_path / "my_previews").iterdir()) == ["step000004_0.wav"]


def test_a_loudness_target_is_part_of_what_a_resume_must_keep(music_model, tmp_path, monkeypatch):
    folder, _ = clip_folder(tmp_path, monkeypatch, music_model)
    first = train_lora(music_model, folder, tmp_path / "a.safetensors", fast(steps=2, loudness=-14.0))
    with pytest.raises(MagnetError, match="loudness target -14.0 then, None now"):
        train_lora(music_model, folder, tmp_path / "b.safetensors", fast(steps=4), resume=first.path)
    with pytest.raises(MagnetError, match="loudness"):
        fast(loudness=5.0).checked()
