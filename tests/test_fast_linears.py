"""Fast mode's linear layers: which path a machine gets (bf16, int8 or fp32), that every path stays close to
float32, and that its one low-precision copy leaves exact mode exact (magnet.linears, magnet.lowp)."""
import copy
import threading

import pytest
import torch

from magnet import linears, lowp, stage_forward
from magnet.errors import MagnetError
from magnet.sampling import FastMode, SamplingParams
from magnet.random_models import init_random
from magnet.transformer import LM, LMConfig

# -- the choice ---------------------------------------------------------------------------------------------

AMX = {"fp32": 310.0, "bf16": 1560.0, "int8": 960.0}        # this development CPU (AMX, avx512_bf16, VNNI)
AVX2 = {"fp32": 180.0, "int8": 420.0}                       # an AVX2-only CPU: no bf16 candidate


@pytest.mark.parametrize("rates, path", [
    (AMX, "bf16"),
    (AVX2, "int8"),
    ({"fp32": 300.0, "int8": 330.0}, "fp32"),               # a 10% gain does not pay for int8's rounding
    ({"fp32": 300.0, "bf16": 345.0, "int8": 340.0}, "bf16"),
    ({"fp32": 300.0, "bf16": 200.0}, "fp32"),               # emulated bf16: slower than float32
    ({"fp32": 300.0}, "fp32"),
])
def test_the_fastest_path_wins_only_by_a_margin_over_float32(rates, path):
    assert linears.pick_linears(rates) == path


@pytest.fixture()
def fresh_choice(monkeypatch):
    """The measured choice forgotten before and after (it is cached per thread count)."""
    monkeypatch.delenv(linears.LINEARS_ENV, raising=False)
    linears._measured_choice.cache_clear()
    yield
    linears._measured_choice.cache_clear()


AMX_CPU = dict.fromkeys(["amx_bf16", "amx_int8", "avx512_bf16", "vnni", "avx2"], True)


def no_measuring(paths):
    pytest.fail(f"measured {paths} where the CPU's features decide")


@pytest.mark.parametrize("features, bf16, int8, path, how", [
    (AMX_CPU, True, True, "bf16", "AMX-BF16"),
    ({"avx2": True}, False, True, "int8", "int8 on AVX2"),                       # an AVX2-only CPU
    ({"avx2": True, "vnni": True}, False, True, "int8", "int8 on VNNI"),
    ({"avx2": True}, False, False, "fp32", "no bf16 or int8 kernels"),
    (AMX_CPU, False, False, "fp32", "no bf16 or int8 kernels"),                 # a torch without the kernels
])
def test_clear_features_decide_without_measuring(features, bf16, int8, path, how):
    choice = linears.decide_linears(features, bf16, int8, no_measuring)
    assert choice.path == path and how in choice.how and choice.rates == {}


@pytest.mark.parametrize("features, bf16, int8, rates, path", [
    ({"avx512_bf16": True, "vnni": True, "avx2": True}, True, True, {"fp32": 300.0, "bf16": 700.0, "int8": 800.0},
     "int8"),                                                                    # avx512_bf16 without AMX
    ({"avx512_bf16": True, "vnni": True, "avx2": True}, True, True, {"fp32": 300.0, "bf16": 900.0, "int8": 800.0},
     "bf16"),
    ({}, False, True, {"fp32": 100.0, "int8": 180.0}, "int8"),                   # features unknown (macOS, Arm)
    ({"arm_bf16": True}, True, True, {"fp32": 100.0, "bf16": 110.0, "int8": 105.0}, "fp32"),
])
def test_unclear_features_are_settled_by_measuring(features, bf16, int8, rates, path):
    asked = []
    choice = linears.decide_linears(features, bf16, int8, lambda paths: asked.append(paths) or
                                     {p: rates[p] for p in paths})
    assert asked == [["fp32"] + (["bf16"] if bf16 else []) + ["int8"]]
    assert choice.path == path and choice.rates == rates and "measured" in choice.how


