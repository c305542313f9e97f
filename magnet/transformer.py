"""The language model shared by MAGNeT and MusicGen: a transformer over summed codebook embeddings.

Input = sum over codebooks of `emb[k](codes[:, k])` + sinusoidal positions; pre-norm layers of
self-attention, cross-attention to the text memory and a GELU feed-forward; `out_norm`; one linear
head per codebook. Parameter names follow the official checkpoints (`transformer.layers.N.*`), so a
release loads without renaming (only the text projection moves to `text_proj`).

MAGNeT attends fully for codebook 0 and within a band of `subcodes_context` frames for codebooks >= 1;
MusicGen is causal and decodes frame by frame with a key/value cache (`KVCache`).

`LM.forward` / `Layer.forward` are the specification of the model, for both: MusicGen runs them (causal,
optionally cached); MAGNeT's decoding loop hands `LM.forward` a plan (`plan=`, a
`magnet.stage_forward.StepPlan`) that computes the same logits with less work and is tested against them.
This module imports nothing of the decoding loop's: the plan is an object it is given and calls.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import lowp


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
    """Boolean [T, T], True where |query - key| <= context: the attention of MAGNeT's stages >= 1."""
    pos = torch.arange(T, device=device)
    return (pos.view(-1, 1) - pos.view(1, -1)).abs() <= context


