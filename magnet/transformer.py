"""The language model shared by MAGNeT and MusicGen: a transformer over summed codebook embeddings.

Input = sum over codebooks of `emb[k](codes[:, k])` + sinusoidal positions; pre-norm layers of
self-attention, cross-attention to the text memory and a GELU feed-forward; `out_norm`; one linear
head per codebook. Parameter names follow the official checkpoints (`transformer.layers.N.*`), so a
release loads without renaming (only the text projection moves to `text_proj`).

MAGNeT attends fully for codebook 0 and within a band of `subcodes_context` frames for codebooks >= 1;
MusicGen is causal and decodes frame by frame with a key/value cache (`KVCache`).

Two forward passes share the weights: MusicGen's (causal, optionally cached: `Layer.forward`) and
MAGNeT's parallel one (`LM._forward_parallel`), which skips work that cannot change the result:
only the stage's head, no cross-attention for all-zero null memories, the first self-attention once
for rows that share their codes, the band attention without a [T, T] matrix (`band_attention`), and,
when the caller names the positions whose logits it needs, only the rows that can reach them
(`active_positions`). On the CPU its fp32 linear layers run on oneDNN (`linear`), and an int8 copy of
them (`Int8Linears`, fast mode) can stand in for the fp32 weights.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LMConfig:
    """Every architecture number of a release, read from its `xp.cfg` (see `checkpoints.lm_config_from_xp`)."""
    kind: str                      # 'magnet' (non-autoregressive) or 'musicgen' (autoregressive, delay pattern)
    dim: int
    num_heads: int
    num_layers: int
    ffn_dim: int
    n_q: int                       # number of codebooks
    card: int                      # codebook size; the mask / special token id is `card`
    text_dim: int                  # width of the text encoder's hidden states
    text_encoder: str = "t5-base"  # name of the T5 the release was trained with
    norm_first: bool = True
    bias_ff: bool = False
    bias_attn: bool = False
    bias_proj: bool = False
    causal: bool = False
    subcodes_context: int = 5      # band half-width for codebooks >= 1 (-1: unrestricted)
    segment_duration: float = 10.0  # the window the release was trained on, in seconds
    span_len: int = 3
    max_period: float = 10000.0
    delays: list[int] = field(default_factory=list)  # MusicGen delay pattern, one delay per codebook

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LMConfig":
        return cls(**d)


def sin_embedding(T: int, dim: int, max_period: float, device, dtype=torch.float32, offset: int = 0):
    """Sinusoidal positions [1, T, dim]: cosines in the first half, sines in the second."""
    half = dim // 2
    pos = torch.arange(offset, offset + T, device=device, dtype=dtype).view(1, -1, 1)
    adim = torch.arange(half, device=device, dtype=dtype).view(1, 1, -1)
    phase = pos / (torch.full([], max_period, device=device, dtype=dtype) ** (adim / (half - 1)))
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


def band_mask(T: int, context: int, device) -> torch.Tensor:
    """Boolean [T, T], True where |query - key| <= context: the attention of MAGNeT's stages >= 1.
    Broadcast over batch and heads by the attention call; built once per length (see `LM.attn_mask`)."""
    pos = torch.arange(T, device=device)
    return (pos.view(-1, 1) - pos.view(1, -1)).abs() <= context


# -- kernels of the parallel forward ---------------------------------------------------------------

_ONEDNN: bool | None = None


def _onednn_ok() -> bool:
    """Whether oneDNN's inner product runs here (probed once). On x86 CPUs it is 15-30% faster than
    the default fp32 GEMM for this model's shapes, on the same dense weights (no packed copy)."""
    global _ONEDNN
    if _ONEDNN is None:
        try:
            x, w = torch.ones(3, 8), torch.ones(4, 8)
            _ONEDNN = bool(torch.backends.mkldnn.is_available()) and torch.equal(
                torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), F.linear(x, w))
        except Exception:       # an old torch, a build without oneDNN, an unsupported CPU
            _ONEDNN = False
    return _ONEDNN


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, computed by oneDNN for fp32 on the CPU when nothing needs gradients (same numbers up to
    float rounding: the products are summed in another order)."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)) and _onednn_ok()):
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


