"""Pack-owned registry of heavy objects (loaded models, training sessions).

ComfyUI caches node outputs, but newer versions evict them under RAM pressure and re-run the node. Loader nodes
therefore fetch models through this registry, keyed by what identifies the model (file, size, mtime, dtype...):
a re-run returns the object already in memory instead of loading a second copy, and re-queueing a finished graph
neither reloads the model nor stacks adapters on it. The Unload Models node releases entries explicitly.

Bounded: each loader node (the `owner`, its node id) holds exactly one current entry. When its inputs change (another
file, dtype, a replaced file), the entry it loaded before is released first (unless another node still uses it), so
the registry holds at most one model per loader node. A released entry is remembered only weakly: while something
else still holds it (a training session, ComfyUI's output cache) asking for the same key again returns that object
instead of loading a second copy; once nothing holds it, its memory is gone.

RAM-pressure caching (ComfyUI 0.38's default): ComfyUI may drop a loader's cached output and re-run the node; the
registry answers with the object already in memory, so the eviction never doubles RAM. ComfyUI cannot free what the
registry holds, so the registry does its part when RAM is short: before a loader loads a new model that does not fit
in the available RAM, the models owned by loader nodes that are not in the running prompt (another workflow's) are
released first (`make_room`).
"""

from __future__ import annotations

import gc
import threading
import weakref
from typing import Any, Callable, Hashable

import torch


class Registry:
    def __init__(self):
        self._items: dict[Hashable, Any] = {}
        self._owners: dict[Hashable, Hashable] = {}                  # owner (node) -> the key it uses now
        self._released: dict[Hashable, weakref.ReferenceType] = {}   # key -> a dropped value that may still live
        self._lock = threading.RLock()

    def get_or_create(self, key: Hashable, create: Callable[[], Any], owner: Hashable | None = None) -> Any:
        """The value for `key`, created once. With `owner`, the key `owner` used before is released first when it
        differs (and no other owner uses it): before `create()` runs, so the old copy can be freed before the new
        one is loaded."""
        dropped = False
        with self._lock:
            if owner is not None:
                previous = self._owners.get(owner)
                self._owners[owner] = key
                if previous is not None and previous != key:
                    dropped = self._drop_if_unowned(previous)
            value = self._items.get(key)
            if value is None:
                value = self._revive(key)
        if dropped:
            _collect()
        if value is not None:
            return value
        value = create()
        with self._lock:
            return self._items.setdefault(key, value)

    def _drop_if_unowned(self, key: Hashable) -> bool:
        if key in self._owners.values() or key not in self._items:
            return False
        value = self._items.pop(key)
        try:
            self._released[key] = weakref.ref(value)
        except TypeError:  # not weak-referenceable: simply gone
            pass
        del value
        return True

    def _revive(self, key: Hashable):
        ref = self._released.pop(key, None)
        value = ref() if ref is not None else None
        if value is not None:
            self._items[key] = value
        for k in [k for k, r in self._released.items() if r() is None]:
            del self._released[k]
        return value

    def make_room(self, need_bytes: int, keep_owners) -> int:
        """Under RAM pressure (less than `need_bytes` available), release the entries whose owners are not in
        `keep_owners` (loader nodes of the running prompt). Unowned entries are kept. Returns how many went."""
        if available_ram() >= need_bytes:
            return 0
        keep_owners = set(keep_owners)
        with self._lock:
            keep = {k for o, k in self._owners.items() if o in keep_owners}
            gone = {k for o, k in self._owners.items() if o not in keep_owners and k not in keep}
            self._owners = {o: k for o, k in self._owners.items() if o in keep_owners}
            dropped = sum(self._drop_if_unowned(k) for k in gone)
        if dropped:
            _collect()
        return dropped

    def live_released(self) -> int:
        """Released entries still alive because something else holds them (for tests and diagnostics)."""
        with self._lock:
            return sum(1 for r in self._released.values() if r() is not None)

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
            closing = [self._items[k] for k in doomed]
            for k in doomed:
                del self._items[k]
            self._owners = {o: k for o, k in self._owners.items() if k not in doomed}
            for k in [k for k in self._released if predicate is None or predicate(k)]:
                del self._released[k]
        for value in closing:   # a training session saves its unsaved steps before it goes
            close = getattr(value, "close", None)
            if callable(close):
                close()
        _collect()
        return len(doomed)


def available_ram() -> int:
    """Bytes of RAM available now (psutil is a ComfyUI dependency; without it, never under pressure)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - no psutil, or no /proc in a sandbox
        return 1 << 62


def _collect() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        from ..engine.memory import release_pinned_cache
        release_pinned_cache()   # pinned blocks of freed offload copies / swap masters back to the OS


MODELS = Registry()     # loaded DiT / VAE / encoders, keyed by (kind, file identity, options)
SESSIONS = Registry()   # training sessions, keyed by (node id, inputs)
