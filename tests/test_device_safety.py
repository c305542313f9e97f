"""What the decoding loop must do to run on GPUs, checked on the CPU.

- no float64 anywhere (MPS has none): every decoding path runs under a dispatch mode that records any
  op producing a float64 tensor;
- sampling without `torch.multinomial` (MPS's can pick zero-probability tokens; CUDA's waits on the
  host on every call): `sampling.exponential_race` is bit-identical to it on the CPU, tokens and
  generator state, and a zero probability never wins even when the exponential draw is 0 or -0.0;
- nothing in the step loop waits on the device: no op that reads a tensor back on the host runs
  between two steps of a stage (on the forward paths CUDA and MPS take).

The models are tiny (built in memory), so the whole file runs in a few seconds."""
from __future__ import annotations

import traceback
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from magnet import edit, linears
from magnet.model import MagnetModel
from magnet.random_models import init_random
from magnet.sampling import (FastMode, SamplingParams, exponential_race, half_to_even_midpoint, race_floor,
                             race_winner, sample_tokens)
from magnet.stage_forward import DecodingSettings
from magnet.text import TextCondition
from magnet.transformer import LM, LMConfig

STEPS = (3, 1, 1, 1)        # 3 steps: stride1's middle step runs its span search; the other stages mask all
LOOP_STEPS = (3, 2, 2, 2)   # several steps in every stage, for the step loop's checks
FRAME_RATE = 50
WINDOW_SECONDS = 0.5                        # a 25-frame window: long-form generation is cheap to reach
SAMPLING = {
    "top_p": dict(use_sampling=True, top_p=0.9, top_k=0),
    "top_k": dict(use_sampling=True, top_p=0.0, top_k=5),
    "greedy": dict(use_sampling=False),
}


# -- tiny models --------------------------------------------------------------------------------------

def tiny_model(seed: int = 0) -> MagnetModel:
    """A MagnetModel with a random 2-layer LM (4 codebooks of 16 codes, span 3, 0.5 s window at 50 Hz)
    and a stand-in codec (generation reads only its rates)."""
    cfg = LMConfig(kind="magnet", dim=32, num_heads=4, num_layers=2, ffn_dim=64, n_q=4, card=16, text_dim=8,
                   subcodes_context=2, segment_duration=WINDOW_SECONDS, span_len=3)
    lm = init_random(LM(cfg), seed).eval().requires_grad_(False)
    codec = SimpleNamespace(frame_rate=FRAME_RATE, sample_rate=32000, channels=1)
    return MagnetModel(lm, codec, None, source="tiny")


def tiny_cond(B: int = 2, L: int = 4, dim: int = 8, seed: int = 0) -> TextCondition:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2 * B, L, dtype=torch.long)
    mask[B:] = 0                                        # the null rows
    return TextCondition([f"p{i}" for i in range(B)], torch.randn(2 * B, L, dim, generator=g), mask,
                         torch.zeros(2 * B, L, dtype=torch.long), "tiny")


class UniformRescorer:
    """An external model that thinks every code equally likely (float32, on the codes' device)."""
    weight = 0.5

    def __init__(self, card: int):
        self.card = card

    def begin(self, cond, frames):
        pass

    def probs(self, codes, stage):
        return torch.full(codes[:, stage].shape, 1.0 / self.card, device=codes.device)


# -- sampling without torch.multinomial ---------------------------------------------------------------

def multinomial_sample_tokens(logits, probs, params: SamplingParams, generator):
    """`sample_tokens` as it was, with torch.multinomial: the specification of the exponential race."""
    if not params.use_sampling:
        return torch.argmax(logits, dim=-1, keepdim=True), probs
    flat = probs.reshape(-1, probs.shape[-1])
    if params.top_p > 0.0:
        p_sort, idx = torch.sort(flat, dim=-1, descending=True)
        keep = (torch.cumsum(p_sort, dim=-1) - p_sort) <= params.top_p
        p_sort = p_sort * keep
        pick = torch.multinomial(p_sort / p_sort.sum(-1, keepdim=True), 1, generator=generator)
        tok = torch.gather(idx, -1, pick)
    elif params.top_k > 0:
        k = min(params.top_k, flat.shape[-1])
        kth = torch.topk(flat, k, dim=-1).values[:, -1:]
        flat = flat * (flat >= kth)
        flat = flat / flat.sum(-1, keepdim=True)
        tok = torch.multinomial(flat, 1, generator=generator)
        probs = flat.view_as(probs)
    else:
        tok = torch.multinomial(flat, 1, generator=generator)
    return tok.view(*probs.shape[:-1], 1), probs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("how", [dict(top_p=0.9, top_k=0), dict(top_p=0.3, top_k=0), dict(top_p=1.0, top_k=0),
                                 dict(top_p=0.0, top_k=3), dict(top_p=0.0, top_k=1), dict(top_p=0.0, top_k=0)],
                         ids=["top_p0.9", "top_p0.3", "top_p1", "top_k3", "top_k1", "plain"])
