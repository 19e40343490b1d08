"""What the recognizers return (an :class:`AttentionCall`, then an :class:`AttentionSite`) and the graph helpers they
share."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from kvpass.analysis.ops import LAYOUT_FUNCTIONS, LAYOUT_METHODS, aten


@dataclasses.dataclass
class AttentionCall:
    """One attention computation a call recognizer matched, before the cache it reads is known."""

    kind: str                 # "sdpa" or "eager"
    attn: fx.Node             # node whose output is the attention result [B, H_q, T, D_v]
    q: fx.Node                # the queries [B, H_q, T, D]
    k: fx.Node                # the keys as the attention reads them (an eager score matmul's: transposed)
    v: fx.Node
    mask: fx.Node | None
    scale: float
    softcap: float = 0.0      # logits soft-capped to ``softcap * tanh(logits / softcap)``; 0: none
    sinks: fx.Node | None = None  # learned attention-sink logits, broadcastable to [B, H_q, T] (or [B, H_q, T, 1])
    window: int = 0           # a sliding window the attention's mask applies (GPT-Neo's local layers); 0: none


@dataclasses.dataclass
class AttentionSite:
    """One attention call and the cache write that feeds it."""

    kind: str                 # "sdpa" or "eager"
    attn: fx.Node             # node whose output is the attention result [B, H_q, T, D_v]
    q: fx.Node
    keys: fx.Node             # all candidate keys the cache holds for this forward [B, H_kv, N, D]
    values: fx.Node
    key_write: fx.Node        # graph output the cache stores: ``keys`` or, for a sliding layer, its tail
    value_write: fx.Node
    past_keys: fx.Node | None  # graph input holding the previous store, None on a first forward
    past_values: fx.Node | None
    mask: fx.Node | None
    scale: float
    window: int = 0           # sliding-window length of the layer (0: full attention)
    softcap: float = 0.0      # logits soft-capped to ``softcap * tanh(logits / softcap)`` (Gemma-2); 0: none
    layer: int = -1
    # StaticCache: the in-place ``index_copy_`` writes of new keys and values into the buffers ``keys`` and
    # ``values`` (which are then also ``key_write``/``value_write``); None for a DynamicCache
    static_writes: tuple[fx.Node, fx.Node] | None = None
    sinks: fx.Node | None = None  # learned attention-sink logits, broadcastable to [B, H_q, T] (or [B, H_q, T, 1])
    # The window lives in the attention's mask alone (GPT-Neo's local layers) and the cache keeps every token:
    # kvpass applies it (a sliding layer whose cache keeps only the window is left to HF instead)
    masked_window: bool = False
    # A latent cache (MLA: DeepSeek-V2/V3, MiniCPM3): the attention reads keys/values computed from the cached tensors
    # token by token, [B, H, N, D] / [B, H, N, D_v]; None when it reads the cached tensors themselves
    attn_keys: fx.Node | None = None
    attn_values: fx.Node | None = None

    @property
    def hf_window(self) -> bool:
        """A sliding layer whose cache keeps only its window: HF's store is already bounded, kvpass leaves it."""
        return bool(self.window) and not self.masked_window

    def describe(self) -> str:
        past = "store input" if self.past_keys is not None else "empty (first forward)"
        if self.static_writes:
            past = f"StaticCache buffer of {node_value(self.keys).shape[2]} slots" + (
                "" if self.past_keys is not None else " (allocated by this forward)")
        window = f", sliding window {self.window}" if self.window else ""
        window += " (in the mask)" if self.masked_window else ""
        latent = ", latent cache (keys/values computed from it)" if self.attn_keys is not None else ""
        sinks = ", attention sinks" if self.sinks is not None else ""
        return f"layer {self.layer}: {self.kind} attention at '{self.attn.name}', cache={past}{window}{latent}{sinks}"


# An attention recognizer: the call anchored at a node (an SDPA op, an eager chain's softmax), or None.
CallRecognizer = Callable[[fx.Node], AttentionCall | None]
# A cache recognizer: the site of a call that reads the cache it knows (given the graph's outputs and the sites found
# before it), None when the call reads another kind of cache; raises UnsupportedGraph for a cache it must refuse.
StoreRecognizer = Callable[[AttentionCall, set[fx.Node], list[AttentionSite]], AttentionSite | None]


def node_value(node: fx.Node):
    """The fake tensor/value recorded on a node (Dynamo: example_value, export: val)."""
    return node.meta.get("example_value", node.meta.get("val"))


def constant_float(x) -> float | None:
    """``x`` as a Python float: a number, or a node whose traced value is a scalar.

    With ``dynamic=True`` Dynamo lifts float module attributes (HF's ``self.scaling``) to graph inputs
    read by ``.item()``; their value is constant for a given model, so the traced value is used.
    """
    if isinstance(x, int | float) and not isinstance(x, bool):
        return float(x)
    if isinstance(x, fx.Node) and x.op == "call_function" and (
            (x.target is torch.tensor and len(x.args) == 1) or (
                x.target is torch.full and len(x.args) == 2 and isinstance(x.args[0], list | tuple | torch.Size)
                and len(x.args[0]) == 0)):
        return constant_float(x.args[-1])  # a scalar tensor built in the graph: torch.tensor(c), torch.full((), c)
    value = node_value(x) if isinstance(x, fx.Node) else x
    if isinstance(value, torch.SymFloat | torch.SymInt) and value.node.hint is not None:
        return float(value.node.hint)
    return None


# A fill at or below this is a "masked out" logit (float32's lowest is -3.4e38, float16's -65504 is not below it)
MASKED_FILL = -1e38


def is_masked_fill(x) -> bool:
    """``x`` is a constant at or below :data:`MASKED_FILL`: the value a model writes into logits it masks out."""
    value = constant_float(x)
    return value is not None and value <= MASKED_FILL


def is_layout(node: fx.Node) -> bool:
    """``node`` only re-lays-out its first input (a view, transpose, expand, cast, index)."""
    if node.op == "call_method":
        return node.target in LAYOUT_METHODS
    return node.op == "call_function" and node.target in LAYOUT_FUNCTIONS


def trace_to_source(node: fx.Node) -> fx.Node:
    """Follow layout ops back to the node that produced the data."""
    while isinstance(node, fx.Node) and is_layout(node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def mutates(node: fx.Node) -> bool:
    """An in-place op (``x.copy_(y)``, ``aten.copy_``, ``x[i] = y``)."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return node.target is operator.setitem or str(name).split(".")[0].endswith("_")


def live_users(node: fx.Node) -> list[fx.Node]:
    """Users whose result is used (or that write in place): not the dead checks an export graph keeps
    (``aten._assert_tensor_metadata``, an unused ``max`` index)."""
    return [u for u in node.users if u.users or u.op == "output" or mutates(u)]


def reads_only_size(node: fx.Node) -> bool:
    """``node`` reads a tensor's size or rank, not its data."""
    return (node.op == "call_method" and node.target in ("size", "dim")) or (
        node.op == "call_function" and node.target in (aten.sym_size.int, aten.sym_numel.default, torch.numel))


def same_size(a, b) -> bool:
    """Two sizes (ints or SymInts) are known to be equal."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return bool(statically_known_true(a == b))
