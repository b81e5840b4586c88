"""An in-memory batch loader with the same protocol as `engine.data.loader.CachedBatchLoader`.

For benchmarks, tests and graphs that hand latents over directly: a fixed list of batches, shuffled per epoch with
a permutation that depends only on (seed, epoch), and a saveable position (epoch, index).
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..errors import invalid


class InMemoryBatchLoader:
    def __init__(self, batches: list[dict], seed: int = 0, shuffle: bool = True):
        if not batches:
            raise invalid("training batches", [], "at least one batch")
        self.batches, self.seed, self.shuffle = list(batches), int(seed), shuffle
        self.epoch, self.index = 0, 0

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.batches)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.batches), generator=g).tolist()

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict]:
        order = self.order(self.epoch)
        while self.index < len(order):
            batch = self.batches[order[self.index]]
            self.index += 1  # advanced before yielding, like CachedBatchLoader
            yield batch
        self.epoch, self.index = self.epoch + 1, 0

    def batch_at(self, epoch: int, index: int) -> dict:
        return self.batches[self.order(epoch)[index]]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise invalid("loader state seed", state.get("seed"), f"{self.seed} (resume with the same seed)")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