def test_exponential_race_is_multinomial_bit_for_bit_with_the_same_generator_state_after(dtype, how):
    params = SamplingParams(**how)
    shapes = [(1, 1, 2), (1, 3, 5), (2, 7, 16), (2, 25, 33), (2, 10, 1024), (1, 1, 2048), (4, 1, 7)]
    for seed in (0, 12345):
        for temp in (0.3, 4.0):
            g_ours, g_ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            for n, shape in enumerate(shapes):             # one stream for all: it must continue identically
                logits = torch.randn(shape, generator=torch.Generator().manual_seed(seed * 100 + n)) * 3
                if n % 3 == 0 and shape[-1] > 2:            # exact zeros, as top-k / top-p leave them
                    logits[..., ::2] = float("-inf")
                probs = torch.softmax(logits / temp, dim=-1).to(dtype)
                tok, p = sample_tokens(logits, probs, params, g_ours)
                want_tok, want_p = multinomial_sample_tokens(logits, probs, params, g_ref)
                assert tok.dtype == torch.long and tok.shape == shape[:-1] + (1,)
                assert torch.equal(tok, want_tok), (shape, seed, temp)
                assert torch.equal(p, want_p)
                assert torch.equal(g_ours.get_state(), g_ref.get_state()), (shape, seed, temp)
                assert bool(torch.gather(p, -1, tok).gt(0).all())       # never a zero-probability token


