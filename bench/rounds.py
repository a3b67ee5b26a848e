"""Several ways of doing one thing, timed round by round in shuffled orders."""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable


async def interleaved(
    ways: dict[str, Callable[[], Awaitable[object]]], rounds: int, rng: random.Random | None = None
) -> dict[str, list[float]]:
    """Each round, every way once in a shuffled order; the seconds each call
    took, per way. Interleaving spreads the machine's drift over every way alike."""
    shuffle = (rng or random).shuffle
    samples: dict[str, list[float]] = {name: [] for name in ways}
    order = list(ways)
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            start = time.perf_counter()
            await ways[name]()
            samples[name].append(time.perf_counter() - start)
    return samples
