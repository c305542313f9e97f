"""Damaged releases, bad parameters and numerical failures: each either works or raises a MagnetError that
names the problem and the fix; never a raw exception, a hang or a silently wrong result."""
from __future__ import annotations

import copy
import json
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

from magnet import MagnetModel, sampling
from magnet.errors import MagnetError


@contextmanager
def within(seconds: int):
    """Fail instead of hanging (the main thread only: SIGALRM)."""
    def alarm(*_):
        raise TimeoutError(f"took more than {seconds} s: a hang instead of a clear refusal")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _release(ref: Path, tmp_path: Path, mutate, name="magnet-music") -> Path:
    dst = tmp_path / name
    shutil.copytree(ref / name, dst)
    pkg = torch.load(dst / "state_dict.bin", weights_only=True)
    mutate(pkg)
    torch.save(pkg, dst / "state_dict.bin")
    return dst


def _xp(change):
    def mutate(pkg):
        xp = yaml.safe_load(pkg["xp.cfg"])
        change(xp)
        pkg["xp.cfg"] = yaml.safe_dump(xp)
    return mutate


def _load(path, ref):
    return MagnetModel.from_pretrained(path, text_encoder=ref / "t5-base", device="cpu")


DAMAGED_XP = {
    "missing_dim": (lambda x: x["transformer_lm"].pop("dim"), "transformer_lm.dim"),
    "text_dim": (lambda x: x["transformer_lm"].__setitem__("dim", "big"), "transformer_lm.dim"),
    "fractional_heads": (lambda x: x["transformer_lm"].__setitem__("num_heads", 2.5), "transformer_lm.num_heads"),
    "transformer_not_mapping": (lambda x: x.__setitem__("transformer_lm", [1, 2]), "transformer_lm"),
    "text_segment": (lambda x: x["dataset"].__setitem__("segment_duration", "x"), "dataset.segment_duration"),
    "negative_segment": (lambda x: x["dataset"].__setitem__("segment_duration", -1), "dataset.segment_duration"),
    "zero_span": (lambda x: x["masking"].__setitem__("span_len", 0), "masking.span_len"),
    "bad_card": (lambda x: x["transformer_lm"].__setitem__("card", "2048x"), "transformer_lm.card"),
    "bad_delays": (lambda x: x["codebooks_pattern"]["delay"].__setitem__("delays", "abc"), "delays"),
    "bad_bool": (lambda x: x["transformer_lm"].__setitem__("bias_ff", [1]), "transformer_lm.bias_ff"),
}


@pytest.mark.parametrize("case", list(DAMAGED_XP))
def test_damaged_xp_cfg_names_the_field_and_says_download_again(ref, tmp_path, case):
    change, field = DAMAGED_XP[case]
    path = _release(ref, tmp_path, _xp(change))
    with pytest.raises(MagnetError, match=r"download") as e:
        _load(path, ref)
    assert field in str(e.value)


@pytest.mark.parametrize("mutate, words", [
    (lambda p: p.__setitem__("best_state", torch.zeros(3)), "best_state"),
    (lambda p: p.__setitem__("best_state", {"a": "not a tensor"}), "best_state"),
    (lambda p: p.__setitem__("xp.cfg", 5), "xp.cfg"),
    (lambda p: p.__setitem__("xp.cfg", ["a"]), "xp.cfg"),
], ids=["best_state_tensor", "best_state_strings", "xp_cfg_int", "xp_cfg_list"])
def test_damaged_lm_file_structure_is_a_clear_error(ref, tmp_path, mutate, words):
    path = _release(ref, tmp_path, mutate)
    with pytest.raises(MagnetError, match=words):
        _load(path, ref)


def test_nan_in_lm_weights_is_refused_at_load_naming_the_weight(ref, tmp_path):
    def poison(pkg):
        key = next(k for k, v in pkg["best_state"].items() if k.endswith("out_norm.weight"))
        pkg["best_state"][key][0] = float("nan")
    with pytest.raises(MagnetError, match=r"out_norm\.weight.*NaN.*download"):
        _load(_release(ref, tmp_path, poison), ref)


def test_inf_in_lm_weights_is_refused_at_load(ref, tmp_path):
    def poison(pkg):
        v = next(v for k, v in pkg["best_state"].items() if v.is_floating_point() and v.dim() == 2)
        v.view(-1)[-1] = float("inf")
    with pytest.raises(MagnetError, match=r"NaN or infinite"):
        _load(_release(ref, tmp_path, poison), ref)