def additive_band_mask(T: int, context: int, device, dtype) -> torch.Tensor:
    """The band as an additive attention mask [T, T] of `dtype` (0 inside, -inf outside), the form SDPA
    uses internally. Its rows are stored padded to a multiple of 16 elements and sliced to T: attention
    kernels that need aligned rows (the memory-efficient one) then use it as it is instead of padding a
    copy on every call."""
    width = -(-T // 16) * 16
    storage = torch.full((T, width), float("-inf"), device=device, dtype=dtype)
    storage[:, :T].masked_fill_(band_mask(T, context, device), 0.0)
    return storage[:, :T]


def activation_dtype(device, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a linear layer's output on `device` with weights of `weight_dtype`: autocast's where
    it is on for that device."""
    kind = torch.device(device).type
    try:
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    except (TypeError, AttributeError, RuntimeError):      # torch < 2.4: only CUDA and CPU have autocast
        if kind == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if kind == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
    return weight_dtype


class Norm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the weights' dtype, returning the weights' dtype (the input of
    the next linear layer). With half-precision weights the residual stream stays float32 (see `LM`):
    its values grow layer after layer and pass fp16's largest value (65504) in long models."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        return F.layer_norm(x.float(), self.normalized_shape, w.float(), None if b is None else b.float(),
                            self.eps).to(w.dtype)


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
    """Multi-head attention with packed q/k/v weights, saved and loaded as in the checkpoints
    (`in_proj_weight`, `in_proj_bias`, `out_proj.*`).

    The packed projection is a child module (`in_proj`) rather than a direct parameter, so that every
    module holding weights is a leaf: memory managers that move a model module by module (ComfyUI's
    partial loads move only leaf modules with direct parameters) then move all of it. `state_dict` and
    `load_state_dict` use the checkpoints' names (see `official_name`)."""

    def __init__(self, dim: int, num_heads: int, bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj = nn.Linear(dim, 3 * dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self._register_state_dict_hook(_save_official_names)
        self._register_load_state_dict_pre_hook(_load_official_names)

    @property
    def in_proj_weight(self) -> torch.Tensor:
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        return self.in_proj.bias

    def _heads(self, x):  # [B, T, H*D] -> [B, H, T, D]
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, -1).transpose(1, 2)

    def project(self, x, lo: int = 0, hi: int | None = None):
        """Rows lo:hi of the packed q/k/v projection applied to `x` (all of it by default). A projection with
        its own `rows` (a LoRA layer in training) computes them itself, in factored form."""
        rows = getattr(self.in_proj, "rows", None)
        if rows is not None:
            return rows(x, lo, hi)
        w, b = self.in_proj_weight, self.in_proj_bias
        if lo == 0 and hi is None:
            return F.linear(x, w, b)
        return F.linear(x, w[lo:hi], None if b is None else b[lo:hi])

    def _merge(self, x):  # [B, H, T, D] -> [B, T, H*D]
        B, H, T, D = x.shape
        return x.transpose(1, 2).reshape(B, T, H * D)

    def forward(self, x, mask=None, cache: KVCache | None = None, layer: int = 0, causal: bool = False):
        """Self-attention. `mask`: [T, T], boolean (True = attend) or additive, or None (full, or causal if
        `causal`)."""
        q, k, v = self.project(x).chunk(3, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if cache is not None:
            k, v = cache.append(layer, k, v)
            # with a cache, the new frame attends to everything cached so far: no mask needed for one frame
            causal = causal and q.shape[2] > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.out_proj(self._merge(out))

    def memory_kv(self, memory):
        """Keys and values of the cross-attention memory, computed once per generation."""
        dim = self.in_proj.in_features
        return self._heads(self.project(memory, dim, 2 * dim)), self._heads(self.project(memory, 2 * dim, 3 * dim))

    def cross(self, x, k, v):
        """Cross-attention of `x` to precomputed memory keys/values. No padding mask: padded memory
        positions are zero vectors that still take part in the softmax, as in the reference."""
        q = self._heads(self.project(x, 0, self.in_proj.in_features))
        return self.out_proj(self._merge(F.scaled_dot_product_attention(q, k, v)))


_OFFICIAL = {"in_proj.weight": "in_proj_weight", "in_proj.bias": "in_proj_bias"}


def official_name(name: str) -> str:
    """A parameter's name in the checkpoints (`...self_attn.in_proj_weight`) from its name in the module
    tree (`...self_attn.in_proj.weight`); other names are the same in both."""
    for inner, outer in _OFFICIAL.items():
        if name == inner or name.endswith("." + inner):
            return name[: len(name) - len(inner)] + outer
    return name


def _save_official_names(module, state_dict, prefix, local_metadata):
    for inner, outer in _OFFICIAL.items():
        if prefix + inner in state_dict:
            state_dict[prefix + outer] = state_dict.pop(prefix + inner)


def _load_official_names(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for inner, outer in _OFFICIAL.items():
        if prefix + outer in state_dict:
            state_dict[prefix + inner] = state_dict.pop(prefix + outer)


class Layer(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.norm_first = cfg.norm_first
        self.self_attn = Attention(cfg.dim, cfg.num_heads, cfg.bias_attn)
        self.cross_attention = Attention(cfg.dim, cfg.num_heads, cfg.bias_attn)
        self.linear1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.bias_ff)
        self.linear2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.bias_ff)
        self.norm1 = Norm(cfg.dim, eps=1e-5)
        self.norm_cross = Norm(cfg.dim, eps=1e-5)
        self.norm2 = Norm(cfg.dim, eps=1e-5)

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
        x = x.to(self.norm1.weight.dtype)     # post-norm: every layer's output is normalised, no growth
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
        self.out_norm = Norm(cfg.dim, eps=1e-5) if cfg.norm_first else None
        self.linears = nn.ModuleList(nn.Linear(cfg.dim, cfg.card, bias=cfg.bias_proj) for _ in range(cfg.n_q))
        self._masks: dict = {}

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
    def attn_mask(self, stage: int, T: int, device, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """Self-attention mask for a MAGNeT stage: None (full) for codebook 0, the band otherwise, as an
        additive mask of `dtype` (the attention's dtype). Made once per (length, device, dtype) and kept:
        every layer of every step of a generation uses the same one. The oldest of more than 8 is dropped
        (a captured CUDA graph uses its stage's mask, which is the newest while the stage runs)."""
        if self.cfg.causal or stage <= 0 or self.cfg.subcodes_context < 0:
            return None
        key = (T, str(device), dtype)
        mask = self._masks.get(key)
        if mask is None:
            while len(self._masks) >= 8:
                self._masks.pop(next(iter(self._masks)))
            mask = self._masks[key] = additive_band_mask(T, self.cfg.subcodes_context, device, dtype)
        return mask

    def embed(self, codes: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """codes [B, K, T] -> summed embeddings + positions [B, T, dim], float32 whatever the weights' dtype:
        the residual stream. Each layer's sublayers compute in the weights' dtype (autocast's on CUDA) and
        add their output to it in float32; the norms read it in float32 (`Norm`)."""
        x = self.emb[0](codes[:, 0]).float()
        for k in range(1, codes.shape[1]):
            x = x + self.emb[k](codes[:, k])
        return x + sin_embedding(codes.shape[-1], self.cfg.dim, self.cfg.max_period, x.device, x.dtype, offset)

    def forward(self, codes: torch.Tensor, mem: Memory, stage: int = -1, heads=None,
                cache: KVCache | None = None, *, plan=None) -> torch.Tensor:
        """codes [b, K, T] -> logits [B, len(heads), T, card] (all codebooks when `heads` is None).

        `b` may be smaller than the memory's batch B when B is a multiple of b: the codes are then
        shared by every group of b rows (classifier-free guidance runs the same codes with the
        conditional and the null memory).

        This is the specification. `plan` (a `magnet.stage_forward.StepPlan`, given by the decoding loop for
        MAGNeT's pre-norm non-causal LM) computes the same logits with less work (and, in fast mode, bf16 or
        int8 layers): `plan.run(lm, codes, mem, stage, heads)` is called under the weights' lock.
        """
        with lowp.cpu_lock(self.linears[0].weight.device):    # no weight swap while this forward reads them
            if lowp.held() and not getattr(plan, "linears", None):
                lowp.restore(self)             # fast mode's float16 records -> the exact float32 weights
            if plan is not None:
                return plan.run(self, codes, mem, stage, heads)
            return self._forward(codes, mem, stage, heads, cache)

    def _forward(self, codes, mem, stage, heads, cache):
        x = self.embed(codes, offset=cache.length if cache is not None else 0)
        if x.shape[0] != mem.batch:
            x = x.repeat(mem.batch // x.shape[0], 1, 1)
        mask = self.attn_mask(stage, x.shape[1], x.device, activation_dtype(x.device, self.linears[0].weight.dtype))
        for layer in self.transformer.layers:
            x = layer(x, mem, mask, cache, self.cfg.causal)
        if cache is not None:
            cache.length += codes.shape[-1]
        x = self.out_norm(x) if self.out_norm is not None else x.to(self.linears[0].weight.dtype)
        heads = range(self.cfg.n_q) if heads is None else heads
        return torch.stack([self.linears[k](x) for k in heads], dim=1)