def test_exponential_race_equals_multinomial_on_non_contiguous_and_one_row_inputs():
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(64, 50, generator=g), -1)
    for x in (p.t().contiguous().t(), p[:, ::2] / p[:, ::2].sum(-1, keepdim=True), p[:1]):
        a, b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        assert torch.equal(exponential_race(x, a), torch.multinomial(x, 1, generator=b))
        assert torch.equal(a.get_state(), b.get_state())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_a_zero_probability_never_wins_even_when_the_draw_is_zero(dtype):
    """MPS's exponential_ can return -0.0: 0 / -0.0 is NaN, which argmax takes. The clamp prevents it."""
    p = torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.0, 0.0, 1.0, 0.0], [0.0, 0.9, 0.1, 0.0]], dtype=dtype)
    for zero in (0.0, -0.0):
        q = torch.full_like(p, zero)
        q[1, 2] = 3.0                                  # its only token's draw is ordinary
        tok = race_winner(p, q)
        assert bool(torch.gather(p, -1, tok).gt(0).all()), (zero, tok.flatten().tolist())
        q = torch.where(p == 0, torch.full_like(p, zero), torch.ones_like(p))   # zeros only where p is 0
        tok = race_winner(p, q)
        assert tok.flatten().tolist() == [1, 2, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_no_cpu_draw_lies_below_the_floor_so_the_clamp_changes_nothing_here(dtype):
    floor = race_floor(dtype)
    assert 0 < floor and torch.tensor(floor, dtype=dtype).item() == floor      # representable, not 0
    if dtype != torch.float16:
        assert floor == torch.finfo(dtype).tiny         # normal: no flush-to-zero device makes it 0
    q = torch.empty(1_000_000, dtype=dtype).exponential_(1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(q.clamp_min(floor), q)


# -- stride1 masking without float64 ------------------------------------------------------------------

def test_stride1_midpoint_is_pythons_round_half_to_even_in_integers():
    s = torch.arange(0, 100_000)
    assert torch.equal(half_to_even_midpoint(s), torch.tensor([round(0.5 * v) for v in s.tolist()]))
    assert half_to_even_midpoint(s).dtype == torch.long


# -- no float64 on any decoding path -------------------------------------------------------------------

def _magnet_frame() -> str:
    frames = [f for f in traceback.extract_stack() if "/magnet/" in f.filename.replace("\\", "/")]
    f = frames[-1] if frames else traceback.extract_stack()[-3]
    return f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno} ({f.line})"


class NoFloat64(TorchDispatchMode):
    """Records every op whose output holds a float64 tensor, with the magnet/ line that ran it."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tree_leaves(out)):
            self.found.append(f"{func} at {_magnet_frame()}")
        return out


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _paths(m: MagnetModel):
    """(name, call) for every way the decoding loop is entered: one window with every arrangement x
    sampling x fast mode, and each other entry (prompted, beyond the window, regenerate, rescored, vary)
    with each arrangement, their sampling and fast mode taken in turn so that each appears."""
    cond = tiny_cond()
    B, K, card = cond.batch, m.cfg.n_q, m.cfg.card
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, card, (B, K, 7), generator=g)
    clip = torch.randint(0, card, (B, K, 36), generator=g)
    rescorer = UniformRescorer(card)

    def params(arr, sampling, fast):
        return m.sampling_params(decoding_steps=STEPS, span_arrangement=arr, fast=fast, **SAMPLING[sampling])

    entries = {
        "prompted": lambda p: m.generate_from_condition(cond, frames=22, params=p, seed=2, prompt=prompt),
        "beyond the window": lambda p: m.generate_from_condition(cond, frames=40, params=p, seed=3, prompt=prompt),
        "regenerate": lambda p: m.regenerate_from_condition(cond, clip, 0.2, 0.4, params=p, seed=4),
        "rescored": lambda p: m.generate_from_condition(cond, frames=24, params=p, seed=6, rescorer=rescorer),
        "vary": lambda p: edit.vary_from_condition(m, cond, clip, strength=0.5, keep_codebooks=1, params=p, seed=7),
    }
    combos = [(s, f) for s in SAMPLING for f in (False, True)]
    for arr in ("nonoverlap", "stride1"):
        for sampling, fast in combos:
            yield f"one window {arr}/{sampling}/fast={fast}", lambda p=params(arr, sampling, fast): \
                m.generate_from_condition(cond, frames=24, params=p, seed=1)
        for i, (name, call) in enumerate(entries.items()):
            sampling, fast = combos[(i + 3 * (arr == "stride1")) % len(combos)]
            yield f"{name} {arr}/{sampling}/fast={fast}", lambda c=call, p=params(arr, sampling, fast): c(p)
    plain = m.sampling_params(decoding_steps=STEPS)
    cond_1 = tiny_cond(B=1, seed=1)
    uncond = TextCondition([""], cond_1.hidden, torch.zeros_like(cond_1.mask), cond_1.input_ids)
    yield "unconditional", lambda: m.generate_from_condition(uncond, frames=24, params=plain, seed=8)


@pytest.mark.parametrize("forward, path", [("cpu", "bf16"), ("cpu", "int8"), ("gpu-like", "bf16")])
def test_no_decoding_path_makes_a_float64_tensor(model, forward, path, monkeypatch):
    """forward 'cpu': the CPU's own forward (pruned positions; fast mode with each of its low-precision
    linears, whatever this CPU would choose); 'gpu-like': the static-buffer forward CUDA replays from
    graphs, without pruning."""
    if path == "int8" and not linears.int8_available():
        pytest.skip("this torch has no CPU int8 kernels")
    monkeypatch.setenv(linears.LINEARS_ENV, path)
    # The one exclusion: making the int8 copy (magnet/linears.py, Int8Linear.__init__: `.double()`, then
    # torch.quantize_per_channel) makes float64 per-channel weight scales, which the CPU's quantized kernels
    # require; the copy is made once per LM, before any decoding. It is made here, outside the mode, so the
    # fast paths below check everything else, the low-precision forward included.
    linears.fast_copy(model.lm, path, model.decoding.int8_reduce_range)
    settings = DecodingSettings() if forward == "cpu" else DecodingSettings(prune_on_cpu=False,
                                                                            static_steps_on_cpu=True)
    saved, model.decoding = model.decoding, settings
    ran = []
    try:
        for name, call in _paths(model):
            if forward == "gpu-like" and not name.startswith("one window"):
                continue                # the rest of the loop is the same as with the CPU's forward
            with NoFloat64() as mode:
                out = call().codes
            assert out.dtype == torch.long and 0 <= int(out.min()) and int(out.max()) < model.cfg.card, name
            assert not mode.found, f"{name}: float64 made by {mode.found[:5]}"
            ran.append(name)
    finally:
        model.decoding = saved
    assert len(ran) == (2 * (6 + 5) + 1 if forward == "cpu" else 2 * 6)


def test_the_float64_check_sees_float64_made_anywhere():
    with NoFloat64() as mode:
        torch.ones(3).double()
        torch.zeros(2, dtype=torch.float64)
        torch.round((torch.arange(4) + 1).to(torch.float64) * 0.5).long()
    assert len(mode.found) >= 4 and "_to_copy" in mode.found[0]
    with NoFloat64() as mode:
        torch.round((torch.arange(4) + 1).float() * 0.5).long()
    assert not mode.found


# -- nothing in the step loop waits on the device ------------------------------------------------------

def _reads_back(func, args) -> bool:
    """Ops that make the host wait for a device: reading a value (.item(), bool(), int()), sizes that
    depend on values (nonzero, boolean-mask indexing, masked_select, unique), torch.multinomial's checks."""
    name = func.__name__ if hasattr(func, "__name__") else str(func)
    base = str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else name
    if base == "repeat_interleave":                 # a tensor of repeats sizes the output from its values
        return getattr(func, "_overloadname", "") != "self_int"
    if base in ("_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "multinomial",
                "_unique", "_unique2", "unique_dim", "unique_consecutive"):
        return True
    if base in ("index", "index_put", "index_put_"):
        idx = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (idx or ()) if i is not None)
    return False


