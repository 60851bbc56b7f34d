"""An endless, epoch-shuffled stream of example indices whose position can be saved and restored.

The order of epoch e is a permutation drawn from a generator seeded with (seed, e), so the
stream's whole state is two integers: resuming rebuilds the same permutation and skips to the
saved offset, and the resumed run sees exactly the examples the uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class IndexStream:
    def __init__(
        self, size: int, *, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1
    ):
        if size <= 0:
            raise ValueError("IndexStream needs at least one example")
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.offset = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def take(self, n: int) -> list[int]:
        """The next n indices of this rank. All ranks advance through the same global order,
        each taking every world_size-th index, so no example is duplicated or dropped."""
        out = []
        for _ in range(n * self.world_size):
            if self.offset == self.size:
                self.epoch += 1
                self.offset = 0
                self._order = self._permutation(self.epoch)
            out.append(self._order[self.offset])
            self.offset += 1
        return out[self.rank :: self.world_size]

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.offset / self.size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = state["epoch"]
        self.offset = state["offset"]
        self._order = self._permutation(self.epoch)


def length_sorted(indices: list[int], size: int, key: Callable[[int], Any]) -> list[list[int]]:
    """`indices` in micro-batches of `size`, ordered by `key` (a length), so that each
    micro-batch pads to a width close to its own rows'. Every loss here is a sum over examples
    divided by a step-level count, so regrouping a step's examples leaves its gradient as it is:
    the padding saved is free."""
    order = sorted(indices, key=key)
    return [order[s : s + size] for s in range(0, len(order), size)]
