"""Writing files safely: atomically (a temporary name in the same folder, then os.replace, so a reader or a
cancel never sees a half-written file) and with the permissions the user's umask gives (safetensors creates its
files readable by their owner only)."""
from __future__ import annotations

import os
import threading
from pathlib import Path

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask (from /proc where it is shown, else by setting and restoring it under a lock)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def temporary_name(path: Path) -> Path:
    """A hidden temporary name beside `path`, unique to this process and thread."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")


def save_safetensors(path: str | Path, tensors: dict, metadata: dict | None = None, *,
                     tmp: str | Path | None = None) -> Path:
    """Write a safetensors file atomically (through `tmp`, default `temporary_name(path)`), with the mode a new
    file gets under the umask (0666 & ~umask)."""
    from safetensors.torch import save_file
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else temporary_name(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