def test_the_machine_choice_is_made_once(fresh_choice, monkeypatch):
    monkeypatch.setattr(linears, "cpu_features", lambda: {})
    monkeypatch.setattr(linears, "bf16_accelerated", lambda: False)
    monkeypatch.setattr(linears, "int8_available", lambda: True)
    asked = []
    monkeypatch.setattr(linears, "measure_linears", lambda paths: asked.append(paths) or dict(AVX2))
    choice = linears.choose_linears()
    assert choice.path == "int8" and "int8 linears (measured" in choice.describe()
    assert linears.fast_linears(FastMode(), torch.device("cpu")) == "int8"
    assert linears.choose_linears() is choice and len(asked) == 1


def test_measuring_gives_a_rate_for_each_path_that_runs():
    paths = ["fp32", "bf16"] + (["int8"] if linears.int8_available() else [])
    rates = linears.measure_linears(paths, rounds=1)
    assert set(rates) == set(paths) and all(r > 0 for r in rates.values())


def test_the_choice_is_forced_by_the_mode_or_the_environment(fresh_choice, monkeypatch):
    monkeypatch.setattr(linears, "measure_linears", lambda paths: pytest.fail("a forced path is not measured"))
    cpu = torch.device("cpu")
    assert linears.fast_linears(FastMode(linears="bf16"), cpu) == "bf16"
    assert linears.fast_linears(FastMode(linears="fp32"), cpu) is None
    for path in ("bf16", "int8", "fp32"):
        monkeypatch.setenv(linears.LINEARS_ENV, path.upper())
        if path == "int8" and not linears.int8_available():
            continue
        choice = linears.choose_linears()
        assert choice.path == path and linears.LINEARS_ENV in choice.how
    monkeypatch.setenv(linears.LINEARS_ENV, "bf16")
    assert linears.fast_linears(FastMode(linears="fp32"), cpu) is None      # the mode's own setting wins
    # never on other devices or other weight dtypes
    assert linears.fast_linears(FastMode(), torch.device("cuda")) is None
    assert linears.fast_linears(FastMode(), cpu, torch.bfloat16) is None
    assert linears.fast_linears(False, cpu) is None


def test_bad_settings_are_refused_naming_the_fix(fresh_choice, monkeypatch):
    monkeypatch.setenv(linears.LINEARS_ENV, "amx")
    with pytest.raises(MagnetError, match=f"{linears.LINEARS_ENV}='amx'.*auto, bf16, int8 or fp32"):
        linears.choose_linears()
    monkeypatch.delenv(linears.LINEARS_ENV)
    with pytest.raises(MagnetError, match="FastMode.linears 'fp8'"):
        SamplingParams(fast=FastMode(linears="fp8")).check(4)


def test_a_forced_path_this_torch_cannot_run_falls_back_with_a_warning(fresh_choice, monkeypatch, caplog):
    monkeypatch.setattr(linears, "int8_available", lambda: False)
    monkeypatch.setattr(linears, "bf16_accelerated", lambda: False)
    monkeypatch.setattr(linears, "cpu_features", lambda: {"avx2": True})
    with caplog.at_level("WARNING", logger="magnet"):
        choice = linears.choose_linears("int8")
    assert choice.path == "fp32" and "int8 unavailable" in choice.how
    assert any("int8 linears were asked for" in r.getMessage() for r in caplog.records)


def test_cpu_features_are_read_and_named():
    f = linears.cpu_features()
    assert {"amx_bf16", "avx512_bf16", "vnni", "avx2", "torch_capability", "machine"} <= set(f)
    text = linears.cpu_features_text({"avx2": True, "machine": "x86_64", "torch_capability": "AVX2"})
    assert text == "AVX2 (x86_64, torch CPU kernels AVX2)"
    amx = dict.fromkeys(["amx_bf16", "amx_int8", "avx512_bf16", "vnni", "avx2"], True)
    assert linears.cpu_features_text(amx).startswith("AMX-BF16 AMX-INT8 avx512_bf16 VNNI AVX2")


# -- every path: close to float32, finite --------------------------------------------------------------------