class StepLog(TorchDispatchMode):
    """Every op that reads back from the device, and the step boundaries (`mark`), in order."""

    def __init__(self):
        super().__init__()
        self.events: list = []

    def mark(self, done, total):
        self.events.append(("step", done))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _reads_back(func, args):
            self.events.append(("sync", f"{func} at {_magnet_frame()}"))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("settings", [DecodingSettings(prune_on_cpu=False, static_steps_on_cpu=True),
                                      DecodingSettings(prune_on_cpu=False)], ids=["cuda-like", "mps-like"])
def test_no_step_waits_on_the_device(model, settings):
    """Between two steps of a stage no op reads a tensor back (the forwards CUDA and MPS take: static
    buffers, or the plain forward; int8 is CPU-only, so fast mode runs without it here). The once-per-
    stage NaN check and the stage's setup (on host tensors) lie between the stages."""
    cond = tiny_cond()
    card = model.cfg.card
    prompt = torch.randint(0, card, (2, 4, 5), generator=torch.Generator().manual_seed(0))
    saved, model.decoding = model.decoding, settings
    try:
        fast_modes = (False, FastMode(linears="fp32"))
        for n, (sampling, fields) in enumerate(SAMPLING.items()):
            for a, arr in enumerate(("nonoverlap", "stride1")):
                fast = fast_modes[(n + a) % 2]
                params = model.sampling_params(decoding_steps=LOOP_STEPS, span_arrangement=arr, fast=fast, **fields)
                log = StepLog()
                with log:
                    model.generate_from_condition(cond, frames=24, params=params, seed=0, prompt=prompt,
                                                  progress=log.mark, rescorer=UniformRescorer(card))
                _assert_no_sync_within_a_stage(log.events, params.decoding_steps, f"{arr}/{sampling}/{fast}")
    finally:
        model.decoding = saved


def _assert_no_sync_within_a_stage(events, steps, name):
    last_of_stage = set(torch.tensor(steps).cumsum(0).tolist())
    done, within = 0, []
    for kind, what in events:
        if kind == "step":
            done = what
        elif done and done not in last_of_stage:       # after a step that is not its stage's last
            within.append((done, what))
    assert done == sum(steps), name
    assert not within, f"{name}: host syncs inside a stage (after step, op): {within[:5]}"


def test_the_step_log_sees_reads_back():
    """The check above would catch a sync: .item(), bool(), boolean indexing, multinomial."""
    log = StepLog()
    x = torch.rand(5)
    with log:
        float(x.sum())
        bool(x.any())
        _ = x[x > 0.5]
        torch.multinomial(x, 1)
        _ = x.sum() * 2
    assert len([e for e in log.events if e[0] == "sync"]) == 4