def test_codec_of_another_sample_rate_is_refused(ref, tmp_path):
    """The music (32 kHz) and audio (16 kHz) codecs share codebook shapes: only the rate tells them apart."""
    path = tmp_path / "magnet-music"
    shutil.copytree(ref / "magnet-music", path)
    shutil.copy(ref / "magnet-audio" / "compression_state_dict.bin", path / "compression_state_dict.bin")
    with pytest.raises(MagnetError, match=r"16000 Hz.*32000 Hz codec|runs at 16000 Hz"):
        _load(path, ref)


@pytest.mark.parametrize("meta_change", [
    lambda m: m.pop("lm_config"),
    lambda m: m.__setitem__("lm_config", "{not json"),
    lambda m: m.__setitem__("codec_config", "[1, 2]"),
    lambda m: m.__setitem__("lm_config", json.dumps({"dim": 4})),
    lambda m: m.__setitem__("generation", "{broken"),
], ids=["no_lm_config", "lm_config_not_json", "codec_config_not_object", "lm_config_incomplete", "generation_bad"])
def test_converted_file_with_damaged_metadata_is_a_clear_error(ref, tmp_path, meta_change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from magnet.checkpoints import convert_release
    out = convert_release(ref / "magnet-music", tmp_path / "m.safetensors")
    with safe_open(str(out), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta_change(meta)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(MagnetError, match=r"convert"):
        MagnetModel.from_pretrained(bad, text_encoder=False, device="cpu")


# -- numbers the user gives -------------------------------------------------------------------------

BAD_SAMPLING = {
    "fractional_steps": dict(decoding_steps=[2.5, 1, 1, 1]),
    "fractional_steps_text": dict(decoding_steps="2.5,1,1,1"),
    "too_many_steps": dict(decoding_steps=[10 ** 9, 1, 1, 1]),
    "nan_temperature": dict(temperature=float("nan")),
    "text_temperature": dict(temperature="hot"),
    "nan_top_p": dict(top_p=float("nan")),
    "fractional_top_k": dict(top_k=2.5),
    "text_top_k": dict(top_k="a"),
    "inf_cfg": dict(max_cfg_coef=float("inf")),
    "text_cfg": dict(min_cfg_coef="a"),
    "text_use_sampling": dict(use_sampling="no"),
    "seed_text": dict(seed="abc"),
    "seed_fraction": dict(seed=1.5),
    "seed_nan": dict(seed=float("nan")),
    "duration_huge": dict(duration=1e9),
    "duration_nan": dict(duration=float("nan")),
    "duration_text": dict(duration="long"),
    "overlap_nan": dict(duration=5.0, overlap=float("nan")),
}


@pytest.mark.parametrize("case", list(BAD_SAMPLING))
def test_bad_generation_arguments_are_refused_quickly(music_model, case):
    kw = {"duration": 0.5, "decoding_steps": [1, 1, 1, 1], **BAD_SAMPLING[case]}
    with within(20), pytest.raises(MagnetError) as e:
        music_model.generate(["x"], **kw)
    name = list(BAD_SAMPLING[case])[-1]
    assert name.split("_")[0] in str(e.value)


def test_whole_number_floats_are_accepted_as_steps_and_seeds(music_model):
    a = music_model.generate(["x"], duration=0.5, decoding_steps=[2.0, 1, 1, 1], seed=3.0)
    b = music_model.generate(["x"], duration=0.5, decoding_steps=[2, 1, 1, 1], seed=3)
    assert torch.equal(a, b)


@pytest.mark.parametrize("prompts", [None, 5, ["ok", 5], [b"bytes"]])
def test_prompts_of_the_wrong_type_are_refused(music_model, prompts):
    with pytest.raises(MagnetError, match="prompt"):
        music_model.generate(prompts, duration=0.5, decoding_steps=[1, 1, 1, 1])


def test_decode_of_an_impossible_length_is_refused(music_model):
    codes = torch.zeros(1, 4, 10, dtype=torch.long)
    with within(20), pytest.raises(MagnetError, match="duration"):
        music_model.decode(codes, duration=1e9)


def test_decode_that_cannot_fit_in_memory_is_refused_before_allocating(music_model, monkeypatch):
    import magnet.arguments as arguments
    monkeypatch.setattr(arguments, "available_bytes", lambda device: 1000)
    with pytest.raises(MagnetError, match=r"GiB.*free.*shorter"):
        music_model.decode(torch.zeros(1, 4, 50, dtype=torch.long))


def test_region_bounds_must_be_numbers(music_model):
    codes = music_model.generate(["x"], duration=1.0, decoding_steps=[1, 1, 1, 1], seed=0)
    for start in (float("nan"), "a", None):
        with pytest.raises(MagnetError, match="region start"):
            music_model.regenerate(codes, start, 0.5, ["x"], decoding_steps=[1, 1, 1, 1])


def test_encode_sample_rate_must_be_a_positive_whole_number(music_model):
    for sr in (0, -8000, 1.5, float("nan"), "32k"):
        with pytest.raises(MagnetError, match="sample_rate"):
            music_model.encode(torch.zeros(1, 1, 3200), sr)


def test_hybrid_ar_seconds_nan_is_refused(ref, music_model):
    from magnet import MusicGenModel
    from magnet.musicgen import generate_hybrid
    mg = MusicGenModel.from_pretrained(ref / "musicgen", text_encoder=music_model.text_encoder, device="cpu")
    with pytest.raises(MagnetError, match="ar_seconds"):
        generate_hybrid(music_model, mg, ["x"], duration=1.0, ar_seconds=float("nan"))


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "gpu0", "tpu", 3])
def test_devices_that_do_not_exist_here_are_refused(ref, device):
    if torch.cuda.is_available() and str(device).startswith(("cuda", "gpu")):
        pytest.skip("this machine has CUDA")
    with pytest.raises(MagnetError, match="device"):
        MagnetModel.from_pretrained(ref / "magnet-music", text_encoder=False, device=device)


