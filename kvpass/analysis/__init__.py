"""Find attention sites and the KV-cache writes that feed them in an FX graph.

Works on Dynamo graphs (torch functions / Tensor methods) and on torch.export graphs (ATen ops).
A site is ``scaled_dot_product_attention`` or an eager ``matmul → (scale) → (soft cap) → (+mask) →
softmax → matmul``; its keys and values are followed back through layout ops (GQA ``repeat_kv`` expands,
reshapes, transposes) to the tensor the model writes into its cache:

* ``cat([past, new], dim=-2)`` — DynamicCache; ``past`` is a graph input (decode) or an empty
  constant (first forward);
* ``buffer.index_copy_(2, index, new)`` — StaticCache: ``buffer`` (a graph input, or allocated in the
  graph on the cache's first update) is a fixed-size tensor the cache keeps at one address; kvpass
  uses it as the store itself and writes the compacted store back into it in place.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from kvpass.errors import UnsupportedGraph

aten = torch.ops.aten


SDPA_TARGETS = {
    torch._C._nn.scaled_dot_product_attention,
    torch.nn.functional.scaled_dot_product_attention,
    aten.scaled_dot_product_attention.default,
}
SOFTMAX_TARGETS = {torch.softmax, torch.nn.functional.softmax, aten._softmax.default, aten.softmax.int}
MATMUL_TARGETS = {torch.matmul, operator.matmul, torch.bmm, aten.matmul.default, aten.bmm.default}
CAT_TARGETS = {torch.cat, aten.cat.default}
INDEX_COPY_NAMES = ("index_copy_", "index_copy")
# Ops that only re-lay-out a tensor (GQA repeat, head split, transposes, casts): followed backwards.
LAYOUT_METHODS = {"expand", "reshape", "view", "contiguous", "transpose", "to", "float", "clone",
                  "repeat_interleave", "unsqueeze", "type_as"}
LAYOUT_FUNCTIONS = {operator.getitem, torch.reshape, torch.transpose, torch.repeat_interleave,
                    torch.unsqueeze, aten.view.default, aten.expand.default, aten.reshape.default,
                    aten._unsafe_view.default, aten.clone.default, aten.unsqueeze.default,
                    aten.transpose.int, aten.slice.Tensor, aten.contiguous.default,
                    aten.repeat_interleave.self_int, aten._to_copy.default, aten.alias.default}
# Eager attention: between the score matmul and softmax (scale, mask, cast) and after softmax.
MUL_TARGETS = {operator.mul, operator.imul, torch.mul, aten.mul.Tensor, aten.mul.Scalar}
DIV_TARGETS = {operator.truediv, operator.itruediv, torch.div, aten.div.Tensor, aten.div.Scalar}
ADD_TARGETS = {operator.add, operator.iadd, torch.add, aten.add.Tensor}
SUB_TARGETS = {operator.sub, operator.isub, torch.sub, aten.sub.Tensor}
LOGSUMEXP_TARGETS = {torch.logsumexp, aten.logsumexp.default}
SIGMOID_TARGETS = {torch.sigmoid, torch.nn.functional.sigmoid, aten.sigmoid.default}
PRE_SOFTMAX = MUL_TARGETS | DIV_TARGETS | ADD_TARGETS
TANH_TARGETS = {torch.tanh, aten.tanh.default}
POST_SOFTMAX_METHODS = {"to", "type_as", "float", "type"}
# Ops that transform each token of a cached tensor on its own: a latent cache's keys/values are computed through
# these (MLA's up-projection, head split, rotary-key broadcast)
PER_TOKEN_METHODS = LAYOUT_METHODS | {"new_empty", "new_zeros", "copy_", "split", "chunk", "pow", "mean", "rsqrt",
                                      "mul", "add", "sub", "neg", "type", "permute"}
PER_TOKEN_FUNCTIONS = LAYOUT_FUNCTIONS | MUL_TARGETS | DIV_TARGETS | ADD_TARGETS | SUB_TARGETS | {
    torch.nn.functional.linear, torch.split, torch.chunk, torch.rsqrt, torch.sqrt, torch.pow, torch.neg,
    operator.neg, torch.nn.functional.layer_norm, torch.nn.functional.rms_norm, torch.nn.functional.silu,
    # the same in torch.export graphs
    aten.linear.default, aten.split_with_sizes.default, aten.split.Tensor, aten.new_empty.default,
    aten.new_zeros.default, aten.copy_.default, aten.pow.Tensor_Scalar, aten.mean.dim, aten.rsqrt.default,
    aten.to.dtype, aten.neg.default, aten.expand.default}
POST_SOFTMAX_FUNCTIONS = {torch.nn.functional.dropout, aten.dropout.default, aten._to_copy.default,
                          aten.clone.default, aten.to.dtype}


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


def node_value(node: fx.Node):
    """The fake tensor/value recorded on a node (Dynamo: example_value, export: val)."""
    return node.meta.get("example_value", node.meta.get("val"))


def _is_layout(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in LAYOUT_METHODS
    return node.op == "call_function" and node.target in LAYOUT_FUNCTIONS


def trace_to_source(node: fx.Node) -> fx.Node:
    """Follow layout ops back to the node that produced the data."""
    while isinstance(node, fx.Node) and _is_layout(node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _is_index_copy(node: fx.Node) -> bool:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return any(n in str(name) for n in INDEX_COPY_NAMES)


def _static_write(buffer: fx.Node) -> fx.Node | None:
    """The ``buffer.index_copy_(2, index, new)`` that writes a StaticCache layer, or None."""
    for user in buffer.users:
        if user.op == "call_method" and user.target == "index_copy_" and user.args[0] is buffer and (
            user.args[1] in (2, -2) and len(user.args) == 4
        ):
            return user
    return None


def _cache_parts(source: fx.Node) -> tuple[fx.Node | None, bool]:
    """For a key/value source node: (past-store graph input or None, whether it is a cache cat)."""
    if source.op == "call_function" and source.target in CAT_TARGETS:
        parts = source.args[0]
        dim = source.kwargs.get("dim", source.args[1] if len(source.args) > 1 else 0)
        if isinstance(parts, list | tuple) and len(parts) == 2 and dim in (-2, 2):
            past = parts[0]
            if isinstance(past, fx.Node) and past.op == "placeholder":
                return past, True
            value = node_value(past) if isinstance(past, fx.Node) else None
            if value is not None and value.numel() == 0:
                return None, True
    return None, False


def _cache_write(source: fx.Node, outputs: set[fx.Node]) -> tuple[fx.Node | None, int]:
    """The graph output through which ``source`` reaches the cache, and the layer's sliding window.

    A DynamicCache layer stores ``source`` itself; a sliding-window layer stores
    ``source[:, :, -(window - 1):]`` and attends to all of ``source``.
    """
    if source in outputs:
        return source, 0
    for user in source.users:
        if user in outputs and user.op == "call_function" and user.target is operator.getitem:
            index = user.args[1]
            if isinstance(index, tuple) and len(index) >= 3 and index[:2] == (slice(None),) * 2:
                tail = index[2]
                # with dynamic=True the window is a SymInt input of the graph: its traced value is the model's
                start = constant_float(tail.start) if isinstance(tail, slice) and tail.stop is None else None
                if start is not None and start < 0:
                    return user, 1 - int(start)
    return None, 0


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


def _softcap_of(node: fx.Node) -> tuple[float, fx.Node] | None:
    """``(c, x)`` when ``node`` is ``tanh(x / c) * c`` (Gemma-2's logit soft cap, also as ``x * (1/c)``)."""
    if not (node.op == "call_function" and node.target in MUL_TARGETS):
        return None
    a, b = node.args[0], node.args[1]
    tanh, cap = (a, constant_float(b)) if isinstance(a, fx.Node) else (b, constant_float(a))
    if cap is None or not (isinstance(tanh, fx.Node) and tanh.op == "call_function" and tanh.target in TANH_TARGETS):
        return None
    inner = tanh.args[0]
    if not (isinstance(inner, fx.Node) and inner.op == "call_function" and inner.target in MUL_TARGETS | DIV_TARGETS):
        return None
    divisor = constant_float(inner.args[1])
    if divisor is None or divisor == 0:
        return None
    inverse = divisor if inner.target in DIV_TARGETS else 1.0 / divisor
    if not math.isclose(inverse, cap, rel_tol=1e-6):
        return None
    return cap, inner.args[0]


@dataclasses.dataclass
class EagerMatch:
    """The parts of an eager attention computation (see :func:`_eager_site`)."""

    out: fx.Node               # the attention output [B, H_q, T, D_v]: weights @ values (or its sink-scaled product)
    q: fx.Node                 # the queries [B, H_q, T, D] (a 3-D [B * H_q, T, D] matmul's found through its view)
    k_t: fx.Node               # the keys as the score matmul reads them (transposed)
    v: fx.Node
    mask: fx.Node | None
    scale: float
    softcap: float
    sinks: fx.Node | None      # learned attention-sink logits, broadcastable to [B, H_q, T] (or [B, H_q, T, 1])
    window: int = 0            # a sliding window the logits are masked to (GPT-Neo's local layers); 0: none


def _is_max_shift(node: fx.Node) -> fx.Node | None:
    """``x`` when ``node`` is ``x - x.max(dim=-1, keepdim=True).values`` (an overflow guard softmax ignores)."""
    if not (node.op == "call_function" and node.target in SUB_TARGETS and len(node.args) == 2):
        return None
    x, shift = node.args
    if not (isinstance(shift, fx.Node) and shift.target is operator.getitem and shift.args[1] == 0):
        return None
    reduced = shift.args[0]
    is_max = (reduced.op == "call_method" and reduced.target == "max") or (
        reduced.op == "call_function" and reduced.target in (torch.max, aten.max.dim))
    return x if is_max and reduced.args[0] is x else None


def _sink_column(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(logits, sinks)`` when ``node`` is ``cat([logits, sinks], dim=-1)`` with a one-wide ``sinks`` column: GPT-OSS's
    learned attention sinks, an extra logit per head that joins the softmax and is dropped after it."""
    if not (node.op == "call_function" and node.target in CAT_TARGETS):
        return None
    parts = node.args[0]
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    if not (isinstance(parts, list | tuple) and len(parts) == 2 and all(isinstance(p, fx.Node) for p in parts)):
        return None
    logits, column = parts
    value = node_value(column)
    if value is None or dim not in (-1, value.dim() - 1) or value.shape[-1] != 1:
        return None
    return logits, column


def _drops_last_column(node: fx.Node) -> bool:
    """``node`` is ``x[..., :-1]`` (in an export graph: ``aten.slice(x, last dim, 0, -1)``)."""
    if node.op == "call_function" and node.target is aten.slice.Tensor:
        rank = node_value(node.args[0]).dim()
        return len(node.args) == 4 and node.args[1] in (-1, rank - 1) and node.args[2] == 0 and node.args[3] == -1
    if not (node.op == "call_function" and node.target is operator.getitem):
        return False
    index = node.args[1]
    return isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis and index[1] == slice(None, -1, None)


def _mutates(node: fx.Node) -> bool:
    """An in-place op (``x.copy_(y)``, ``aten.copy_``, ``x[i] = y``)."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return node.target is operator.setitem or str(name).split(".")[0].endswith("_")


def _live_users(node: fx.Node) -> list[fx.Node]:
    """Users whose result is used (or that write in place): not the dead checks an export graph keeps
    (``aten._assert_tensor_metadata``, an unused ``max`` index)."""
    return [u for u in node.users if u.users or u.op == "output" or _mutates(u)]


def _sink_scaled_output(logits: fx.Node, pv: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(out, sinks)`` when ``out = pv * sigmoid(logsumexp(logits, -1) - sinks)``: GraniteSWA's learned attention
    sinks, the same extra softmax-denominator logit as GPT-OSS's, applied as a scale of the output."""
    lse = next((u for u in logits.users if u.op == "call_function" and u.target in LOGSUMEXP_TARGETS), None)
    if lse is None or len(_live_users(lse)) != 1:
        return None
    (sub,) = _live_users(lse)
    if not (sub.op == "call_function" and sub.target in SUB_TARGETS and sub.args[0] is lse
            and isinstance(sub.args[1], fx.Node)):
        return None
    node, through_sigmoid = sub, False
    passing = SIGMOID_TARGETS | {torch.unsqueeze, aten.unsqueeze.default, aten.to.dtype, aten._to_copy.default}
    while len(_live_users(node)) == 1:
        (node,) = _live_users(node)
        if node.op == "call_method" and node.target in POST_SOFTMAX_METHODS | {"unsqueeze", "sigmoid"} or (
                node.op == "call_function" and node.target in passing):
            through_sigmoid |= node.target in SIGMOID_TARGETS or node.target == "sigmoid"
            continue
        break
    if not (node.op == "call_function" and node.target in MUL_TARGETS and pv in node.args
            and len(_live_users(pv)) == 1):
        return None
    return (node, sub.args[1]) if through_sigmoid else None


def _inside(first: fx.Node, last: fx.Node) -> set[fx.Node]:
    """Every node on a path from ``first`` to ``last`` (both included)."""
    order = {n: i for i, n in enumerate(first.graph.nodes)}
    after, frontier = {first}, [first]
    while frontier:
        for user in frontier.pop().users:
            if user not in after and order[user] <= order[last]:
                after.add(user)
                frontier.append(user)
    inside, frontier = {last}, [last]
    while frontier:
        for parent in frontier.pop().all_input_nodes:
            if parent in after and parent not in inside:
                inside.add(parent)
                frontier.append(parent)
    return inside


# A fill at or below this is a "masked out" logit (float32's lowest is -3.4e38, float16's -65504 is not below it)
_MASKED_FILL = -1e38


def _masked_fill_value(x) -> bool:
    value = constant_float(x)
    return value is not None and value <= _MASKED_FILL


def _band_window(cond: fx.Node) -> int | None:
    """The window of GPT-Neo's ``where(bias[:, :, K-Q:K, :K], logits, finfo.min)``: ``bias`` is a constant bool
    ``[1, 1, P, P]`` buffer, the causal lower triangle (0: no window) or its band ``i - j < w`` (a local layer:
    ``w``); None when ``cond`` is anything else."""
    if not (cond.op == "call_function" and cond.target is operator.getitem and isinstance(cond.args[0], fx.Node)
            and cond.args[0].op == "placeholder"):
        return None
    buffer = getattr(cond.args[0].meta.get("grapharg"), "example", None)  # (Dynamo keeps a buffer's real tensor)
    if not (isinstance(buffer, torch.Tensor) and buffer.dtype == torch.bool and buffer.dim() == 4
            and buffer.shape[:2] == (1, 1) and buffer.shape[2] == buffer.shape[3]):
        return None
    band = buffer[0, 0]
    p = band.shape[-1]
    w = int(band[-1].sum())
    causal = torch.ones(p, p, dtype=torch.bool, device=band.device).tril()
    if not torch.equal(band, causal & ~causal.tril(-w)):
        return None
    return 0 if w >= p else w


def _reads_only_size(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in ("size", "dim")) or (
        node.op == "call_function" and node.target in (aten.sym_size.int, aten.sym_numel.default, torch.numel))


def _eager_site(softmax: fx.Node) -> EagerMatch | None:
    """Match matmul → scale → (soft cap) → (+mask) → softmax → (cast/dropout) → matmul, with learned attention sinks
    (GPT-OSS's extra logit column; GraniteSWA's output scale) where a model has them.

    kvpass replaces the whole computation, so no node of it but the output may be read elsewhere (the weights
    returned with ``output_attentions=True``, a statistic of the logits): such a graph is refused.
    """
    node, added, softcap, sinks = softmax.args[0], [], 0.0, None
    shifted = _is_max_shift(node) if isinstance(node, fx.Node) else None
    if shifted is not None:
        node = shifted
    column = _sink_column(node) if isinstance(node, fx.Node) else None
    if column is not None:
        node, sinks = column
    masked_logits = node
    factors, window = [], 0
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method"):
        capped = _softcap_of(node) if not softcap else None
        if capped is not None:
            softcap, node = capped
            continue
        if _is_layout(node) and node.target is not operator.getitem:  # (a view of the score matmul: Falcon)
            node = node.args[0]
            continue
        if node.target is torch.where and len(node.args) == 3 and isinstance(node.args[0], fx.Node) and (
                _masked_fill_value(node.args[2])):  # GPT-Neo: causal (or local-band) masking with a bool buffer
            band = _band_window(node.args[0])
            if band is None:
                return None
            window, node = band, node.args[1]
            continue
        if node.target in (torch.max, torch.maximum) and len(node.args) == 2 and _masked_fill_value(node.args[1]):
            node = node.args[0]  # XGLM's clamp of the masked logits at the lowest float: no effect on the softmax
            continue
        if node.target not in PRE_SOFTMAX:
            break
        if node.target in ADD_TARGETS and isinstance(node.args[1], fx.Node):
            added.append(node.args[1])
        if node.target in MUL_TARGETS | DIV_TARGETS:
            factors.append(node)
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in MATMUL_TARGETS):
        return None
    if len(added) > 1:  # kvpass rebuilds the mask from slot positions: any other additive term would be lost
        raise UnsupportedGraph(
            f"kvpass: attention logits at '{softmax.name}' get {len(added)} additive terms before softmax "
            f"({[n.name for n in reversed(added)]}): a position bias such as ALiBi besides the mask. kvpass supports "
            "rotary-position models (it keeps each token's rotated key), not additive position biases"
        )
    mask = added[0] if added else None
    score_mm = node
    q, k_t = score_mm.args[0], score_mm.args[1]
    out = softmax
    while len(_live_users(out)) == 1:
        (user,) = _live_users(out)
        if user.op == "call_method" and user.target in POST_SOFTMAX_METHODS or (
            user.op == "call_function" and user.target in POST_SOFTMAX_FUNCTIONS
        ) or (column is not None and _drops_last_column(user)) or (
            user.op == "call_method" and user.target in ("view", "reshape")  # (XGLM: [B, H, T, N] → [B * H, T, N])
        ):
            out = user
            continue
        break
    users = [u for u in _live_users(out) if u.op == "call_function" and u.target in MATMUL_TARGETS
             and u.args[0] is out]
    if len(users) != 1:
        return None
    pv = final = users[0]
    if sinks is None:
        scaled = _sink_scaled_output(masked_logits, pv)
        if scaled is not None:
            final, sinks = scaled
    inside = _inside(score_mm, final)
    for n in inside - {final}:
        elsewhere = [u.name for u in _live_users(n) if u not in inside and not _reads_only_size(u)]
        if elsewhere:
            raise UnsupportedGraph(
                f"kvpass: the attention computed at '{softmax.name}' has its intermediate '{n.name}' also read by "
                f"{elsewhere} (attention weights returned with output_attentions=True, or a statistic of the logits "
                "kvpass does not know). kvpass replaces the whole attention computation with its own over the "
                "compressed store, so those readers would get values kvpass never computed; call the model with "
                "output_attentions=False"
            )
    scale = 1.0  # the constant factors between the score matmul and softmax (none: the model scaled its queries)
    for factor in factors:
        a, b = factor.args[0], factor.args[1]
        const = constant_float(b) if constant_float(b) is not None else constant_float(a)
        if const is None:
            raise UnsupportedGraph(f"kvpass: the attention logits at '{softmax.name}' are scaled by '{factor.name}', "
                                   "which is not a constant; kvpass needs the scale its attention applies")
        scale = scale * const if factor.target in MUL_TARGETS else scale / const
    q_value = node_value(q)
    if q_value is not None and q_value.dim() == 3:  # heads folded into the batch for bmm (XGLM): find [B, H, T, D]
        folded = q
        while _is_layout(folded) and node_value(folded).dim() != 4 and isinstance(folded.args[0], fx.Node):
            folded = folded.args[0]
        q4, k4 = node_value(folded), node_value(trace_to_source(k_t))
        if q4 is None or q4.dim() != 4 or k4 is None or k4.dim() != 4 or k4.shape[1] != q4.shape[1] or (
                not _same_size(q4.shape[0] * q4.shape[1], q_value.shape[0])):
            return None
        q = folded
    return EagerMatch(final, q, k_t, pv.args[1], mask, scale, softcap, sinks, window)


def _same_size(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return bool(statically_known_true(a == b))


def _per_token(node: fx.Node, n) -> bool:
    """Whether ``node`` transforms each of the ``n`` tokens of a cached tensor on its own (a projection, a norm,
    a split of the feature axis, a layout change): then slot ``j`` of its result still belongs to token ``j``."""
    values = node_value(node)
    for value in values if isinstance(values, list | tuple) else [values]:
        if isinstance(value, torch.Tensor) and not any(_same_size(s, n) for s in value.shape):
            return False  # the sequence axis was reduced or merged away
    if node.op == "call_method":
        return node.target in PER_TOKEN_METHODS
    if node.op != "call_function":
        return False
    if node.target in CAT_TARGETS:  # joining feature halves, never along the sequence
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        rank = node_value(node).dim()
        return dim in (-1, rank - 1)
    return node.target in PER_TOKEN_FUNCTIONS


def _writes_into(node: fx.Node):
    """In-place writes into ``node`` or a view of it (HF's MLA fills a ``new_empty`` key tensor with ``copy_``)."""
    for user in node.users:
        if user.args and user.args[0] is node and user.op in ("call_method", "call_function") and _mutates(user):
            yield user
        elif _is_layout(user) and user.args and user.args[0] is node:
            yield from _writes_into(user)


def _is_cache_write(node: fx.Node, outputs: set[fx.Node]) -> bool:
    """A DynamicCache layer's ``cat(past, new)`` stored as a graph output (whole or its tail), or a StaticCache
    layer's in-place ``index_copy_`` of new tokens."""
    if node.op == "call_function" and _cache_parts(node)[1]:
        return node in outputs or any(u in outputs for u in node.users)
    return node.op == "call_method" and node.target == "index_copy_" and len(node.args) == 4 and node.args[1] in (2, -2)


def _latent_stores(attn_inputs: list[fx.Node], n, outputs: set[fx.Node]) -> tuple[list[fx.Node], list[str], bool]:
    """The DynamicCache ``cat`` writes an attention's keys/values are computed from token by token (a latent cache:
    MLA caches a compressed latent and the rotary key, then projects them to every head's keys and values), the
    names of the nodes on the way that do not act token by token, and whether a StaticCache buffer was reached."""
    stores, mixing, seen, static = [], [], set(), False
    frontier = list(attn_inputs)
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        if _cache_parts(node)[1] and node in outputs:
            stores.append(node)
            continue
        if _static_write(node) is not None:  # a StaticCache buffer (an input, or allocated by a first forward)
            static = True
            continue
        if node.op in ("placeholder", "get_attr") or _reads_only_size(node):  # (a size is no data)
            continue
        if not _per_token(node, n):
            mixing.append(node.name)
            continue
        frontier.extend(node.all_input_nodes)
        frontier.extend(_writes_into(node))
    order = {node: i for i, node in enumerate(attn_inputs[0].graph.nodes)}
    return sorted(stores, key=order.__getitem__), mixing, static


def _latent_site(kind, attn, q, k, v, mask, scale, softcap, sinks, outputs, claimed) -> AttentionSite:
    """A site whose attention reads keys/values computed token by token from two DynamicCache writes (MLA).

    The cached tensors are the store: kvpass scores, keeps and evicts their slots, and the model's own projection
    turns the kept slots into keys and values (it runs over the candidates of each forward, as HF's does).
    """
    attn_keys = k
    if kind == "eager":  # the score matmul reads the keys transposed
        if not (k.op in ("call_method", "call_function") and str(getattr(k.target, "__name__", k.target)) in (
                "transpose", "transpose.int") and {a % 4 for a in k.args[1:3]} == {2, 3}):
            raise UnsupportedGraph(f"kvpass: attention at '{attn.name}' reads keys through '{k.name}', not a "
                                   "transpose of the last two dimensions; kvpass cannot recover the keys it scores")
        attn_keys = k.args[0]
    k_value, v_value = node_value(attn_keys), node_value(v)
    n = k_value.shape[2]
    stores, mixing, static = _latent_stores([attn_keys, v], n, outputs)
    fresh = [s for s in stores if s not in claimed]
    if static:
        raise UnsupportedGraph(
            f"kvpass: attention at '{attn.name}' reads keys/values computed from a StaticCache's buffers (a latent "
            "cache, as MLA's, in a StaticCache): kvpass compresses latent caches in the default DynamicCache; drop "
            "the StaticCache"
        )
    if not stores:
        raise UnsupportedGraph(
            f"kvpass: attention at '{attn.name}' reads keys from '{attn_keys.name}' and values from '{v.name}', which "
            "are not written to a KV cache kvpass knows (a DynamicCache cat or a StaticCache index_copy_), nor "
            "computed from one: forward called with use_cache=False, or a sliding-window StaticCache layer? kvpass "
            "compresses KV caches, so there is nothing it can compress here"
        )
    if mixing or len(fresh) != 2 or len(stores) != 2 or not all(
            _same_size(x.shape[2], n) for x in (v_value, *(node_value(s) for s in stores))):
        raise UnsupportedGraph(
            f"kvpass: attention at '{attn.name}' reads keys '{attn_keys.name}' and values '{v.name}' computed from "
            f"the cache writes {[s.name for s in stores]}, but not token by token from one layer's two writes (a "
            f"latent cache, as MLA's: a projection of each cached token): operations on the way that mix tokens or "
            f"are unknown: {mixing[:5]}. kvpass keeps and evicts cached tokens, so it needs each slot's keys and "
            "values to depend on that slot's token alone"
        )
    (store_k, past_k), (store_v, past_v) = ((s, _cache_parts(s)[0]) for s in stores)
    if (past_k is None) != (past_v is None) or node_value(store_k).shape[1] == 0 or (
            k_value.shape[1] % node_value(store_k).shape[1]):
        raise UnsupportedGraph(f"kvpass: the latent cache writes {[s.name for s in stores]} of attention "
                               f"'{attn.name}' do not form one layer's store (heads {k_value.shape[1]} over "
                               f"{node_value(store_k).shape[1]})")
    return AttentionSite(kind, attn, q, store_k, store_v, store_k, store_v, past_k, past_v, mask, scale,
                         softcap=softcap, sinks=sinks, attn_keys=attn_keys, attn_values=v)


def _static_site(kind, attn, q, k_buf, v_buf, k_write, v_write, mask, scale, softcap) -> AttentionSite:
    """A site reading StaticCache buffers: the buffers are the store (graph inputs, or allocated by a first forward)."""
    shapes = {tuple(node_value(n).shape) for n in (k_buf, v_buf)} if node_value(k_buf) is not None else set()
    if len(shapes) > 1:
        raise UnsupportedGraph(f"kvpass: StaticCache keys and values of '{attn.name}' differ in shape: {shapes}")
    past_k, past_v = (n if n.op == "placeholder" else None for n in (k_buf, v_buf))
    return AttentionSite(kind, attn, q, k_buf, v_buf, k_buf, v_buf, past_k, past_v, mask, scale,
                         softcap=softcap, static_writes=(k_write, v_write))


def find_attention_sites(graph: fx.Graph) -> list[AttentionSite]:
    """Every attention site that reads a DynamicCache ``cat`` or a StaticCache buffer, in graph (= layer) order.

    Raises :class:`UnsupportedGraph` naming what was found when a site cannot be rewritten.
    """
    output = graph.output_node()
    outputs = set(output.all_input_nodes)
    sites: list[AttentionSite] = []
    found_attention = 0
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in SDPA_TARGETS:
            q, k, v = node.args[:3]
            mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
            head_dim = node_value(q).shape[-1]
            scale = node.kwargs.get("scale")
            if scale is not None and constant_float(scale) is None:
                raise UnsupportedGraph(f"kvpass: attention '{node.name}' has a scale that is not a constant: {scale}")
            parts = ("sdpa", node, q, k, v, mask, head_dim**-0.5 if scale is None else constant_float(scale))
            softcap, sinks, masked_window = 0.0, None, 0
        elif node.target in SOFTMAX_TARGETS:
            matched = _eager_site(node)
            if matched is None:
                continue
            parts = ("eager", matched.out, matched.q, matched.k_t, matched.v, matched.mask, matched.scale)
            softcap, sinks, masked_window = matched.softcap, matched.sinks, matched.window
        else:
            continue
        found_attention += 1
        kind, attn, q, k, v, mask, scale = parts
        mask_value = node_value(mask) if isinstance(mask, fx.Node) else None
        if mask_value is not None and mask_value.dim() == 4 and mask_value.shape[1] > 1:
            raise UnsupportedGraph(
                f"kvpass: the mask of attention '{attn.name}' has one row per head (shape "
                f"{tuple(mask_value.shape)}): it carries a position bias such as ALiBi, which kvpass would drop when "
                "it rebuilds the mask from slot positions. kvpass supports rotary-position models, whose keys are "
                "cached after rotation"
            )
        k_src, v_src = trace_to_source(k), trace_to_source(v)
        static_k, static_v = _static_write(k_src), _static_write(v_src)
        if static_k is not None and static_v is not None:
            if sinks is not None:
                raise UnsupportedGraph(f"kvpass: attention at '{attn.name}' has learned attention sinks and writes a "
                                       "StaticCache; kvpass supports sinks with the default DynamicCache")
            sites.append(_static_site(kind, attn, q, k_src, v_src, static_k, static_v, mask, scale, softcap))
            continue
        for src in (k_src, v_src):
            if _is_index_copy(src) or any(_is_index_copy(u) for u in src.users):
                raise UnsupportedGraph(
                    f"kvpass: attention at '{attn.name}' reads keys/values written by '{src.name}' with an "
                    "index_copy that is not a StaticCache layer's in-place write of new tokens along the sequence "
                    "dimension (a functional index_copy, as in an export graph of a StaticCache model, or a "
                    "sliding-window StaticCache layer); use the default DynamicCache"
                )
        past_k, k_is_cache = _cache_parts(k_src)
        past_v, v_is_cache = _cache_parts(v_src)
        k_write, window = _cache_write(k_src, outputs)
        v_write, _ = _cache_write(v_src, outputs)
        if k_write is None or v_write is None:
            if k_is_cache or v_is_cache:
                raise UnsupportedGraph(
                    f"kvpass: attention at '{attn.name}' reads keys from '{k_src.name}' and values from "
                    f"'{v_src.name}', which are not written to a KV cache kvpass knows (a DynamicCache cat or a "
                    "StaticCache index_copy_): forward called with use_cache=False, or a sliding-window StaticCache "
                    "layer? kvpass compresses KV caches, so there is nothing it can compress here"
                )
            claimed = {n for site in sites for n in (site.keys, site.values)}
            sites.append(_latent_site(kind, attn, q, k, v, mask, scale, softcap, sinks, outputs, claimed))
            continue
        if not (k_is_cache or k_src.op != "placeholder"):
            raise UnsupportedGraph(f"kvpass: attention at '{attn.name}' reads keys straight from an input")
        if masked_window and window:
            raise UnsupportedGraph(f"kvpass: attention at '{attn.name}' masks a {masked_window}-token window and its "
                                   f"cache keeps a {window}-token one; kvpass expects one of the two")
        site = AttentionSite(kind, attn, q, k_src, v_src, k_write, v_write, past_k, past_v, mask, scale,
                             window or masked_window, softcap, sinks=sinks, masked_window=bool(masked_window))
        sites.append(site)
    for i, site in enumerate(sites):  # graph order is layer order, in prefill and decode graphs alike
        site.layer = i
    # every cache write must feed a rewritten site: a layer whose attention kvpass did not recognize would otherwise
    # keep its whole cache, uncompressed, beside the compressed ones
    claimed = {n for site in sites for n in (site.keys, site.values, site.key_write, site.value_write,
                                             *(site.static_writes or ()))}
    unread = [n.name for n in graph.nodes if n not in claimed and _is_cache_write(n, outputs)]
    if unread:
        raise UnsupportedGraph(
            f"kvpass: the KV cache writes {unread[:6]}{' ...' if len(unread) > 6 else ''} feed no attention kvpass "
            f"recognizes ({len(sites)} site(s) recognized, {found_attention} attention call(s) matched): those layers "
            "attend in a form kvpass does not know, and would keep their whole cache uncompressed. kvpass matches "
            "scaled_dot_product_attention and matmul → (constant scale, soft cap, mask, learned sinks) → softmax → "
            "matmul over a DynamicCache or StaticCache"
        )
    static_slots = {node_value(s.keys).shape[2] for s in sites if s.static_writes}
    if len(static_slots) > 1:
        raise UnsupportedGraph(
            f"kvpass: the StaticCache's layers hold different numbers of slots {sorted(static_slots)} (sliding-window "
            "layers?); kvpass supports a StaticCache of full-attention layers only — use the default DynamicCache"
        )
    if not sites:
        ops = sorted({str(getattr(n.target, "__name__", n.target)) for n in graph.nodes if n.op == "call_function"})
        raise UnsupportedGraph(
            f"kvpass: no attention site found (looked for scaled_dot_product_attention and "
            f"matmul-softmax-matmul reading a KV cache; {found_attention} attention call(s) seen). "
            f"The graph calls: {ops[:40]}{' ...' if len(ops) > 40 else ''}. If this is a piece of a model whose "
            "forward Dynamo split at a graph break (TORCH_LOGS=graph_breaks shows where and why), kvpass needs the "
            "forward as one graph: fullgraph=True names the break"
        )
    return sites
