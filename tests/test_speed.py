"""Speed work, checked for what it must not change: the decoding forward (magnet.stage_forward: pruned positions,
band attention without a [T, T] matrix, oneDNN linears, shared first self-attention, static buffers)
computes the same function as the specification, `LM.forward`, and decodes every golden
token-identically; its int8 layers stay within a tolerance of it; fast mode changes only what `FastMode`
documents; converted releases load tensor by tensor."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import REFERENCE_SAMPLING, golden_prompts
from magnet import linears
from magnet.cuda_graphs import StaticStep
from magnet.errors import MagnetError
from magnet.linears import drop_fast_copy, fast_copy
from magnet.random_models import init_random
from magnet.sampling import FastMode, SamplingParams
from magnet.stage_forward import DecodingSettings, active_positions, band_attention, parallel_forward
from magnet.transformer import LM, LMConfig, band_mask


def small_lm(seed=0, **kw) -> LM:
    cfg = dict(kind="magnet", dim=32, num_heads=4, num_layers=3, ffn_dim=64, n_q=4, card=16, text_dim=8,
               subcodes_context=2)
    cfg.update(kw)
    lm = init_random(LM(LMConfig(**cfg)), seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if p.dim() == 1 and not name.endswith("weight"):
                p.normal_(0, 0.1)          # non-zero biases where the config has them
    return lm.eval().requires_grad_(False)


def layer_by_layer(lm: LM, codes, mem, stage):
    """The specification: every row, every position, `Layer.forward` with the [T, T] band mask."""
    return lm(codes, mem, stage=stage)


def text(B=2, L=5, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, L, dim, generator=g)
    mask = torch.ones(2 * B, L, dtype=torch.long)
    mask[0, 3:] = 0
    mask[B:] = 0
    return hidden, mask


# -- exact mode: the same function --------------------------------------------------------------------

@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shared_codes", [True, False])
def test_fast_path_matches_the_layer_by_layer_forward(bias, shared_codes):
    lm = small_lm(bias_attn=bias, bias_ff=bias, bias_proj=bias)
    hidden, mask = text()
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 17, (2 if shared_codes else 4, 4, 41), generator=g)
    with torch.inference_mode():
        for null_rows in (0, 2):
            mem = lm.memory(hidden, mask, null_rows=null_rows)
            assert mem.rows == (2 if null_rows and not bias else 4)
            for stage in range(4):
                ref = layer_by_layer(lm, codes, mem, stage)
                torch.testing.assert_close(parallel_forward(lm, codes, mem, stage), ref, atol=2e-5, rtol=0)
                one = parallel_forward(lm, codes, mem, stage, heads=[stage])
                torch.testing.assert_close(one[:, 0], ref[:, stage], atol=2e-5, rtol=0)


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_pruned_forward_gives_the_same_logits_where_they_are_needed(stage):
    lm = small_lm(num_layers=4)
    hidden, mask = text()
    mem = lm.memory(hidden, mask, null_rows=2)
    g = torch.Generator().manual_seed(stage)
    codes = torch.randint(0, 17, (2, 4, 60), generator=g)
    with torch.inference_mode():
        ref = layer_by_layer(lm, codes, mem, stage)[:, stage]
        for need in (torch.rand(60, generator=g) < 0.1, torch.rand(60, generator=g) < 0.6,
                     torch.arange(60) == 59, torch.arange(60) < 3, torch.ones(60, dtype=torch.bool)):
            out = parallel_forward(lm, codes, mem, stage, [stage], wanted=need)[:, 0]
            assert out.shape == (4, int(need.sum()), 16)
            torch.testing.assert_close(out, ref[:, need], atol=2e-5, rtol=0)
        none = parallel_forward(lm, codes, mem, stage, [stage], wanted=torch.zeros(60, dtype=torch.bool))
        assert none.shape == (4, 1, 0, 16)


def test_only_positions_within_reach_are_computed():
    need = torch.zeros(100, dtype=torch.bool)
    need[50] = True
    acts = active_positions(need, num_layers=4, band=5)       # inputs of layer 0 .. outputs of layer 3
    assert [a.tolist() for a in acts] == [list(range(50 - 5 * k, 51 + 5 * k)) for k in (4, 3, 2, 1, 0)]
    full = active_positions(need, num_layers=4, band=None)    # full attention: only the last layer prunes
    assert full[:4] == [None] * 4 and full[4].tolist() == [50]
    assert active_positions(None, 3, 5) == [None] * 4


@pytest.mark.parametrize("n,width", [(7, 2), (23, 5), (60, 5), (61, 5), (500, 5), (45, 0)])
def test_band_attention_equals_sdpa_with_the_band_mask(n, width):
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(n, width, "cpu"))
    torch.testing.assert_close(band_attention(q, k, v, width), ref, atol=1e-5, rtol=0)
    # rows at scattered positions (what pruning leaves): attend by position, not by row
    pos = torch.sort(torch.randperm(3 * n, generator=g)[:n]).values
    mask = (pos.view(-1, 1) - pos.view(1, -1)).abs() <= width
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(band_attention(q, k, v, width, pos), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["music", "audio"])
@pytest.mark.parametrize("key,arrangement,scoring", [
    ("greedy.nonoverlap.max", "nonoverlap", "max"),
    ("greedy.nonoverlap.prod", "nonoverlap", "prod"),
    ("greedy.stride1.max", "stride1", "max"),
])
@pytest.mark.parametrize("prune", [True, False])
def test_exact_mode_decodes_every_golden_with_and_without_pruning(models, golden, golden_cfg, monkeypatch, name,
                                                                  key, arrangement, scoring, prune):
    model = models[name]
    monkeypatch.setattr(model, "decoding", DecodingSettings(prune_on_cpu=prune))
    cond = model.encode_text(golden_prompts(model, golden, name))
    params = SamplingParams(use_sampling=False, decoding_steps=golden_cfg["decoding_steps"],
                            span_arrangement=arrangement, span_scoring=scoring, **REFERENCE_SAMPLING)
    codes = model.generate_from_condition(cond, frames=golden_cfg[name]["T"], params=params).codes
    assert torch.equal(codes, golden[f"{name}.{key}"])


@pytest.mark.parametrize("kw", [{}, {"top_k": 5, "top_p": 0.0}, {"span_arrangement": "stride1"},
                                {"top_p": 0.0}])
def test_sampled_codes_do_not_depend_on_pruning(music_model, monkeypatch, kw):
    """Skipped positions get zero logits: sampling draws the same random numbers for every position, so
    a seed gives the same codes as computing every position."""
    out = []
    for prune in (True, False):
        monkeypatch.setattr(music_model, "decoding", DecodingSettings(prune_on_cpu=prune))
        out.append(music_model.generate(["dub techno", "rain"], seed=3, duration=1.5,
                                        decoding_steps=(4, 3, 2, 2), **kw))
    assert torch.equal(out[0], out[1])


def test_pruned_steps_ask_for_the_masked_spans_only(music_model, monkeypatch):
    lm = music_model.lm
    asked = []
    real = lm.forward

    def spy(codes, mem, *a, plan=None, **k):
        stage = k.get("stage", -1)
        masked = codes[:, stage] == lm.mask_id
        asked.append((plan.wanted, masked.any(dim=0)))
        return real(codes, mem, *a, plan=plan, **k)
    monkeypatch.setattr(lm, "forward", spy)
    music_model.generate(["x"], seed=0, duration=1.2, decoding_steps=(4, 3, 3, 3))
    assert asked[0][0] is None                          # first step: everything is masked
    partial = [(n, m) for n, m in asked if n is not None]
    assert partial, "later steps must prune"
    for need, masked in partial:
        assert bool((need | ~masked).all())             # every masked position is computed
        assert int(need.sum()) % 3 == 0                 # whole spans (nonoverlap, span_len 3)


# -- fast mode ------------------------------------------------------------------------------------------

def test_fast_mode_caps_the_steps_of_later_codebooks_only():
    assert SamplingParams().check(4).decoding_steps == (20, 10, 10, 10)
    assert SamplingParams().check(4).fast is False
    fast = SamplingParams(fast=True).check(4)
    assert fast.decoding_steps == (20, 5, 5, 5) and fast.fast == FastMode()
    assert SamplingParams(decoding_steps=(60, 10, 10, 10), fast=FastMode(later_steps=3)).check(4).decoding_steps \
        == (60, 3, 3, 3)
    assert SamplingParams(decoding_steps=(20, 2, 10, 1), fast=True).check(4).decoding_steps == (20, 2, 5, 1)
    assert SamplingParams(fast=FastMode(later_steps=None)).check(4).decoding_steps == (20, 10, 10, 10)
    assert fast.check(4) == fast                        # idempotent
    with pytest.raises(MagnetError, match="later_steps"):
        SamplingParams(fast=FastMode(later_steps=0)).check(4)
    with pytest.raises(MagnetError, match="fast"):
        SamplingParams(fast="yes").check(4)


@pytest.mark.parametrize("use_sampling", [False, True])
def test_fewer_later_steps_leave_codebook_0_exactly_as_in_exact_mode(music_model, use_sampling):
    """With only the step cap (int8 and the null-pass skip off), codebook 0 is decoded exactly as in
    exact mode: its stage runs first, with the same steps and the same random numbers."""
    kw = dict(seed=5, duration=2.0, decoding_steps=(6, 4, 4, 4), use_sampling=use_sampling)
    exact = music_model.generate(["dub techno", "rain"], **kw)
    steps_only = music_model.generate(["dub techno", "rain"], fast=FastMode(later_steps=2, linears="fp32",
                                                                             skip_unit_cfg=False), **kw)
    assert torch.equal(steps_only[:, 0], exact[:, 0])
    assert not torch.equal(steps_only[:, 1:], exact[:, 1:])


def test_fast_mode_progress_counts_the_steps_it_runs(music_model):
    seen = []
    music_model.generate(["x"], seed=0, duration=1.0, decoding_steps=(4, 8, 8, 8), fast=True,
                         progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (4 + 5 + 5 + 5, 4 + 5 + 5 + 5)


def test_null_pass_is_skipped_only_where_the_guidance_coefficient_is_one(music_model, monkeypatch):
    lm = music_model.lm
    rows = []
    real = lm.forward

    def spy(codes, mem, *a, **k):
        rows.append(mem.batch)
        return real(codes, mem, *a, **k)
    monkeypatch.setattr(lm, "forward", spy)
    fast = FastMode(later_steps=None, linears="fp32")
    music_model.generate(["x"], seed=0, duration=1.0, decoding_steps=(4, 3, 2, 1), fast=fast)
    # the last step of each stage of >1 steps has m = cos(pi/2) ~ -4e-8: coefficient 1 - 4e-7
    assert rows == [2, 2, 2, 1] + [2, 2, 1] + [2, 1] + [2]
    rows.clear()
    music_model.generate(["x"], seed=0, duration=1.0, decoding_steps=(4, 3, 2, 1))       # exact: never
    assert rows == [2] * 10
    rows.clear()
    music_model.generate(["x"], seed=0, duration=1.0, decoding_steps=(3, 1, 1, 1), max_cfg_coef=1.0, fast=fast)
    assert rows == [1] * 6


def test_skipping_the_null_pass_at_coefficient_one_changes_nothing_else(music_model):
    """With guidance 1 everywhere, the guided logits are the conditional ones: greedy codes agree with the
    two-pass exact decoding."""
    kw = dict(duration=2.0, decoding_steps=(5, 3, 3, 3), use_sampling=False, max_cfg_coef=1.0, min_cfg_coef=1.0)
    exact = music_model.generate(["dub techno", "rain"], **kw)
    skip = music_model.generate(["dub techno", "rain"], fast=FastMode(later_steps=None, linears="fp32"), **kw)
    assert torch.equal(skip, exact)


@pytest.mark.parametrize("path", ["bf16", "int8"])
def test_low_precision_linears_stay_close_and_exact_weights_come_back(path):
    if path == "int8" and not linears.int8_available():
        pytest.skip("this torch has no CPU int8 kernels")
    lm = small_lm(dim=64, num_heads=4, ffn_dim=256, num_layers=2, card=32)
    with torch.no_grad():                                 # float16 values, as the releases are published
        for p in lm.parameters():
            p.copy_(p.half().float())
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    hidden, mask = text()
    mem = lm.memory(hidden, mask, null_rows=2)
    codes = torch.randint(0, 33, (2, 4, 50), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for stage in (0, 2):
            ref = lm(codes, mem, stage=stage)
            q = parallel_forward(lm, codes, mem, stage, copy=fast_copy(lm, path))
            assert torch.isfinite(q).all()
            assert ((q - ref).norm() / ref.norm()).item() < (0.02 if path == "bf16" else 0.06)
    copy = fast_copy(lm, path)
    assert fast_copy(lm, path) is copy                    # made once
    weights = sum(p.numel() * 4 for p in lm.transformer.parameters())
    assert copy.nbytes < (0.6 if path == "bf16" else 0.3) * weights
    # one copy: the float32 weights it replaces are float16 records meanwhile (every one of them here)
    assert copy.recorded > 0.75 * weights and copy.kept == 0
    assert lm.transformer.layers[0].linear1.weight.dtype == torch.float16
    lm(codes, mem, stage=0)                               # exact use: the exact weights, bit for bit, and no copy
    for k, v in lm.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert lm not in linears._fast_copies
    copy = fast_copy(lm, path)
    with torch.no_grad():
        lm.transformer.layers[0].linear1.weight.mul_(2)   # weights changed: the copy is remade
    assert fast_copy(lm, path) is not copy
    drop_fast_copy(lm)
    assert lm not in linears._fast_copies and lm.transformer.layers[0].linear1.weight.dtype == torch.float32


def test_fast_mode_generates_through_the_api(music_model):
    codes = music_model.generate(["dub techno"], seed=0, duration=1.0, decoding_steps=(4, 4, 4, 4), fast=True)
    assert codes.shape == (1, 4, 48) and int(codes.min()) >= 0 and int(codes.max()) < music_model.cfg.card
    again = music_model.generate(["dub techno"], seed=0, duration=1.0, decoding_steps=(4, 4, 4, 4), fast=True)
    assert torch.equal(codes, again)
    params = SamplingParams(decoding_steps=(4, 4, 4, 4), fast=True)
    cond = music_model.encode_text(["dub techno"])
    via_cond = music_model.generate_from_condition(cond, frames=50, params=params, seed=0).codes
    assert torch.equal(via_cond, codes)
    exact = music_model.generate(["dub techno"], seed=0, duration=1.0, params=params, fast=False)
    want = music_model.generate_from_condition(cond, frames=50, params=SamplingParams(decoding_steps=(4, 4, 4, 4)),
                                               seed=0).codes
    assert exact.shape == want.shape
    assert torch.equal(exact, want)                     # the override turns fast mode off
    assert not torch.equal(exact, codes)


def test_sampling_keywords_fold_into_one_params_object(music_model):
    p = music_model.sampling_params(temperature=2.0, fast=True)
    assert isinstance(p, SamplingParams) and p.temperature == 2.0 and p.fast == FastMode()
    assert p.decoding_steps == music_model.sampling_params(params=SamplingParams(decoding_steps="auto", fast=True),
                                                            temperature=2.0).decoding_steps
    q = music_model.sampling_params(SamplingParams(top_k=5, decoding_steps=(3, 2, 2, 2)), top_p=0.0)
    assert (q.top_k, q.top_p, q.decoding_steps) == (5, 0.0, (3, 2, 2, 2))
    with pytest.raises(MagnetError, match="unknown sampling argument.*temprature"):
        music_model.generate(["x"], temprature=1.0)


def test_memory_cond_only_keeps_the_conditional_rows():
    lm = small_lm()
    hidden, mask = text()
    for null_rows, rows in ((2, 2), (0, 4)):
        mem = lm.memory(hidden, mask, null_rows=null_rows)
        c = mem.cond_only(2)
        assert c.batch == 2 and c.rows == 2
        assert all(k.shape[0] == 2 and v.shape[0] == 2 for k, v in c.kv)
        assert all(torch.equal(k, k0[:2]) for (k, _), (k0, _) in zip(c.kv, mem.kv))


# -- the CUDA path's bookkeeping, run on the CPU --------------------------------------------------------

def test_static_step_copies_codes_in_and_reuses_its_output_buffer():
    calls = []

    def forward(c, mem):
        calls.append(c)
        return c.float() * 2
    a, b = torch.arange(6).view(1, 2, 3), torch.arange(6, 12).view(1, 2, 3)
    step = StaticStep(forward, a, None, graph=False)
    assert torch.equal(step.first, a.float() * 2)
    out = step(b)
    assert torch.equal(out, b.float() * 2) and calls[-1] is step.codes and step.codes is not b
    again = step(a)
    assert again is out and torch.equal(out, a.float() * 2)      # the same buffer, overwritten


@pytest.mark.parametrize("name", ["music", "audio"])
def test_static_steps_decode_the_goldens_and_the_same_samples(models, golden, golden_cfg, monkeypatch, name):
    """The CUDA-graph loop (first step eager, then replays on static buffers, no pruning) gives the same
    codes as the CPU loop: greedy goldens and seeded samples."""
    model = models[name]
    cond = model.encode_text(golden_prompts(model, golden, name))
    params = SamplingParams(use_sampling=False, decoding_steps=golden_cfg["decoding_steps"], **REFERENCE_SAMPLING)
    sampled = model.generate(["dub techno"], seed=2, duration=1.2, decoding_steps=(4, 3, 2, 1))
    monkeypatch.setattr(model, "decoding", DecodingSettings(static_steps_on_cpu=True, graph_min_steps=2))
    made = []
    real = StaticStep.__init__

    def spy(self, *a, **k):
        made.append(k.get("graph"))
        real(self, *a, **k)
    monkeypatch.setattr(StaticStep, "__init__", spy)
    codes = model.generate_from_condition(cond, frames=golden_cfg[name]["T"], params=params).codes
    assert torch.equal(codes, golden[f"{name}.greedy.nonoverlap.max"])
    assert made == [False] * 4                                  # one per stage (every stage has > 1 step)
    assert torch.equal(model.generate(["dub techno"], seed=2, duration=1.2, decoding_steps=(4, 3, 2, 1)), sampled)


# -- loading -----------------------------------------------------------------------------------------

def test_converted_fp32_release_is_used_straight_from_the_mapped_file(ref, tmp_path, music_model):
    """A float32 converted file is not copied on the CPU: every LM weight is a view of the one
    memory-mapped file (so the weights never exist twice), and the model computes the same logits."""
    from magnet import MagnetModel
    from magnet.checkpoints import LazyState, convert_release, load_release
    out = convert_release(ref / "magnet-music", tmp_path / "m.safetensors")
    r = load_release(out)
    assert isinstance(r.lm_state, LazyState) and len(r.lm_state) == len(music_model.lm.state_dict())
    model = MagnetModel.from_pretrained(out, text_encoder=music_model.text_encoder, device="cpu")
    maps = Path("/proc/self/maps")
    if maps.is_file():                       # Linux: every weight lies in the file's mapping
        spans = []
        for line in maps.read_text().splitlines():
            if line.endswith(str(out.resolve())):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                spans.append((lo, hi))
        assert spans
        for name, p in model.lm.named_parameters():
            assert any(lo <= p.data_ptr() < hi for lo, hi in spans), name
    for (k, a), (_, b) in zip(model.lm.state_dict().items(), music_model.lm.state_dict().items()):
        assert torch.equal(a, b), k


def test_converted_fp16_release_is_converted_tensor_by_tensor(ref, tmp_path, music_model, monkeypatch):
    from magnet import checkpoints
    out = checkpoints.convert_release(ref / "magnet-music", tmp_path / "h.safetensors", dtype=torch.float16)
    r = checkpoints.load_release(out)
    live, peak = [], [0]
    real_get = checkpoints.LazyState.__getitem__

    def get(self, key):
        t = real_get(self, key)
        assert t.dtype == torch.float16
        if not live:
            assigned.clear()                 # parameters made by LM(cfg) on the meta device
        live.append(key)
        peak[0] = max(peak[0], len(live) - len(assigned))
        return t
    assigned = []
    real_param = torch.nn.Parameter

    def param(t, requires_grad=False):
        assigned.append(t)
        return real_param(t, requires_grad=requires_grad)
    monkeypatch.setattr(checkpoints.LazyState, "__getitem__", get)
    monkeypatch.setattr(checkpoints.torch.nn, "Parameter", param)
    lm = checkpoints.build_lm(r.lm_config, r.lm_state, str(out), dtype=torch.float32)
    monkeypatch.undo()
    assert peak[0] == 1                                      # one tensor read and converted at a time
    assert all(p.dtype == torch.float32 for p in lm.parameters())
    for (k, a), (_, b) in zip(lm.state_dict().items(), music_model.lm.state_dict().items()):
        assert torch.equal(a, b.half().float()), k


def test_fast_mode_runs_on_weights_made_under_inference_mode(ref):
    """ComfyUI executes nodes under torch.inference_mode, so a model loaded there has inference tensors."""
    from magnet import MagnetModel
    with torch.inference_mode():
        model = MagnetModel.from_pretrained(ref / "magnet-music", text_encoder=ref / "t5-base", device="cpu")
        codes = model.generate(["x"], seed=0, decoding_steps=(2, 2, 2, 2), fast=True)
    assert codes.shape[0] == 1
