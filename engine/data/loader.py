"""Batches of cached samples for the trainer: bucketed, repeated, deterministically shuffled, resumable.

Epoch e's order depends only on (seed, e): per dataset, samples are repeated `num_repeats` times, grouped by bucket
(W, H, T) so every batch stacks, shuffled within each bucket and cut into batches of the dataset's `batch_size`
(the last batch of a bucket may be smaller); then all batches of all datasets are shuffled together. The position
(epoch, index of the next batch) is saved with `state_dict()` and restored with `load_state_dict()`, so a resumed
run sees exactly the batches an uninterrupted run would have.

Batch keys are the family's (`Family.collate`): at least `latents` [B, C, F, H, W] and the text embeddings; plus
`keys` (list of item keys) and `bucket` (W, H, T). Tensors keep the cache dtype; the trainer casts.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..errors import invalid
from .cache import CachedDataset, CachedSample


class CachedBatchLoader:
    def __init__(self, datasets: list[CachedDataset], seed: int = 0, shuffle: bool = True):
        if not datasets:
            raise invalid("training datasets", [], "at least one cached dataset")
        self.datasets, self.seed, self.shuffle = datasets, int(seed), shuffle
        self.epoch, self.index = 0, 0
        self._plan_epoch: int | None = None
        self._plan: list[tuple[int, list[CachedSample]]] = []

    def epoch_batches(self, epoch: int) -> list[tuple[int, list[CachedSample]]]:
        """The (dataset index, samples) batches of `epoch`, in order."""
        rng = np.random.default_rng([self.seed, epoch])
        batches: list[tuple[int, list[CachedSample]]] = []
        for d, ds in enumerate(self.datasets):
            by_bucket: dict[tuple, list[CachedSample]] = {}
            for s in ds.samples * ds.num_repeats:
                by_bucket.setdefault(tuple(s.bucket), []).append(s)
            for bucket in sorted(by_bucket):
                group = by_bucket[bucket]
                order = rng.permutation(len(group)) if self.shuffle else range(len(group))
                group = [group[i] for i in order]
                batches.extend((d, group[i:i + ds.batch_size]) for i in range(0, len(group), ds.batch_size))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self._batches(self.epoch))

    def _batches(self, epoch: int):
        if self._plan_epoch != epoch:
            self._plan, self._plan_epoch = self.epoch_batches(epoch), epoch
        return self._plan

    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch (from the saved position); afterwards the position is the next epoch."""
        batches = self._batches(self.epoch)
        while self.index < len(batches):
            d, samples = batches[self.index]
            batch = self.load_batch(self.datasets[d], samples)
            self.index += 1  # advanced before yielding: a state saved after this step resumes at the next batch
            yield batch
        self.epoch, self.index = self.epoch + 1, 0

    def batch_at(self, epoch: int, index: int) -> dict:
        """Batch `index` of `epoch` alone (a data-parallel rank reads only its share), the position unchanged."""
        d, samples = self._batches(epoch)[index]
        return self.load_batch(self.datasets[d], samples)

    @staticmethod
    def load_batch(ds: CachedDataset, samples: list[CachedSample]) -> dict:
        batch = ds.collate([s.load() for s in samples])
        batch["keys"] = [s.key for s in samples]
        batch["bucket"] = tuple(samples[0].bucket)
        return batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise invalid("loader state seed", state.get("seed"), f"{self.seed} (resume with the same seed)")
        epoch, index = int(state["epoch"]), int(state["index"])
        if index < 0 or index > len(self._batches(epoch)):
            raise invalid("loader state index", index, f"0..{len(self._batches(epoch))} (the dataset changed?)")
        self.epoch, self.index = epoch, index