INT8_REDUCE_RANGE = True
"""Activations in 7 bits (PyTorch's default for fbgemm): with 8 bits, the AVX2 kernel's int16 pair sums
saturate on this model's layer inputs (GELU outputs are one-sided), and the logits' relative error
of the real-size small model went from 3.5-4% to 9-11% (scripts/fast_quality.py), at the same speed."""


class Int8Linear:
    """A linear layer with int8 weights (per output channel scales) and int8 activations quantized on
    the fly per call, per tensor (fbgemm's dynamic quantization, CPU): about 1.7x the speed of oneDNN
    fp32 here, at about 2% relative error per layer output. 1 byte per weight."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None):
        w = w.detach().float().cpu().contiguous()
        scale = (w.abs().amax(dim=1).clamp_min(1e-12) / 127).double()
        with warnings.catch_warnings():       # the quantized tensor API is deprecated, the ops are not gone
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(q, None if b is None else b.detach().float().cpu())
        self.nbytes = w.numel() + (0 if b is None else 4 * b.numel()) + 12 * w.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.contiguous(), self.packed, INT8_REDUCE_RANGE)


def int8_available() -> bool:
    """Whether dynamic int8 linear layers run on this CPU (fbgemm on x86, qnnpack on ARM)."""
    try:
        lin = Int8Linear(torch.ones(4, 8), None)
        return lin(torch.ones(2, 8)).shape == (2, 4)
    except Exception:
        return False


def dilate(need: torch.Tensor, width: int) -> torch.Tensor:
    """bool [T] -> bool [T]: True within `width` positions of a True."""
    if width <= 0:
        return need
    x = need.to(torch.float32).view(1, 1, -1)
    return F.max_pool1d(x, 2 * width + 1, stride=1, padding=width).view(-1) > 0


def active_positions(need: torch.Tensor | None, num_layers: int, band: int | None) -> list:
    """Which positions each layer must compute so that the last layer's outputs are right at `need`
    (bool [T]; None = all): `act[l]` = sorted positions (LongTensor) or None for all, for l = -1..L-1
    (index l + 1 in the returned list; act[-1] = the inputs of layer 0).

    The last layer needs its outputs only at `need`. A layer with full attention needs every position
    of its input; with a band of half-width `band` (MAGNeT's codebooks >= 1) only positions within
    `band` of a needed output. So with the band the set grows by `band` per layer going down."""
    acts: list = [None] * (num_layers + 1)
    cur = need
    for i in range(num_layers, -1, -1):
        if cur is None or bool(cur.all()):
            break
        acts[i] = cur.nonzero().view(-1)
        cur = dilate(cur, band) if band is not None else None
    return acts


_BAND_BLOCK = 20
_band_plans: dict = {}


def _band_plan(n: int, pos: torch.Tensor | None, width: int, device, dtype):
    """Blocks of the band attention over n rows at sorted positions `pos` (None: 0..n-1).

    Queries go in blocks of C consecutive rows; block b reads the L = C + 2*width keys around it (the
    window is moved inside [0, n) at the ends, so it never repeats a key), and an additive mask [nb, C, L]
    keeps exactly the keys within `width` positions. Any key of a query at row j lies in rows
    [j - width, j + width] (positions are increasing), so it is in the window."""
    key = (n, width, str(device), dtype) if pos is None else None
    if key is not None and key in _band_plans:
        return _band_plans[key]
    C = n if n <= _BAND_BLOCK + 2 * width else _BAND_BLOCK
    L = min(C + 2 * width, n)
    nb = -(-n // C)
    starts = (torch.arange(nb) * C - width).clamp(0, n - L)
    kidx = starts.view(-1, 1) + torch.arange(L).view(1, -1)                      # [nb, L]
    qidx = torch.arange(nb * C).clamp(max=n - 1).view(nb, C)                      # [nb, C]
    p = torch.arange(n) if pos is None else pos.cpu()
    ok = (p[qidx].unsqueeze(-1) - p[kidx].unsqueeze(1)).abs() <= width            # [nb, C, L]
    bias = torch.zeros(ok.shape, dtype=dtype).masked_fill_(~ok, float("-inf")).to(device)
    plan = (kidx.view(-1).to(device), None if nb * C == n else qidx.view(-1).to(device), bias, nb, C, L)
    if key is not None:
        if len(_band_plans) > 8:
            _band_plans.clear()
        _band_plans[key] = plan
    return plan


def band_attention(q, k, v, width: int, pos: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q, k, v [R, H, n, D] where a row attends only the rows within `width` positions
    (`pos`: the rows' sorted positions, None = 0..n-1): the same numbers as SDPA with the boolean band
    mask, at about (C + 2 * width) / n of its cost: no [n, n] matrix is formed."""
    R, H, n, D = q.shape
    kidx, qidx, bias, nb, C, L = _band_plan(n, pos, width, q.device, q.dtype)
    q = q * (1.0 / math.sqrt(D))
    if qidx is not None:
        q = q.index_select(2, qidx)
    kw = k.index_select(2, kidx).view(R, H, nb, L, D)
    vw = v.index_select(2, kidx).view(R, H, nb, L, D)
    scores = torch.matmul(q.view(R, H, nb, C, D), kw.transpose(-1, -2)).add_(bias)
    out = torch.matmul(torch.softmax(scores, dim=-1), vw).view(R, H, nb * C, D)
    return out[:, :, :n] if qidx is not None else out


class KVCache:
    """Per-layer keys/values of the frames seen so far, for autoregressive decoding (MusicGen).
    Preallocated to `max_len`, so a new frame costs the same whatever the length so far."""

    def __init__(self, num_layers: int, batch: int, heads: int, max_len: int, head_dim: int, device, dtype):
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        t0, t1 = self.length, self.length + k.shape[2]
        self.k[layer][:, :, t0:t1] = k
        self.v[layer][:, :, t0:t1] = v
        return self.k[layer][:, :, :t1], self.v[layer][:, :, :t1]


class Attention(nn.Module):
    """Multi-head attention with packed q/k/v weights (`in_proj_weight`), as in the checkpoints."""

    def __init__(self, dim: int, num_heads: int, bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim)) if bias else None
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def _heads(self, x):  # [B, T, H*D] -> [B, H, T, D]
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, -1).transpose(1, 2)

    def _merge(self, x):  # [B, H, T, D] -> [B, T, H*D]
        B, H, T, D = x.shape
        return x.transpose(1, 2).reshape(B, T, H * D)

    def forward(self, x, mask=None, cache: KVCache | None = None, layer: int = 0, causal: bool = False):
        """Self-attention. `mask`: boolean [T, T] (True = attend) or None (full, or causal if `causal`)."""
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if cache is not None:
            k, v = cache.append(layer, k, v)
            # with a cache, the new frame attends to everything cached so far: no mask needed for one frame
            causal = causal and q.shape[2] > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.out_proj(self._merge(out))

    def memory_kv(self, memory):
        """Keys and values of the cross-attention memory, computed once per generation."""
        dim = self.in_proj_weight.shape[1]
        wk, wv = self.in_proj_weight[dim:2 * dim], self.in_proj_weight[2 * dim:]
        bk = bv = None
        if self.in_proj_bias is not None:
            bk, bv = self.in_proj_bias[dim:2 * dim], self.in_proj_bias[2 * dim:]
        return self._heads(F.linear(memory, wk, bk)), self._heads(F.linear(memory, wv, bv))

    def cross(self, x, k, v):
        """Cross-attention of `x` to precomputed memory keys/values. No padding mask: padded memory
        positions are zero vectors that still take part in the softmax, as in the reference."""
        dim = self.in_proj_weight.shape[1]
        bq = None if self.in_proj_bias is None else self.in_proj_bias[:dim]
        q = self._heads(F.linear(x, self.in_proj_weight[:dim], bq))
        return self.out_proj(self._merge(F.scaled_dot_product_attention(q, k, v)))


