"""One model cache for every front-end: the same file loaded twice is one object in memory.

Entries are keyed by what identifies a loaded model (kind, resolved path, file size and mtime, device,
dtype). An *owner* (e.g. a loader node) holds one entry at a time: when it switches to another file its
old entry is released, and an entry no owner holds any more is dropped.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Hashable


def file_key(path: str | Path) -> tuple:
    """Identity of a file or folder on disk: resolved path + size and mtime of what it holds."""
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        stamp = tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir() if f.is_file()))
    elif p.exists():
        st = p.stat()
        stamp = (st.st_size, st.st_mtime_ns)
    else:
        stamp = ()
    return (str(p), stamp)


class ModelCache:
    def __init__(self):
        self._lock = threading.RLock()
        self._items: dict[Hashable, Any] = {}
        self._owners: dict[Hashable, Hashable] = {}

    def get(self, key: Hashable, load: Callable[[], Any], owner: Hashable | None = None) -> Any:
        """The object for `key`, loaded with `load()` on first use. With an `owner`, that owner now holds
        `key` and releases whatever it held before."""
        with self._lock:
            if key not in self._items:
                if owner is not None:
                    self.release(owner)      # free the old model before loading the new one
                self._items[key] = load()
            if owner is not None:
                old = self._owners.get(owner)
                self._owners[owner] = key
                if old is not None and old != key:
                    self._drop_if_unowned(old)
            return self._items[key]

    def release(self, owner: Hashable):
        with self._lock:
            old = self._owners.pop(owner, None)
            if old is not None:
                self._drop_if_unowned(old)

    def _drop_if_unowned(self, key):
        if key not in self._owners.values():
            self._items.pop(key, None)

    def __contains__(self, key) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def clear(self):
        with self._lock:
            self._items.clear()
            self._owners.clear()


CACHE = ModelCache()
