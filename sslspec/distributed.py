"""Collective operations that let every loss compute a global-batch value.

A training job that splits each batch over several devices ("ranks") passes a
:class:`Collective` to the ``collective`` argument of a loss. Every loss then returns,
on every rank, the loss of the global batch, which is the concatenation of the local
batches in rank order. Its gradient with respect to the local inputs is
``world_size`` times the gradient of that global loss with respect to the same
slice. Data-parallel training averages gradients over ranks, so the averaged
gradient equals the gradient of a single-device step on the global batch.

That factor of ``world_size`` applies where each rank differentiates its own copy of
the loss, as under ``torch.distributed`` and under JAX's ``shard_map`` with
``check_vma=False``. Under ``shard_map`` with its default ``check_vma=True``, JAX
types the loss as replicated over ranks and seeds its gradient once, not
once per rank. ``jax.grad`` then gives the gradient of the global loss itself
with respect to the local inputs. With respect to replicated parameters it gives
the full single-device gradient, already summed over ranks. Averaging that gradient
over ranks again would be harmless, but multiplying or summing it would not.

All losses assume that every rank holds the same number of samples, so that the
global batch size is ``world_size`` times the local one.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["Collective"]


@runtime_checkable
class Collective(Protocol):
    """Communication between the ranks of a data-parallel job, implemented per backend.

    A backend provides an object with these four members. The losses call the
    methods in the same order on every rank, so an implementation may block until
    every rank has made the same call.

    Attributes
    ----------
    world_size : int
        Number of ranks, a Python int of at least 1.
    rank : int or array
        Index of this rank in ``[0, world_size)``. It is a Python int, or a 0-D
        integer array where the framework determines it only at run time, for
        example ``jax.lax.axis_index`` under ``jax.vmap``, ``jax.pmap`` or
        ``shard_map``.
    """

    world_size: int
    rank: Any

    def all_gather(self, x: Any) -> Any:
        """Concatenate ``x`` from every rank along axis 0, in rank order.

        Every rank passes an array of the same shape ``(n, ...)`` and receives
        ``(world_size * n, ...)``. The gradient with respect to the local ``x`` is
        the sum over ranks of the upstream gradient for this rank's slice.
        """
        ...

    def all_reduce_sum(self, x: Any) -> Any:
        """Sum ``x`` elementwise over all ranks.

        Every rank passes an array of the same shape and receives the sum. The
        gradient with respect to the local ``x`` is the sum over ranks of the
        upstream gradient.
        """
        ...


def _sum_over_ranks(x: Any, collective: Collective | None) -> Any:
    """Return ``x`` summed over ranks, or ``x`` itself without a collective."""
    if collective is None:
        return x
    return collective.all_reduce_sum(x)


def _mean_over_ranks(x: Any, collective: Collective | None) -> Any:
    """Return the mean of ``x`` over ranks, or ``x`` itself without a collective.

    With equal local batch sizes, the mean over ranks of a local batch mean is the
    global batch mean. Averaging means, rather than summing sums, keeps the
    intermediate values small enough for float16.
    """
    if collective is None:
        return x
    return collective.all_reduce_sum(x) / collective.world_size