class Layer(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.norm_first = cfg.norm_first
        self.self_attn = Attention(cfg.dim, cfg.num_heads, cfg.bias_attn)
        self.cross_attention = Attention(cfg.dim, cfg.num_heads, cfg.bias_attn)
        self.linear1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.bias_ff)
        self.linear2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.bias_ff)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=1e-5)
        self.norm_cross = nn.LayerNorm(cfg.dim, eps=1e-5)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=1e-5)

    def _cross(self, x, mem):
        """Cross-attention over the rows that have a memory. `mem.rows` < len(x) when the trailing
        (null-condition) rows have an all-zero memory and no biases: their cross-attention output is
        exactly zero (zero keys and values, no bias), so it is skipped."""
        k, v = mem.kv[self._index]
        if mem.rows == x.shape[0]:
            return self.cross_attention.cross(x, k, v)
        out = torch.zeros_like(x)
        out[:mem.rows] = self.cross_attention.cross(x[:mem.rows], k, v)
        return out

    def forward(self, x, mem, mask=None, cache=None, causal=False):
        if self.norm_first:
            x = x + self.self_attn(self.norm1(x), mask, cache, self._index, causal)
            x = x + self._cross(self.norm_cross(x), mem)
            return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))
        src = x
        x = self.norm1(x + self.self_attn(x, mask, cache, self._index, causal))
        x = self.norm_cross(x + self._cross(src, mem))  # the reference feeds the layer input here
        return self.norm2(x + self.linear2(F.gelu(self.linear1(x))))