@pytest.mark.parametrize("dtype, want", [("fp32", torch.float32), ("float32", torch.float32), ("half", torch.float16),
                                         ("bf16", torch.bfloat16), ("auto", torch.float32)])
def test_dtype_names_are_accepted(ref, dtype, want):
    m = MagnetModel.from_pretrained(ref / "magnet-music", text_encoder=False, device="cpu", dtype=dtype)
    assert m.dtype == want


@pytest.mark.parametrize("dtype", ["fp8", "int8", torch.int64, 16.5])
def test_dtype_that_is_not_a_weight_type_is_refused(ref, dtype):
    with pytest.raises(MagnetError, match="dtype"):
        MagnetModel.from_pretrained(ref / "magnet-music", text_encoder=False, device="cpu", dtype=dtype)


# -- NaN during decoding ----------------------------------------------------------------------------

@pytest.mark.parametrize("use_sampling", [True, False])
def test_nan_during_decoding_stops_with_a_clear_error(music_model, use_sampling):
    """Weights that turn NaN after loading (or an fp16 overflow) end the stage with one clear error, never
    torch's `probability tensor contains inf/nan` nor NaN audio."""
    lm = copy.deepcopy(music_model.lm)
    with torch.no_grad():
        lm.out_norm.weight.fill_(float("nan"))
    cond = music_model.encode_text(["x"])
    params = sampling.SamplingParams(decoding_steps=(2, 1, 1, 1), use_sampling=use_sampling)
    with pytest.raises(MagnetError, match=r"NaN or infinite.*fp32"):
        sampling.generate(lm, cond, 30, params, generator=torch.Generator().manual_seed(0))


def test_the_nan_guard_leaves_finite_results_unchanged(music_model):
    a = music_model.generate(["x"], duration=0.5, decoding_steps=[3, 2, 1, 1], seed=4)
    with torch.no_grad():
        probs = torch.softmax(torch.randn(2, 5, 7), -1)
    out, flag = sampling._guard_nonfinite(probs, torch.zeros((), dtype=torch.bool))
    assert torch.equal(out, probs) and not bool(flag)
    assert torch.equal(a, music_model.generate(["x"], duration=0.5, decoding_steps=[3, 2, 1, 1], seed=4))


# -- threads ----------------------------------------------------------------------------------------

def test_each_thread_reads_the_seed_of_its_own_generation(music_model):
    barrier, seen = threading.Barrier(2, timeout=60), {}

    def run(seed):
        music_model.generate(["x"], duration=0.3, decoding_steps=[1, 1, 1, 1], seed=seed)
        barrier.wait()            # both have generated before either reads
        seen[seed] = music_model.last_seed

    threads = [threading.Thread(target=run, args=(s,)) for s in (11, 22)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert seen == {11: 11, 22: 22}
