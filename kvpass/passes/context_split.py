"""A context's KV split over the ranks of a process group (option ``distribute="context"``).

Infinite-LLM's DistAttention (Lin et al., "Infinite-LLM: Efficient LLM Service for Long Context with DistAttention
and Distributed KVCache", arXiv:2401.02669): a layer's KV lives in pieces on several devices, each device computes
the attention of the (replicated) queries over its own piece, and the partial results are merged. Here every rank
runs the same model on the same tokens; a token's keys and values are *kept* only by the rank that owns its
position, so each rank's fixed-capacity store holds ``1/N`` of the context, and attention over the whole context is
``kvpass::attend_part`` over the rank's own slots, an all-gather of (output, log-sum-exp) as a functional collective
in the compiled graph, and ``kvpass::merge_parts`` (exact: the log-sum-exp rescaling).

Placement: positions are dealt round-robin in runs of ``placement_block`` tokens, rank ``(p // block) % N`` owning
position ``p`` (1: one token at a time, which balances the ranks' stores to within one token). The rule needs no
communication and is the same for prefill and decode tokens; a rank evicts only within its own store.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from kvpass.analysis import UnsupportedGraph


@dataclasses.dataclass(frozen=True)
class ContextSplit:
    """This rank's share of a split context: who it is, in which group, and the placement rule."""

    rank: int
    world: int
    group_name: str
    placement_block: int

    @classmethod
    def of_default_group(cls, placement_block: int) -> ContextSplit:
        """The split over torch.distributed's default group, which must be initialized."""
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise UnsupportedGraph(
                "kvpass: option 'distribute'='context' splits the KV over the ranks of torch.distributed's default "
                "process group, but none is initialized in this process; call torch.distributed.init_process_group() "
                "(gloo on CPU, nccl on GPU) in every rank before the first forward, and launch with torchrun")
        group = dist.group.WORLD
        return cls(dist.get_rank(), dist.get_world_size(), group.group_name, placement_block)

    def share(self, total: int) -> int:
        """Slots of this rank's store for a context budget of ``total`` tokens: enough for its placement runs of any
        ``total``-token context, so a budget that covers the context evicts nothing on any rank."""
        run = self.placement_block * self.world
        return -(-total // run) * self.placement_block

    def owned_positions(self, graph: fx.Graph, pos: fx.Node) -> fx.Node:
        """``pos`` with the slots this rank does not own set to -1 (empty: never attended, evicted first)."""
        g = graph.call_function
        owner = g(operator.mod, (g(operator.floordiv, (pos, self.placement_block)), self.world))
        return g(torch.where, (g(operator.eq, (owner, self.rank)), pos, -1))

    def all_gather(self, graph: fx.Graph, x: fx.Node) -> fx.Node:
        """``[N, *x.shape]``: every rank's ``x``, in rank order (a functional all-gather and its wait, in the graph)."""
        g = graph.call_function
        gathered = g(torch.ops._c10d_functional.all_gather_into_tensor.default, (x, self.world, self.group_name))
        gathered = g(torch.ops._c10d_functional.wait_tensor.default, (gathered,))
        return g(torch.unflatten, (gathered, 0, (self.world, -1)))