class Transformer(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        for i, layer in enumerate(self.layers):
            layer._index = i


@dataclass
class Memory:
    """The text memory of one generation, ready for every layer: `kv[layer] = (keys, values)`.
    `rows` = how many leading batch rows have a memory (the others, null-condition rows, have an
    all-zero one whose cross-attention is skipped)."""
    kv: list
    rows: int
    batch: int

    def cond_only(self, rows: int) -> "Memory":
        """The memory of the first `rows` rows alone (the conditional rows, for a step without guidance)."""
        if self.rows <= rows:
            return Memory(kv=self.kv, rows=self.rows, batch=rows)
        return Memory(kv=[(k[:rows], v[:rows]) for k, v in self.kv], rows=rows, batch=rows)


class LM(nn.Module):
    """The MAGNeT / MusicGen language model. Build with `LM(cfg)`, load a release's weights with
    `load_state_dict` (see `checkpoints`)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.text_proj = nn.Linear(cfg.text_dim, cfg.dim)
        self.emb = nn.ModuleList(nn.Embedding(cfg.card + 1, cfg.dim) for _ in range(cfg.n_q))
        self.transformer = Transformer(cfg)
        self.out_norm = nn.LayerNorm(cfg.dim, eps=1e-5) if cfg.norm_first else None
        self.linears = nn.ModuleList(nn.Linear(cfg.dim, cfg.card, bias=cfg.bias_proj) for _ in range(cfg.n_q))
        self._masks: dict = {}
        self._int8: Int8Linears | None = None

    @property
    def mask_id(self) -> int:
        return self.cfg.card

    # -- text memory ------------------------------------------------------------------------------
    def project_text(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """T5 last hidden state [B, L, text_dim] + attention mask [B, L] -> memory [B, L, dim]
        (the release's output projection, then zeroed where the mask is 0)."""
        w = self.text_proj.weight
        return self.text_proj(hidden.to(w)) * mask.unsqueeze(-1).to(w)

    def memory(self, hidden: torch.Tensor, mask: torch.Tensor, null_rows: int = 0) -> Memory:
        """Project the text once and precompute every layer's cross-attention keys/values.
        `null_rows`: how many trailing rows are null conditions (mask all zero); when the model has
        no attention biases their cross-attention is exactly zero and is skipped."""
        mem = self.project_text(hidden, mask)
        B = mem.shape[0]
        rows = B
        if null_rows and not self.cfg.bias_attn and not bool(mask[B - null_rows:].any()):
            rows = B - null_rows
        mem = mem[:rows]
        kv = [layer.cross_attention.memory_kv(mem) for layer in self.transformer.layers]
        return Memory(kv=kv, rows=rows, batch=B)

    # -- forward ------------------------------------------------------------------------------------
    def attn_mask(self, stage: int, T: int, device) -> torch.Tensor | None:
        """Self-attention mask for a MAGNeT stage: None (full) for codebook 0, the band otherwise."""
        if self.cfg.causal or stage <= 0 or self.cfg.subcodes_context < 0:
            return None
        key = (T, str(device))
        if key not in self._masks:
            self._masks = {key: band_mask(T, self.cfg.subcodes_context, device)}
        return self._masks[key]

    def embed(self, codes: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """codes [B, K, T] -> summed embeddings + positions [B, T, dim]."""
        x = self.emb[0](codes[:, 0])
        for k in range(1, codes.shape[1]):
            x = x + self.emb[k](codes[:, k])
        return x + sin_embedding(codes.shape[-1], self.cfg.dim, self.cfg.max_period, x.device, x.dtype, offset)

    def forward(self, codes: torch.Tensor, mem: Memory, stage: int = -1, heads=None,
                cache: KVCache | None = None, *, need: torch.Tensor | None = None,
                int8: bool = False) -> torch.Tensor:
        """codes [b, K, T] -> logits [B, len(heads), T, card] (all codebooks when `heads` is None).

        `b` may be smaller than the memory's batch B when B is a multiple of b: the codes are then
        shared by every group of b rows (classifier-free guidance runs the same codes with the
        conditional and the null memory), and embedded once.

        MAGNeT (non-causal, no cache) only: `need` (bool [T]) names the positions whose logits the
        caller uses; the logits come back for those positions only ([B, len(heads), need.sum(), card])
        and only what can reach them is computed. `int8`: the transformer's linear layers run on the
        int8 copy (`int8_linears`, CPU; fast mode) instead of the fp32 weights.
        """
        if cache is None and not self.cfg.causal and self.cfg.norm_first:
            return self._forward_parallel(codes, mem, stage, heads, need, int8)
        if need is not None or int8:
            raise ValueError("need / int8 apply to MAGNeT's pre-norm parallel forward only")
        x = self.embed(codes, offset=cache.length if cache is not None else 0)
        if x.shape[0] != mem.batch:
            x = x.repeat(mem.batch // x.shape[0], 1, 1)
        mask = self.attn_mask(stage, x.shape[1], x.device)
        for layer in self.transformer.layers:
            x = layer(x, mem, mask, cache, self.cfg.causal)
        if cache is not None:
            cache.length += codes.shape[-1]
        if self.out_norm is not None:
            x = self.out_norm(x)
        heads = range(self.cfg.n_q) if heads is None else heads
        return torch.stack([self.linears[k](x) for k in heads], dim=1)

    # -- the parallel forward (MAGNeT) ---------------------------------------------------------------
    def int8_linears(self) -> "Int8Linears":
        """The int8 copy of the transformer's linear layers (fast mode on the CPU), made on first use
        and kept beside the fp32 weights, which stay untouched: about 1 byte per transformer weight
        (14 * dim^2 bytes per layer: 0.34 GiB for the small model, 1.5 GiB for medium)."""
        if self._int8 is None or not self._int8.matches(self):
            self._int8 = None
            self._int8 = Int8Linears(self)
        return self._int8

    def drop_int8(self):
        """Free the int8 copy (it is rebuilt on the next fast generation)."""
        self._int8 = None

    def _forward_parallel(self, codes, mem: Memory, stage: int, heads, need, int8: bool) -> torch.Tensor:
        """MAGNeT's forward: the same function as `Layer.forward` (pre-norm), without the work that
        cannot change its result (see the module docstring)."""
        cfg, layers = self.cfg, self.transformer.layers
        R, D, H = mem.batch, cfg.dim, cfg.num_heads
        band = cfg.subcodes_context if stage > 0 and cfg.subcodes_context >= 0 else None
        x = self.embed(codes)                                                      # [b, T, D]
        T = x.shape[1]
        if x.shape[0] != R and R % x.shape[0]:
            raise ValueError(f"codes batch {x.shape[0]} does not divide the memory's {R} rows")
        acts = active_positions(None if need is None else need.to(torch.bool).cpu(), len(layers), band)
        n_heads = cfg.n_q if heads is None else len(heads)
        if acts[-1] is not None and acts[-1].numel() == 0:             # nothing needed
            return x.new_zeros((R, n_heads, 0, cfg.card))
        if acts[0] is not None:
            x = x[:, acts[0].to(x.device)]
        int8s = self.int8_linears().layers if int8 else None
        mask = None
        if band is not None and x.device.type != "cpu" and acts[0] is None:
            mask = self.attn_mask(stage, T, x.device)                  # CUDA: SDPA with a boolean band mask
        for i, layer in enumerate(layers):
            pos_in, pos_out = acts[i], acts[i + 1]
            sel = None
            if pos_out is not None:        # rows of this layer's input that it must output
                sel = pos_out if pos_in is None else torch.searchsorted(pos_in, pos_out)
                sel = sel.to(x.device)
            lin = int8s[i] if int8s is not None else _ExactLinears(layer, pos_in is not None, sel is not None)
            # self-attention (rows that share their codes share it in the first layer)
            h = F.layer_norm(x, (D,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
            if band is None and sel is not None and lin.split:   # full attention: keys everywhere, queries where needed
                kv = lin.kv(h)
                q = lin.q(h.index_select(1, sel))
                k, v = kv.view(*kv.shape[:2], 2, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
                a = F.scaled_dot_product_attention(q.view(*q.shape[:2], H, -1).transpose(1, 2), k, v)
            else:
                qkv = lin.qkv(h)
                q, k, v = qkv.view(*qkv.shape[:2], 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
                if band is None:
                    a = F.scaled_dot_product_attention(q, k, v)
                elif mask is not None and pos_in is None:
                    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                else:
                    a = band_attention(q, k, v, band, pos_in)
                if sel is not None:
                    a = a.index_select(2, sel)
            res = x if sel is None else x.index_select(1, sel)
            x = res + lin.out(a.transpose(1, 2).reshape(res.shape))
            if x.shape[0] != R:
                x = x.repeat(R // x.shape[0], 1, 1)
            # cross-attention to the text (rows with a memory only: the others add exactly zero)
            rows = mem.rows
            xr = x if rows == R else x[:rows]
            h = F.layer_norm(xr, (D,), layer.norm_cross.weight, layer.norm_cross.bias, layer.norm_cross.eps)
            mk, mv = mem.kv[i]
            q = lin.cq(h)
            a = F.scaled_dot_product_attention(q.view(*q.shape[:2], H, -1).transpose(1, 2), mk, mv)
            xr += lin.cout(a.transpose(1, 2).reshape(xr.shape))
            # feed-forward
            h = F.layer_norm(x, (D,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
            x += lin.fc2(torch.ops.aten.gelu_(lin.fc1(h)))
        x = F.layer_norm(x, (D,), self.out_norm.weight, self.out_norm.bias, self.out_norm.eps)
        heads = range(cfg.n_q) if heads is None else heads
        head = _plain_linear if acts[-1] is not None else linear
        return torch.stack([head(x, self.linears[k].weight, self.linears[k].bias) for k in heads], dim=1)


def _plain_linear(x, w, b):
    return F.linear(x, w, b)


class _ExactLinears:
    """One layer's linear maps on its own weights (fp32 on the CPU through oneDNN, see `linear`).

    `pruned_in` / `pruned_out`: the layer's input / output rows are a subset of the positions, whose
    count varies from step to step; the maps on those rows then use F.linear: oneDNN keeps a compiled
    kernel per shape in a cache of up to 1024, and hundreds of shapes would cost hundreds of MB (pruned
    rows are a small part of the work)."""
    __slots__ = ("sa", "ca", "l1", "l2", "dim", "f_in", "f")
    split = True             # q and k/v can be projected separately (slices of the packed weight)

    def __init__(self, layer: Layer, pruned_in: bool = False, pruned_out: bool = False):
        self.sa, self.ca, self.l1, self.l2 = layer.self_attn, layer.cross_attention, layer.linear1, layer.linear2
        self.dim = self.sa.in_proj_weight.shape[1]
        self.f_in = _plain_linear if pruned_in else linear                 # on the input rows (q/k/v, k/v)
        self.f = _plain_linear if pruned_in or pruned_out else linear      # on the output rows

    def qkv(self, x):
        return self.f_in(x, self.sa.in_proj_weight, self.sa.in_proj_bias)

    def q(self, x):
        b = self.sa.in_proj_bias
        return self.f(x, self.sa.in_proj_weight[:self.dim], None if b is None else b[:self.dim])

    def kv(self, x):
        b = self.sa.in_proj_bias
        return self.f_in(x, self.sa.in_proj_weight[self.dim:], None if b is None else b[self.dim:])

    def out(self, x):
        return self.f(x, self.sa.out_proj.weight, self.sa.out_proj.bias)

    def cq(self, x):
        b = self.ca.in_proj_bias
        return self.f(x, self.ca.in_proj_weight[:self.dim], None if b is None else b[:self.dim])

    def cout(self, x):
        return self.f(x, self.ca.out_proj.weight, self.ca.out_proj.bias)

    def fc1(self, x):
        return self.f(x, self.l1.weight, self.l1.bias)

    def fc2(self, x):
        return self.f(x, self.l2.weight, self.l2.bias)


class _Int8Layer:
    """One layer's linear maps on int8 copies of its weights."""
    split = False            # one packed q/k/v copy only

    def __init__(self, layer: Layer):
        sa, ca = layer.self_attn, layer.cross_attention
        d = sa.in_proj_weight.shape[1]
        self.qkv = Int8Linear(sa.in_proj_weight, sa.in_proj_bias)
        self.out = Int8Linear(sa.out_proj.weight, sa.out_proj.bias)
        self.cq = Int8Linear(ca.in_proj_weight[:d], None if ca.in_proj_bias is None else ca.in_proj_bias[:d])
        self.cout = Int8Linear(ca.out_proj.weight, ca.out_proj.bias)
        self.fc1 = Int8Linear(layer.linear1.weight, layer.linear1.bias)
        self.fc2 = Int8Linear(layer.linear2.weight, layer.linear2.bias)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, n).nbytes for n in ("qkv", "out", "cq", "cout", "fc1", "fc2"))


class Int8Linears:
    """Int8 copies of every transformer layer's linear maps (fast mode, CPU). Embeddings, norms, the
    output heads and the text projection stay fp32; the fp32 LM is not modified."""

    def __init__(self, lm: LM):
        self.layers = [_Int8Layer(layer) for layer in lm.transformer.layers]
        self._key = self._fingerprint(lm)

    @staticmethod
    def _fingerprint(lm: LM):
        w = lm.transformer.layers[0].linear1.weight
        # weights made under inference_mode (ComfyUI runs nodes in it) have no version counter
        return (w.device, w.dtype, w.data_ptr(), None if w.is_inference() else w._version)

    def matches(self, lm: LM) -> bool:
        return self._key == self._fingerprint(lm)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def init_random(lm: LM, seed: int = 0) -> LM:
    """Random weights of the right scale, for benchmarks and tests (no download)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / math.sqrt(p.shape[-1])))
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return lm
