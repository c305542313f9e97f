"""The forward of MAGNeT's decoding steps: the same function as `LM.forward`, with less work.

`LM.forward` / `Layer.forward` (transformer.py) are the specification. This module computes the same
logits for the decoding loop (sampling.py), skipping only work that cannot change them, plus fast mode's
low-precision layers, which change them within a tolerance:

- only the stage's output head; no cross-attention for the null-condition rows (their memory is exactly
  zero and there are no biases); the first self-attention once for rows that share their codes;
- position pruning: when the loop names the positions whose logits it uses, only the rows that can reach
  them through the layers are computed (`active_positions`);
- the band attention of codebooks >= 1 in blocks, without a [T, T] matrix (`band_attention`);
- fp32 linears on the CPU through oneDNN, or, in fast mode, one low-precision copy of the layers (bf16 or
  int8, whichever this CPU runs fastest): `magnet.linears`;
- static buffers and, on CUDA, a CUDA graph per stage: `magnet.cuda_graphs`.

`StageForward` is one stage's forward, built from (model, memory, stage, fast mode, `DecodingSettings`);
its `logits` method gives each step's logits. It reaches `parallel_forward` through the LM (or a wrapper
of it) by handing `LM.forward` a `StepPlan` (`plan=`): the LM holds its weights' lock and calls the plan;
transformer.py imports nothing from here. The settings are fields, not module switches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cuda_graphs import StaticStep, graph_state, graphs_wanted, hold, same_logits
from .errors import first_line
from .linears import ExactLinears, FastLinears, fast_copy, fast_linears, linear, plain_linear, rows_pruned
from .transformer import activation_dtype

UNIT_CFG_TOLERANCE = 1e-5


@dataclass(frozen=True)
class DecodingSettings:
    """How the decoding loop runs its forward (none of it changes the exact mode's result).

    prune_on_cpu: compute only the positions whose logits a step uses (CPU; the shapes vary per step).
    cuda_graphs: on CUDA, replay each stage's fixed-shape forward from a CUDA graph (also off when
        $MAGNET_CUDA_GRAPHS is 0, or once a graph of the model failed its check: see
        `magnet.cuda_graphs.GraphState`).
    graph_min_steps: capture a stage only when it has at least this many steps (its first step runs
        eagerly, a capture costs about one more, and every further step saves most of the launch time).
    verify_graphs: compare the first replay of each captured shape with an eager forward; a mismatch
        turns the model's graphs off (with one warning) and the eager result is used.
    static_steps_on_cpu: run the CUDA-graph bookkeeping (static buffers, no pruning, the capture policy,
        the check and the fallback) eagerly on the CPU (tests).
    int8_reduce_range: int8 activations in 7 bits (PyTorch's default for fbgemm): with 8 bits, the AVX2
        kernel's int16 pair sums saturate on this model's layer inputs (GELU outputs are one-sided), and
        the logits' relative error of the real-size small model went from 3.5-4% to 9-11%
        (scripts/fast_quality.py), at the same speed.
    bf16_attention: with fast mode's bf16 linears, self-attention reads q/k/v in bf16 (SDPA's CPU kernel
        keeps its scores, softmax and sums in float32): 2.4x faster than float32 attention here, for a
        logit error of the same size as the linears' own (scripts/fast_quality.py).
    """
    prune_on_cpu: bool = True
    cuda_graphs: bool = True
    graph_min_steps: int = 4
    verify_graphs: bool = True
    static_steps_on_cpu: bool = False
    int8_reduce_range: bool = True
    bf16_attention: bool = True


DEFAULT_SETTINGS = DecodingSettings()


# -- position pruning and the band ------------------------------------------------------------------

def dilate(positions: torch.Tensor, width: int) -> torch.Tensor:
    """bool [T] -> bool [T]: True within `width` positions of a True."""
    if width <= 0:
        return positions
    x = positions.to(torch.float32).view(1, 1, -1)
    return F.max_pool1d(x, 2 * width + 1, stride=1, padding=width).view(-1) > 0


def active_positions(wanted: torch.Tensor | None, num_layers: int, band: int | None) -> list:
    """Which positions each layer must compute so that the last layer's outputs are right at `wanted`
    (bool [T]; None = all): `act[l]` = sorted positions (LongTensor) or None for all, for l = -1..L-1
    (index l + 1 in the returned list; act[-1] = the inputs of layer 0).

    The last layer needs its outputs only at `wanted`. A layer with full attention needs every position
    of its input; with a band of half-width `band` (MAGNeT's codebooks >= 1) only positions within
    `band` of a wanted output. So with the band the set grows by `band` per layer going down."""
    acts: list = [None] * (num_layers + 1)
    cur = wanted
    for i in range(num_layers, -1, -1):
        if cur is None or bool(cur.all()):
            break
        acts[i] = cur.nonzero().view(-1)
        cur = dilate(cur, band) if band is not None else None
    return acts


_BAND_BLOCK = 20
_band_blocks_cache: dict = {}


def band_blocks(n: int, pos: torch.Tensor | None, width: int, device, dtype):
    """Blocks of the band attention over n rows at sorted positions `pos` (None: 0..n-1).

    Queries go in blocks of C consecutive rows; block b reads the L = C + 2*width keys around it (the
    window is moved inside [0, n) at the ends, so it never repeats a key), and an additive mask [nb, C, L]
    keeps exactly the keys within `width` positions. Any key of a query at row j lies in rows
    [j - width, j + width] (positions are increasing), so it is in the window. Cached per length when
    the rows are 0..n-1."""
    key = (n, width, str(device), dtype) if pos is None else None
    if key is not None and key in _band_blocks_cache:
        return _band_blocks_cache[key]
    C = n if n <= _BAND_BLOCK + 2 * width else _BAND_BLOCK
    L = min(C + 2 * width, n)
    nb = -(-n // C)
    starts = (torch.arange(nb) * C - width).clamp(0, n - L)
    kidx = starts.view(-1, 1) + torch.arange(L).view(1, -1)                      # [nb, L]
    qidx = torch.arange(nb * C).clamp(max=n - 1).view(nb, C)                      # [nb, C]
    p = torch.arange(n) if pos is None else pos.cpu()
    ok = (p[qidx].unsqueeze(-1) - p[kidx].unsqueeze(1)).abs() <= width            # [nb, C, L]
    bias = torch.zeros(ok.shape, dtype=dtype).masked_fill_(~ok, float("-inf")).to(device)
    blocks = (kidx.view(-1).to(device), None if nb * C == n else qidx.view(-1).to(device), bias, nb, C, L)
    if key is not None:
        if len(_band_blocks_cache) > 8:
            _band_blocks_cache.clear()
        _band_blocks_cache[key] = blocks
    return blocks


def band_attention(q, k, v, width: int, pos: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q, k, v [R, H, n, D] where a row attends only the rows within `width` positions
    (`pos`: the rows' sorted positions, None = 0..n-1): the same numbers as SDPA with the boolean band
    mask, at about (C + 2 * width) / n of its cost: no [n, n] matrix is formed."""
    R, H, n, D = q.shape
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):           # scores and softmax in float32, as SDPA's kernels do
        q, k, v = q.float(), k.float(), v.float()
    kidx, qidx, bias, nb, C, L = band_blocks(n, pos, width, q.device, q.dtype)
    q = q * (1.0 / math.sqrt(D))
    if qidx is not None:
        q = q.index_select(2, qidx)
    kw = k.index_select(2, kidx).view(R, H, nb, L, D)
    vw = v.index_select(2, kidx).view(R, H, nb, L, D)
    scores = torch.matmul(q.view(R, H, nb, C, D), kw.transpose(-1, -2)).add_(bias)
    out = torch.matmul(torch.softmax(scores, dim=-1), vw).view(R, H, nb * C, D)
    return (out[:, :, :n] if qidx is not None else out).to(dtype)


