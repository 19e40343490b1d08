"""A context's KV split over the ranks of a process group (option ``distribute="context"``).

Infinite-LLM's DistAttention (Lin et al., "Infinite-LLM: Efficient LLM Service for Long Context with DistAttention
and Distributed KVCache", arXiv:2401.02669): a layer's KV lives in pieces on several devices, each device computes
the attention of the (replicated) queries over its own piece, and the partial results are merged. Here every rank
runs the same model on the same tokens; a token's keys and values are *kept* only by the rank that owns its
position, so each rank's fixed-capacity store holds its share of the context, and attention over the whole context is
``kvpass::attend_part`` over the rank's own slots, an all-gather of (output, log-sum-exp) as a functional collective
in the compiled graph, and ``kvpass::merge_parts`` (exact: the log-sum-exp rescaling).

Placement: positions are placed in runs of ``placement_block`` tokens (run ``k`` holds positions ``k·block`` to
``(k+1)·block - 1``), each run on one rank, by a rule every rank computes alike from the position alone (no
communication; the same for prefill and decode tokens): ``"most_free"`` (Infinite-LLM places KV where memory is
free) gives run ``k`` to the rank whose store has the most free runs once runs ``0..k-1`` are placed (ties: the
lowest rank; once every store is full, the ranks in turn), ``"round_robin"`` to rank ``k mod N``. With equal stores
the two are the same rule. A rank's store holds its share of the budget (``rank_budgets``, else equal shares); it
evicts only within its own store.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from kvpass.analysis import UnsupportedGraph
from kvpass.errors import OptionError


@dataclasses.dataclass(frozen=True)
class ContextSplit:
    """This rank's share of a split context: who it is, in which group, and the placement rule; :meth:`of_budget`
    sizes it for one layer's budget (its ``runs``)."""

    rank: int
    world: int
    group_name: str
    placement_block: int
    placement: str = "most_free"
    weights: tuple[int, ...] | None = None  # option rank_budgets: each rank's part of the budget (None: equal)
    runs: tuple[int, ...] = ()              # runs of placement_block slots in each rank's store (of_budget)

    @classmethod
    def of_default_group(cls, placement_block: int, placement: str = "most_free",
                         rank_budgets: tuple[int, ...] | None = None) -> ContextSplit:
        """The split over torch.distributed's default group, which must be initialized."""
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise UnsupportedGraph(
                "kvpass: option 'distribute'='context' splits the KV over the ranks of torch.distributed's default "
                "process group, but none is initialized in this process; call torch.distributed.init_process_group() "
                "(gloo on CPU, nccl on GPU) in every rank before the first forward, and launch with torchrun")
        world = dist.get_world_size()
        if rank_budgets is not None and len(rank_budgets) != world:
            raise OptionError(f"kvpass: option 'rank_budgets' has {len(rank_budgets)} entries "
                              f"({list(rank_budgets)}) but the default process group has {world} ranks; give one "
                              "per rank")
        return cls(dist.get_rank(), world, dist.group.WORLD.group_name, placement_block, placement, rank_budgets)

    def runs_for(self, total: int) -> tuple[int, ...]:
        """Runs of ``placement_block`` slots in each rank's store for a context budget of ``total`` tokens: rank ``r``'s
        part of it (``rank_budgets``, else equal), rounded up to whole runs. The runs add up to at least the
        context's, so a budget that covers the context evicts nothing on any rank under ``"most_free"`` (nor under
        ``"round_robin"`` with equal stores)."""
        weights = self.weights or (1,) * self.world
        whole = sum(weights) * self.placement_block
        return tuple(-(-total * w // whole) for w in weights)

    def share(self, total: int) -> int:
        """Slots of this rank's store for a context budget of ``total`` tokens."""
        return self.runs_for(total)[self.rank] * self.placement_block

    def reserve_share(self, reserve: int) -> int:
        """Slots of this rank's reserve (option ``reserve``): enough for its runs of any ``reserve`` consecutive
        positions placed once the stores are full (the ranks in turn)."""
        if not reserve:
            return 0
        touched = -(-(reserve - 1) // self.placement_block) + 1  # runs that many consecutive positions can touch
        return -(-touched // self.world) * self.placement_block

    def of_budget(self, total: int) -> ContextSplit:
        """This split, its stores sized for a layer whose whole-context budget is ``total``."""
        return dataclasses.replace(self, runs=self.runs_for(total))

    def segments(self) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
        """The most-free rule in closed form, from the stores' ``runs``: (first run of each segment, the ranks that
        take turns in it, in rank order). A rank with ``c`` runs waits ``max(runs) - c`` turns, then takes one run per
        turn; a segment starts whenever another rank joins. The last holds every rank and runs on past the stores'
        capacity (every store full: the ranks in turn)."""
        waits = [max(self.runs) - c for c in self.runs]
        starts, members, placed, previous = [], [], 0, None
        for wait in sorted(set(waits)):
            if previous is not None:
                placed += len(members[-1]) * (wait - previous)
            starts.append(placed)
            members.append(tuple(r for r in range(self.world) if waits[r] <= wait))
            previous = wait
        return tuple(starts), tuple(members)

    def owned_positions(self, graph: fx.Graph, pos: fx.Node) -> fx.Node:
        """``pos`` with the slots this rank does not own set to -1 (empty: never attended, evicted first)."""
        g = graph.call_function
        run = g(operator.floordiv, (pos, self.placement_block))
        if self.placement == "most_free" and len(set(self.runs)) > 1:
            owner = g(most_free_owner, (run, *self.segments()))
        else:  # stores of equal runs: the most-free rule is round-robin
            owner = g(operator.mod, (run, self.world))
        return g(torch.where, (g(operator.eq, (owner, self.rank)), pos, -1))

    def all_gather(self, graph: fx.Graph, x: fx.Node) -> fx.Node:
        """``[N, *x.shape]``: every rank's ``x``, in rank order (a functional all-gather and its wait, in the graph)."""
        g = graph.call_function
        gathered = g(torch.ops._c10d_functional.all_gather_into_tensor.default, (x, self.world, self.group_name))
        gathered = g(torch.ops._c10d_functional.wait_tensor.default, (gathered,))
        return g(torch.unflatten, (gathered, 0, (self.world, -1)))


def most_free_owner(run: torch.Tensor, starts: tuple[int, ...], members: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """The rank of each run index (``run``, any shape; negative: padding, any rank) under the most-free rule, from
    :meth:`ContextSplit.segments`: the segment it falls in, then its turn among that segment's ranks. Traceable."""
    world = len(members[-1])
    first = torch.tensor(starts, device=run.device)
    sizes = torch.tensor([len(m) for m in members], device=run.device)
    table = torch.tensor([list(m) + [0] * (world - len(m)) for m in members], device=run.device)
    segment = (run.unsqueeze(-1) >= first).sum(-1).clamp(min=1) - 1
    turn = (run - first[segment]).remainder(sizes[segment])
    return table[segment, turn]