def _lm(seed=0, dim=64, layers=2, fp16_values=True):
    cfg = LMConfig(kind="magnet", dim=dim, num_heads=4, num_layers=layers, ffn_dim=4 * dim, n_q=4, card=32,
                   text_dim=16, subcodes_context=3, segment_duration=1.0, span_len=3)
    lm = init_random(LM(cfg), seed).eval().requires_grad_(False)
    if fp16_values:                                       # as the releases are published
        with torch.no_grad():
            for p in lm.parameters():
                p.copy_(p.half().float())
    return lm


def _inputs(lm, T=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, 6, lm.cfg.text_dim, generator=g)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[2:] = 0
    codes = torch.randint(0, lm.cfg.card + 1, (2, lm.cfg.n_q, T), generator=g)
    return lm.memory(hidden, mask, null_rows=2), codes


# stated tolerances: relative logit error of each path against float32
TOLERANCE = {("bf16", True): 0.02, ("bf16", False): 0.02, ("int8", True): 0.06}


@pytest.mark.parametrize("path, bf16_attention", list(TOLERANCE))
def test_every_path_gives_finite_logits_within_its_tolerance(path, bf16_attention):
    if path == "int8" and not linears.int8_available():
        pytest.skip("this torch has no CPU int8 kernels")
    lm = _lm()
    mem, codes = _inputs(lm)
    with torch.inference_mode():
        for stage in range(4):
            ref = lm(codes, mem, stage=stage, heads=[stage])
            copy = linears.fast_copy(lm, path, bf16_attention=bf16_attention)
            wanted = torch.zeros(codes.shape[-1], dtype=torch.bool)
            wanted[::3] = True
            for w in (None, wanted):                      # every position, and pruned positions
                out = stage_forward.parallel_forward(lm, codes, mem, stage, [stage], w, copy)
                r = ref if w is None else ref[:, :, w]
                assert torch.isfinite(out).all()
                err = ((out.float() - r).norm() / r.norm()).item()
                assert 0 < err < TOLERANCE[path, bf16_attention], (stage, err)
            lowp.restore(lm)


# -- one copy; exact mode stays exact ---------------------------------------------------------------------------

def _param_bytes(lm):
    return sum(p.numel() * p.element_size() for p in lm.transformer.parameters())


@pytest.mark.parametrize("path", ["bf16", "int8"])
def test_fast_mode_holds_one_copy_and_no_more_memory_than_exact_mode(path):
    if path == "int8" and not linears.int8_available():
        pytest.skip("this torch has no CPU int8 kernels")
    lm = _lm(layers=3)
    exact = _param_bytes(lm)
    copy = linears.fast_copy(lm, path)
    held = _param_bytes(lm) + copy.nbytes
    assert copy.kept == 0 and copy.recorded > 0.75 * exact
    # bf16: 4 bytes per replaced weight as in exact mode, plus a bf16 copy of the cross-attention's query rows
    # (whose packed projection stays float32 for the text memory); int8: 3 bytes per replaced weight
    assert held <= (1.04 if path == "bf16" else 0.85) * exact, (held, exact)
    linears.drop_fast_copy(lm)
    assert _param_bytes(lm) == exact and lm not in linears._fast_copies


def test_weights_float16_cannot_hold_stay_float32_beside_the_copy():
    lm = _lm(fp16_values=False)                           # float32 values: a merged LoRA, a float32 fine-tune
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    copy = linears.fast_copy(lm, "bf16")
    assert copy.recorded == 0 and copy.kept > 0
    assert all(p.dtype == torch.float32 for p in lm.parameters())
    assert all(torch.equal(v, before[k]) for k, v in lm.state_dict().items())