# -- the forward ------------------------------------------------------------------------------------

def parallel_forward(lm, codes, mem, stage: int, heads=None, wanted: torch.Tensor | None = None,
                     copy: FastLinears | None = None) -> torch.Tensor:
    """MAGNeT's forward (pre-norm, non-causal): the same function as `LM.forward`, without the work that
    cannot change its result (see the module docstring). codes [b, K, T] -> logits [B, len(heads), T, card];
    with `wanted` (bool [T]) the logits of those positions only, [B, len(heads), wanted.sum(), card].
    `copy`: the layers' linear maps run on this low-precision copy (fast mode) instead of the weights."""
    cfg, layers = lm.cfg, lm.transformer.layers
    R, H = mem.batch, cfg.num_heads
    band = cfg.subcodes_context if stage > 0 and cfg.subcodes_context >= 0 else None
    x = lm.embed(codes)                                                        # [b, T, D]
    T = x.shape[1]
    if x.shape[0] != R and R % x.shape[0]:
        raise ValueError(f"codes batch {x.shape[0]} does not divide the memory's {R} rows")
    acts = active_positions(None if wanted is None else wanted.to(torch.bool).cpu(), len(layers), band)
    n_heads = cfg.n_q if heads is None else len(heads)
    if acts[-1] is not None and acts[-1].numel() == 0:             # nothing wanted
        return x.new_zeros((R, n_heads, 0, cfg.card))
    if acts[0] is not None:
        x = x[:, acts[0].to(x.device)]
    band_mask = None
    if band is not None and x.device.type != "cpu" and acts[0] is None:
        band_mask = lm.attn_mask(stage, T, x.device, activation_dtype(x.device, lm.linears[0].weight.dtype))
        hold(band_mask)                                              # a captured graph reads it
    for i, layer in enumerate(layers):
        pos_in, pos_out = acts[i], acts[i + 1]
        out_rows = None                    # rows of this layer's input that it must output (None: all)
        if pos_out is not None:
            out_rows = pos_out if pos_in is None else torch.searchsorted(pos_in, pos_out)
            out_rows = out_rows.to(x.device)
        lin = copy.layers[i] if copy is not None else ExactLinears(layer, pos_in is not None, out_rows is not None)
        rows_pruned(pos_in is not None or out_rows is not None)          # bf16_rows pads only pruned rows
        # self-attention (rows that share their codes share it in the first layer)
        h = layer.norm1(x)
        if band is None and out_rows is not None and lin.split:   # full attention: keys everywhere, queries where wanted
            kv = lin.kv(h)
            q = lin.q(h.index_select(1, out_rows))
            k, v = kv.view(*kv.shape[:2], 2, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
            a = F.scaled_dot_product_attention(q.view(*q.shape[:2], H, -1).transpose(1, 2), k, v)
        else:
            qkv = lin.qkv(h)
            q, k, v = qkv.view(*qkv.shape[:2], 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
            if band is None:
                a = F.scaled_dot_product_attention(q, k, v)
            elif band_mask is not None and pos_in is None:
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask)
            else:
                a = band_attention(q, k, v, band, pos_in)
            if out_rows is not None:
                a = a.index_select(2, out_rows)
        res = x if out_rows is None else x.index_select(1, out_rows)
        x = res + lin.out(a.transpose(1, 2).reshape(res.shape))
        if x.shape[0] != R:
            x = x.repeat(R // x.shape[0], 1, 1)
        # cross-attention to the text (rows with a memory only: the others add exactly zero)
        x_text = x if mem.rows == R else x[:mem.rows]
        h = layer.norm_cross(x_text)
        mk, mv = mem.kv[i]
        q = lin.cq(h)
        a = F.scaled_dot_product_attention(q.view(*q.shape[:2], H, -1).transpose(1, 2), mk, mv)
        x_text += lin.cout(a.transpose(1, 2).reshape(x_text.shape))
        # feed-forward
        h = layer.norm2(x)
        x += lin.fc2(lin.fc1_gelu(h))
    x = lm.out_norm(x)
    heads = range(cfg.n_q) if heads is None else heads
    head = plain_linear if acts[-1] is not None else linear
    return torch.stack([head(x, lm.linears[k].weight, lm.linears[k].bias) for k in heads], dim=1)


@dataclass(frozen=True)
class StepPlan:
    """What `LM.forward(..., plan=plan)` hands to `parallel_forward`: the positions whose logits are
    wanted (bool [T], None = all) and fast mode's low-precision linears ('bf16', 'int8'; None = the
    weights themselves, exactly)."""
    wanted: torch.Tensor | None = None
    linears: str | None = None
    int8_reduce_range: bool = True
    bf16_attention: bool = True

    def run(self, lm, codes, mem, stage: int, heads) -> torch.Tensor:
        copy = fast_copy(lm, self.linears, self.int8_reduce_range, self.bf16_attention) if self.linears else None
        return parallel_forward(lm, codes, mem, stage, heads, self.wanted, copy)


# -- one stage's forward ----------------------------------------------------------------------------

class StageForward:
    """The forward of one decoding stage: `logits(codes, used, coef)` -> (logits [rows, T, card] float32,
    guided), `guided` telling whether the rows are [conditional; null] to be mixed by guidance.

    `lm` is the LM (or anything called like it, e.g. a wrapper that adds codebooks); `mem` its text memory
    for the conditional and null rows when `guided`; `fast` the `FastMode` or None (exact mode). On the
    CPU, the logits at positions outside `used` (bool [B, T]: the positions the step samples and scores)
    are not computed and come back as zeros (`settings.prune_on_cpu`); they never reach the result, and
    keep the random stream of sampling the same as computing every position.

    On CUDA a stage of at least `settings.graph_min_steps` steps runs from a `StaticStep` (a CUDA graph),
    taken from the model's `GraphState` when one of the same shapes was captured before (the previous
    window of a long generation); its first replay of each shape is checked against the eager forward,
    and a failed capture or check turns the model's graphs off: the step's result is then the eager one."""

    def __init__(self, lm, mem, *, guided: bool, batch: int, stage: int, n_steps: int, fast=None,
                 settings: DecodingSettings = DEFAULT_SETTINGS):
        param = next(lm.parameters())
        device = param.device
        self.lm, self.mem, self.guided, self.stage = lm, mem, guided, stage
        self.settings = settings
        parallel = lm.cfg.norm_first and not lm.cfg.causal         # the forward that can prune and run int8
        self.linears = fast_linears(fast, device, param.dtype) if parallel else None
        self.reduce_range = settings.int8_reduce_range
        self.graph = device.type == "cuda"
        self.graphs = graph_state(lm)
        self.static = (parallel and n_steps > 1 and n_steps >= settings.graph_min_steps and self.graphs.off is None
                       and ((self.graph and graphs_wanted(settings))
                            or (device.type == "cpu" and settings.static_steps_on_cpu)))
        self.prune = parallel and settings.prune_on_cpu and device.type == "cpu" and not self.static   # fixed shapes
        self.parallel = parallel
        self.mem_cond = mem.cond_only(batch) if guided and fast and fast.skip_unit_cfg else None
        self._static_step: StaticStep | None = None

    def _forward(self, codes, mem, wanted=None):
        plan = (StepPlan(wanted, self.linears, self.reduce_range, self.settings.bf16_attention) if self.parallel
                else None)
        kw = {} if plan is None else {"plan": plan}
        return self.lm(codes, mem, stage=self.stage, heads=[self.stage], **kw)

    def _keys(self, codes: torch.Tensor) -> tuple[tuple, tuple]:
        """(shape key: what a replay's check covers, step key: what a kept step may be reused for). A kept
        step reads the weights, the band mask and the wrapper it was captured with by address: it is reused
        only by the same forward while every weight is where it was."""
        k0 = self.mem.kv[0][0] if self.mem.kv else None
        shape = (self.stage, tuple(codes.shape), self.mem.rows, self.mem.batch, self.linears,
                 None if k0 is None else (tuple(k0.shape), k0.dtype, str(k0.device)))
        weights = tuple(p.data_ptr() for p in self.lm.parameters())
        return shape, (shape, id(self.lm), weights)      # `weights` last: GraphState.get reads it

    def _static(self, codes: torch.Tensor) -> torch.Tensor | None:
        """The step's logits [rows, 1, T, card] from static buffers (a CUDA graph on CUDA), or None when the
        static path is off for this model (the caller then runs the step eagerly)."""
        step, first = self._static_step, None
        if step is None:
            shape_key, step_key = self._keys(codes)
            step = self.graphs.get(step_key)
            if step is None:
                step = StaticStep(lambda c, m: self._forward(c, m), codes, self.mem, graph=self.graph)
                if step.error is not None:
                    self.graphs.turn_off(f"capturing a CUDA graph failed: {first_line(step.error)}")
                    self.static = False
                    return step.first
                self.graphs.put(step_key, step)
                first = step.first
            self._static_step, self._shape_key = step, shape_key
            if first is not None:
                return first
            out = step(codes, self.mem)
        else:
            out = step(codes)
        if self.settings.verify_graphs and self._shape_key not in self.graphs.verified:
            ref = self._forward(codes, self.mem)
            if not same_logits(out, ref):
                self.graphs.turn_off("a graph replay differed from the eager forward")
                self.static = False
                return ref
            self.graphs.verified.add(self._shape_key)
        return out

    def logits(self, codes: torch.Tensor, used: torch.Tensor, coef: float) -> tuple[torch.Tensor, bool]:
        mem, guided = self.mem, self.guided
        if self.mem_cond is not None and abs(coef - 1.0) <= UNIT_CFG_TOLERANCE:    # fast mode: no null pass
            mem, guided = self.mem_cond, False
        if self.static and mem is self.mem and self.graphs.off is None:
            out = self._static(codes)
            if out is not None:
                return out[:, 0].float(), guided
        wanted = None
        if self.prune:
            wanted = used.any(dim=0)
            if bool(wanted.all()):
                wanted = None
        logits = self._forward(codes, mem, wanted)[:, 0].float()
        if wanted is not None:                                          # [rows, n, card] -> [rows, T, card]
            full = logits.new_zeros((logits.shape[0], codes.shape[-1], logits.shape[-1]))
            full[:, wanted] = logits
            logits = full
        return logits, guided
