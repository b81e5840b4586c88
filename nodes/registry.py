"""Pack-owned registry of heavy objects (loaded models, training sessions).

ComfyUI caches node outputs, but newer versions evict them under RAM pressure and re-run the node. Loader nodes
therefore fetch models through this registry, keyed by what identifies the model (file, size, mtime, dtype...):
a re-run returns the object already in memory instead of loading a second copy, and re-queueing a finished graph
neither reloads the model nor stacks adapters on it. The Unload Models node releases entries explicitly.
"""

from __future__ import annotations

import gc
import threading
from typing import Any, Callable, Hashable

import torch


class Registry:
    def __init__(self):
        self._items: dict[Hashable, Any] = {}
        self._lock = threading.Lock()

    def get_or_create(self, key: Hashable, create: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                return self._items[key]
        value = create()
        with self._lock:
            return self._items.setdefault(key, value)

    def get(self, key: Hashable, default=None):
        return self._items.get(key, default)

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._items[key] = value

    def keys(self) -> list[Hashable]:
        return list(self._items)

    def values(self) -> list[Any]:
        return list(self._items.values())

    def release(self, predicate: Callable[[Hashable], bool] | None = None) -> int:
        """Drop entries (all, or those whose key matches). Returns how many were dropped."""
        with self._lock:
            doomed = [k for k in self._items if predicate is None or predicate(k)]
            for k in doomed:
                del self._items[k]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            from ..engine.memory import release_pinned_cache
            release_pinned_cache()   # pinned blocks of freed offload copies / swap masters back to the OS
        return len(doomed)


MODELS = Registry()     # loaded DiT / VAE / encoders, keyed by (kind, file identity, options)
SESSIONS = Registry()   # training sessions, keyed by (node id, inputs)