def test_exact_use_after_fast_mode_is_bit_identical_and_drops_the_copy():
    lm = _lm()
    mem, codes = _inputs(lm)
    g = torch.Generator().manual_seed(7)
    text = torch.randn(2, 5, lm.cfg.text_dim, generator=g), torch.ones(2, 5, dtype=torch.long)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    with torch.inference_mode():                          # as ComfyUI runs nodes
        ref, ref_memory = lm(codes, mem, stage=1), lm.memory(*text)
        linears.fast_copy(lm, "bf16")
        assert lm.transformer.layers[0].cross_attention.in_proj.weight.dtype == torch.float32
        memory = lm.memory(*text)                         # the text memory reads exact weights
        assert all(torch.equal(a, b) for kv, ref_kv in zip(memory.kv, ref_memory.kv) for a, b in zip(kv, ref_kv))
        assert lm.transformer.layers[0].linear1.weight.dtype == torch.float16
        again = lm(codes, mem, stage=1)                   # exact use restores
    assert torch.equal(again, ref) and lm not in linears._fast_copies
    for k, v in lm.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert lowp.restore(lm) == 0                          # nothing left to restore


@pytest.fixture(scope="module")
def fp16_music(music_model):
    """The music fixture with float16 values in float32, as a published release loads (the fixture's own
    weights are float32 values)."""
    m = copy.copy(music_model)
    m.lm = copy.deepcopy(music_model.lm)
    m._seed_record = threading.local()
    with torch.no_grad():
        for p in m.lm.parameters():
            p.copy_(p.half().float())
    return m


def test_exact_generation_after_fast_generation_is_unchanged(fp16_music):
    music_model = fp16_music
    kw = dict(seed=3, duration=1.0, decoding_steps=(4, 3, 3, 3))
    exact = music_model.generate(["dub techno"], **kw)
    fast = music_model.generate(["dub techno"], fast=FastMode(linears="bf16"), **kw)
    assert fast.shape == exact.shape
    assert any(lowp.is_record(p) for p in music_model.lm.parameters())   # the release's float16 values
    assert torch.equal(music_model.generate(["dub techno"], **kw), exact)
    assert not any(lowp.is_record(p) for p in music_model.lm.parameters())
    assert torch.equal(music_model.generate(["dub techno"], fast=FastMode(linears="bf16"), **kw), fast)


def test_applying_a_lora_reads_the_exact_weights(fp16_music, tmp_path):
    from magnet import lora
    music_model = fp16_music
    lm = music_model.lm
    g = torch.Generator().manual_seed(0)
    w = lm.transformer.layers[0].linear1.weight
    tensors = {"transformer.layers.0.linear1.lora_A.weight": torch.randn(2, w.shape[1], generator=g) * 0.05,
               "transformer.layers.0.linear1.lora_B.weight": torch.randn(w.shape[0], 2, generator=g) * 0.05}
    meta = lora.lora_meta(music_model, rank=2, alpha=2.0, targets=["linear1"], steps=1, train_loss=1.0)
    path = lora.save_lora(tmp_path / "l.safetensors", tensors, meta)
    expected = music_model.with_lora(path).lm.transformer.layers[0].linear1.weight.clone()
    music_model.generate(["x"], seed=0, duration=0.5, decoding_steps=(2, 2, 2, 2), fast=FastMode(linears="bf16"))
    assert lowp.is_record(lm.transformer.layers[0].linear1.weight)
    merged = music_model.with_lora(path).lm.transformer.layers[0].linear1.weight
    assert merged.dtype == torch.float32 and torch.equal(merged, expected)


def test_fast_and_exact_generations_in_parallel_threads_do_not_disturb_each_other(fp16_music):
    m = fp16_music
    kw = dict(duration=0.5, decoding_steps=(3, 2, 2, 2))
    exact = [m.generate(["rain"], seed=s, **kw) for s in range(3)]
    fast = [m.generate(["rain"], seed=s, fast=FastMode(linears="bf16"), **kw) for s in range(3)]
    got, errors = {}, []

    def run(name, **extra):
        try:
            got[name] = [m.generate(["rain"], seed=s, **kw, **extra) for s in range(3)]
        except Exception as exc:                          # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=("exact",)),
               threading.Thread(target=run, args=("fast",), kwargs={"fast": FastMode(linears="bf16")})]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(torch.equal(a, b) for a, b in zip(got["exact"], exact))
    assert all(torch.equal(a, b) for a, b in zip(got["fast"], fast))
