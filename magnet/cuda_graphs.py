"""Static buffers and CUDA graphs for MAGNeT's decoding steps.

Within a decoding stage every step has the same shapes and the same text memory; only the codes change. On
CUDA the stage's forward is captured once in a CUDA graph and replayed (`StaticStep`): one replay replaces
hundreds of kernel launches. A model's graphs (`GraphState`: whether they are on, which shapes passed their
check against the eager forward, the steps kept for reuse) live beside the model (`graph_state`). The
environment variable MAGNET_CUDA_GRAPHS=0 turns them off (`graphs_allowed_by_env`).

When a stage runs from a `StaticStep` is decided by `magnet.stage_forward.StageForward`.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import OrderedDict
from typing import Callable

import torch

log = logging.getLogger("magnet")

GRAPHS_ENV = "MAGNET_CUDA_GRAPHS"


def graphs_allowed_by_env() -> bool:
    """False when the environment variable MAGNET_CUDA_GRAPHS is 0 / false / off / no (read on every
    generation, so it can be set at any time)."""
    return os.environ.get(GRAPHS_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def graphs_wanted(settings) -> bool:
    """CUDA graphs are on in these decoding settings (`cuda_graphs`) and not switched off by $MAGNET_CUDA_GRAPHS."""
    return bool(getattr(settings, "cuda_graphs", False)) and graphs_allowed_by_env()


DOCTOR_HINT = "python -m magnet doctor --device cuda"

_held = threading.local()


def hold(t: torch.Tensor) -> None:
    """Record a tensor the forward reads but does not own (the cached band mask) while a `StaticStep` is
    being made: the step keeps it alive, since a captured graph reads it by address."""
    held = getattr(_held, "tensors", None)
    if held is not None:
        held.append(t)


class StaticStep:
    """One stage's forward on static buffers: `step(codes)` copies the codes (and, when the step is reused
    for a new text memory, the memory's keys and values) into its input buffers, replays the forward and
    returns its output buffer (valid until the next call).

    On CUDA (`graph=True`) the forward is captured once in a CUDA graph and replayed: within a stage every
    step has the same shapes and the same text memory, so only the codes change, and one replay replaces
    hundreds of kernel launches. `first` is the first step's codes: that step runs eagerly and doubles as
    the warm-up capture needs. Capture and replay run under the device's own context and streams (the
    model may be on another GPU than the current one), with `capture_begin`/`capture_end` on a side
    stream (no synchronize / garbage collection / cache flush per capture, as `torch.cuda.graph` does)
    and errors from other threads' CUDA calls left to them (`capture_error_mode="thread_local"`).

    With `graph=False` the forward is re-run eagerly into the same output buffer, which exercises the same
    bookkeeping on any device (the tests run it on the CPU)."""

    def __init__(self, forward: Callable[[torch.Tensor, object], torch.Tensor], first: torch.Tensor, mem,
                 graph: bool):
        self.forward, self.graph, self.mem = forward, None, mem
        self.codes = first.clone()
        self.error: Exception | None = None      # why the capture failed (`first` is still the first step's result)
        self.held: list = []
        _held.tensors = self.held
        try:
            if graph:
                dev = first.device
                with torch.cuda.device(dev):
                    side = torch.cuda.Stream(device=dev)
                    side.wait_stream(torch.cuda.current_stream(dev))
                    with torch.cuda.stream(side):
                        self.first = forward(self.codes, self.mem)     # warm-up = the first step's result
                    torch.cuda.current_stream(dev).wait_stream(side)
                    try:
                        self.out = self._capture(side)
                    except Exception as exc:     # out of memory, a CUDA call that cannot be captured, ...
                        self.error = exc
            else:
                self.first = forward(self.codes, self.mem)
                self.out = torch.empty_like(self.first)
        finally:
            _held.tensors = None

    def _capture(self, side) -> torch.Tensor:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side), _no_autocast_cache():
            try:
                g.capture_begin(capture_error_mode="thread_local")
            except TypeError:                                   # torch < 2.1
                g.capture_begin()
            try:
                out = self.forward(self.codes, self.mem)
            finally:
                g.capture_end()
        torch.cuda.current_stream(self.codes.device).wait_stream(side)
        self.graph = g
        return out

    def load(self, codes: torch.Tensor, mem=None) -> None:
        """Copy the inputs of the next replay into the static buffers (`mem`: a new memory of the same shapes)."""
        self.codes.copy_(codes)
        if mem is not None and mem is not self.mem:
            for (k, v), (nk, nv) in zip(self.mem.kv, mem.kv):
                k.copy_(nk)
                v.copy_(nv)

    def replay(self) -> torch.Tensor:
        if self.graph is not None:
            with torch.cuda.device(self.codes.device):
                self.graph.replay()
        else:
            self.out.copy_(self.forward(self.codes, self.mem))
        return self.out

    def __call__(self, codes: torch.Tensor, mem=None) -> torch.Tensor:
        self.load(codes, mem)
        return self.replay()


def _no_autocast_cache():
    """Autocast must not cache weight casts inside a graph capture (the cache dies with the context)."""
    try:
        enabled, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    except (TypeError, AttributeError):          # torch < 2.4
        enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
    return torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False)


class GraphState:
    """A model's CUDA graphs: whether they are on (`off`: why not), which shapes passed their check, and
    the last captured step of each stage, reused by the next window or generation of the same shapes
    while the model's weights have not moved (at most `keep` steps, the oldest dropped first; all of them,
    with the memory their graphs hold, at the first use after the weights moved)."""

    def __init__(self, keep: int = 8):
        self.off: str | None = None
        self.verified: set = set()
        self.steps: OrderedDict = OrderedDict()
        self.keep = keep

    def turn_off(self, why: str) -> None:
        if self.off is None:
            self.off = why
            self.steps.clear()
            log.warning("MAGNeT: CUDA graphs are now off for this model (%s); it runs eagerly, with the same "
                        "result. Run `%s` and include its output in a bug report; set %s=0 to skip graphs "
                        "from the start.", why, DOCTOR_HINT, GRAPHS_ENV)

    def get(self, key):
        weights = key[-1]
        if self.steps and next(reversed(self.steps))[-1] != weights:   # the model moved: every kept step is stale
            self.steps.clear()
        step = self.steps.get(key)
        if step is not None:
            self.steps.move_to_end(key)
        return step

    def put(self, key, step: StaticStep) -> None:
        self.steps[key] = step
        while len(self.steps) > self.keep:
            self.steps.popitem(last=False)


_graph_states: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def graph_state(model) -> GraphState:
    """The `GraphState` of a model (an LM module; for a wrapper such as the one that adds given codebooks,
    of the LM it wraps, `.lm`)."""
    owner = model if isinstance(model, torch.nn.Module) else getattr(model, "lm", model)
    state = _graph_states.get(owner)
    if state is None:
        state = _graph_states[owner] = GraphState()
    return state


def drop_graphs(model) -> None:
    """Free a model's kept CUDA graphs (they are captured again when needed)."""
    graph_state(model).steps.clear()


def same_logits(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether a replay's logits equal the eager forward's, up to the rounding of the dtype."""
    tol = 1e-4 if out.dtype == torch.float32 else 2e-2
    scale = max(1.0, float(ref.abs().amax())) if ref.numel() else 1.0
    return bool(out.shape == ref.shape and torch.isfinite(out).all() and (out - ref).abs().amax() <= tol * scale)
