"""Fast mode's one low-precision copy: the exact weights it replaces, kept losslessly and restored on demand.

Fast mode on the CPU runs the transformer's linear layers on a low-precision copy of their weights (bf16 or
int8, `magnet.linears`). Kept beside the float32 weights, that copy would make fast mode need more memory
than exact mode. Instead, while the copy exists, each float32 weight it replaces is held as a *record*: the
same parameter with its data in float16, where float16 holds every one of its values exactly (true of the
official releases, published in float16). A record is 2 bytes per weight instead of 4, so fast mode holds
  bf16 path: copy 2 + record 2 = 4 bytes per weight (exact mode: 4),
  int8 path: copy 1 + record 2 = 3 bytes per weight,
except the cross-attention's key/value rows, which stay float32 (each generation's text memory reads them).
A weight that float16 cannot hold exactly (a merged LoRA, a float32 fine-tune) stays float32 beside its copy.

Anything that needs the exact weights calls `restore` first (`LM.forward` outside fast mode's low-precision
plan, applying a LoRA, training, ComfyUI's weight patches): each record becomes float32 again, bit for bit the
weight it was (about 1 s per GiB of float32 weights), and the fast copy is dropped with it. So exact mode after
fast mode on the same loaded model is still exact; switching back and forth costs a restore and a new copy.

This module only knows parameters; which ones fast mode records is the business of `magnet.linears`. Swaps
and restores take one process-wide lock.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref

import torch

log = logging.getLogger("magnet")

_lock = threading.RLock()
# id(parameter) -> (weak reference to it, the dtype it had before it became a record). Keyed by id: tensors
# compare by value, so a WeakKeyDictionary of tensors cannot look them up.
_records: dict = {}
# callbacks run after a restore, with the module restored (magnet.linears drops its copy there)
_on_restore: list = []


def _get(p: torch.Tensor):
    entry = _records.get(id(p))
    return entry[1] if entry is not None and entry[0]() is p else None


def _pop(p: torch.Tensor):
    dtype = _get(p)
    if dtype is not None:
        del _records[id(p)]
    return dtype


def _forget(key: int, ref) -> None:
    entry = _records.get(key)
    if entry is not None and entry[0] is ref:
        del _records[key]


def lossless(w: torch.Tensor, chunk: int = 1 << 20) -> bool:
    """Whether float16 holds every value of the float32 tensor `w` exactly (finite values only). Checked a
    chunk at a time: no full-size temporaries."""
    if w.dtype != torch.float32:
        return False
    for part in w.detach().reshape(-1).split(chunk):
        h = part.half()
        if not (bool(torch.isfinite(h).all()) and torch.equal(h.float(), part)):
            return False
    return True


def release_freed_memory() -> None:
    """Hand the memory freed by a swap back to the system (glibc keeps freed blocks of a few MB in its heap,
    where they would count against the process as if still in use); a no-op elsewhere."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes
            import ctypes.util
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError, TypeError):
            _malloc_trim = False
    if _malloc_trim:
        with contextlib.suppress(Exception):
            _malloc_trim(0)


_malloc_trim = None


def record(p: torch.Tensor) -> bool:
    """Hold the float32 CPU parameter `p` as a float16 record if that is lossless; True if it now is one.
    The parameter object stays the same (its module, name and shape too); only its data changes."""
    with _lock:
        if _get(p) is not None:
            return True
        if not (isinstance(p, torch.nn.Parameter) and p.device.type == "cpu" and p.dtype == torch.float32):
            return False
        with torch.inference_mode(False), torch.no_grad():
            if not lossless(p):
                return False
            p.data = p.data.half()
        key = id(p)
        ref = weakref.ref(p, lambda r, key=key: _forget(key, r))
        _records[key] = (ref, torch.float32)
        return True


def is_record(p: torch.Tensor) -> bool:
    return _get(p) is not None


def exact_value(p: torch.Tensor) -> torch.Tensor:
    """The exact values of `p` in its original dtype (a new float32 tensor for a record, else `p` itself)."""
    dtype = _get(p)
    return p.detach() if dtype is None else p.detach().to(dtype)


def held() -> int:
    """How many parameters are records now (0: nothing to restore anywhere)."""
    return len(_records)


def restore(module: torch.nn.Module) -> int:
    """Make every record among `module`'s parameters its exact float32 weight again; returns the bytes
    restored (0 when there was nothing to do, which costs a dictionary check)."""
    if not _records:
        return 0
    return restore_params(module.parameters(), module)


def restore_params(params, module: torch.nn.Module | None = None) -> int:
    """`restore` for the given parameters only (e.g. the ones a weight patch is about to read); `module`, if
    given, is what the restore callbacks hear about."""
    if not _records:
        return 0
    with _lock:
        t0, n = time.perf_counter(), 0
        with torch.inference_mode(False), torch.no_grad():
            for p in params:
                dtype = _pop(p)
                if dtype is not None:
                    p.data = p.data.to(dtype)
                    n += p.numel() * p.element_size()
        if n:
            release_freed_memory()
            if module is not None:
                for fn in list(_on_restore):
                    fn(module)
            log.info("MAGNeT: exact weights restored from fast mode's float16 records (%.0f MB in %.1f s)",
                     n / 2 ** 20, time.perf_counter() - t0)
        return n


def cpu_lock(device):
    """The lock that makes weight swaps and their readers take turns, for a model on `device` (a no-op context
    off the CPU, where nothing is ever a record). `LM.forward` holds it for each forward on the CPU, training
    for its whole loop (its backward reads the weights after the forward): a fast generation in one thread
    cannot swap a weight an exact forward of the same weights reads in another."""
    return _lock if torch.device(device).type == "cpu" else contextlib.nullcontext()


def on_restore(fn) -> None:
    """Call fn(module) after every restore that changed something."""
    _on_restore.append(fn)
