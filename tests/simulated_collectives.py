"""In-process stand-ins for several ranks, to test the losses' collective paths.

``run_threaded_ranks`` runs one thread per rank, and the threads exchange arrays
through a barrier. All ranks share one process, so with PyTorch every rank's loss
sits in one autograd graph that reaches every rank's inputs. In a real
data-parallel run, each collective's backward pass sums the upstream gradients of
all ranks. Calling backward on the sum of the ranks' losses takes the same sum
through the shared graph, so each input receives the gradient that the real run
gives it.

``VmapCollective`` maps ranks onto a ``jax.vmap`` axis and uses JAX's named-axis
collectives, so the rank is a traced 0-D array as under ``shard_map``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

_BARRIER_TIMEOUT_SECONDS = 60.0


class ThreadGroup:
    """Slots and a barrier shared by the threads that stand for the ranks."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.slots: list[Any] = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=_BARRIER_TIMEOUT_SECONDS)

    def exchange(self, rank: int, x: Any) -> list[Any]:
        """Publish ``x`` for ``rank`` and return every rank's array, in rank order."""
        self.slots[rank] = x
        self.barrier.wait()
        values = list(self.slots)
        # A second barrier stops a fast rank from overwriting its slot with its next
        # call's array before a slow rank has read this one.
        self.barrier.wait()
        return values


class ThreadedCollective:
    """The collective of one rank of a :class:`ThreadGroup`."""

    def __init__(self, xp: Any, group: ThreadGroup, rank: int) -> None:
        self._xp = xp
        self._group = group
        self.world_size = group.world_size
        self.rank = rank

    def all_gather(self, x: Any) -> Any:
        return self._xp.concat(self._group.exchange(self.rank, x), axis=0)

    def all_reduce_sum(self, x: Any) -> Any:
        values = self._group.exchange(self.rank, x)
        total = values[0]
        for value in values[1:]:
            total = total + value
        return total


def run_threaded_ranks(
    xp: Any,
    loss: Callable[..., Any],
    shards: Sequence[Sequence[Any]],
    **kwargs: Any,
) -> list[Any]:
    """Return ``loss(*shards[r], collective=..., **kwargs)`` for every rank ``r``.

    ``shards[r]`` contains rank ``r``'s positional arguments. Each rank runs in its own
    thread with a :class:`ThreadedCollective`.
    """
    world_size = len(shards)
    group = ThreadGroup(world_size)

    def run_rank(rank: int) -> Any:
        collective = ThreadedCollective(xp, group, rank)
        return loss(*shards[rank], collective=collective, **kwargs)

    with ThreadPoolExecutor(max_workers=world_size) as pool:
        futures = [pool.submit(run_rank, rank) for rank in range(world_size)]
        return [future.result() for future in futures]


class VmapCollective:
    """The collective of the rank that ``jax.vmap(..., axis_name=...)`` is mapping."""

    def __init__(self, axis_name: str, world_size: int) -> None:
        self._axis_name = axis_name
        self.world_size = world_size

    @property
    def rank(self) -> Any:
        import jax

        return jax.lax.axis_index(self._axis_name)

    def all_gather(self, x: Any) -> Any:
        import jax

        return jax.lax.all_gather(x, self._axis_name, tiled=True)

    def all_reduce_sum(self, x: Any) -> Any:
        import jax

        return jax.lax.psum(x, self._axis_name)
