"""``--format jax``: the decomposed ATen graphs translated op by op into jitted JAX functions.

Each program is decomposed into core ATen (the ``kvpass::*`` ops replaced by their references), then
:func:`translate` maps every node to ``jax.numpy``/``jax.lax``. The result is serialized with
``jax.export`` (StableHLO + calling convention) next to the weights (``weights.npz``), so loading
needs JAX and NumPy only. Every node's result is cast to the dtype torch recorded for it, so torch's
type-promotion rules hold even where JAX's differ. int64 tensors need JAX's x64 mode, which the
exporter and the loader switch on. The prefill is exported for one ``--prompt-len``; with ``--prefill-block``
it is the (static) block program instead, which the loader loops over prompts of any length.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kvpass.lowering.export.base import ExportFormat, Progress
from kvpass.lowering.export.programs import Programs, decompose
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

WEIGHTS = "weights.npz"
aten = torch.ops.aten


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype


def _ops() -> dict[Any, Callable]:
    """ATen overload → JAX implementation (arguments as torch passes them, tensors as jax arrays)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def dims(x, dim):
        if dim is None or (isinstance(dim, list | tuple) and len(dim) == 0):
            return tuple(range(x.ndim))
        return tuple(d % x.ndim for d in dim) if isinstance(dim, list | tuple) else dim % x.ndim

    def expand(x, size):
        size = list(size)
        lead = len(size) - x.ndim
        return jnp.broadcast_to(x, [x.shape[i - lead] if s == -1 else s for i, s in enumerate(size)])

    def slice_(x, dim=0, start=None, end=None, step=1):
        index = [slice(None)] * x.ndim
        index[dim] = slice(start, end, step)
        return x[tuple(index)]

    def select(x, dim, index):
        return jnp.take(x, index, axis=dim)

    def cat(tensors, dim=0):
        kept = [t for t in tensors if not (t.ndim == 1 and t.shape[0] == 0)]  # torch skips legacy empty tensors
        return jnp.concatenate(kept, axis=dim % kept[0].ndim) if len(kept) > 1 else kept[0]

    def sort(x, dim=-1, descending=False, stable=False):
        idx = jnp.argsort(x, axis=dim, stable=True, descending=descending)
        return jnp.take_along_axis(x, idx, axis=dim), idx

    def topk(x, k, dim=-1, largest=True, sorted=True):
        moved = jnp.moveaxis(x, dim, -1)
        values, idx = lax.top_k(moved if largest else -moved, k)
        values = values if largest else -values
        return jnp.moveaxis(values, -1, dim), jnp.moveaxis(idx, -1, dim)

    def pad(x, pad, value=0.0):
        widths = [(0, 0)] * x.ndim
        for i in range(len(pad) // 2):
            widths[x.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1])
        if any(lo < 0 or hi < 0 for lo, hi in widths):
            raise NotImplementedError("negative constant_pad_nd")
        return jnp.pad(x, widths, constant_values=value)

    def window(x, kernel, stride, padding, init, op):
        kernel = list(kernel) * (2 // len(kernel))
        stride = list(stride or kernel) * (2 // len(stride or kernel))
        padding = list(padding) * (2 // len(padding))
        lead = x.ndim - 2
        return lax.reduce_window(x, init, op, (1,) * lead + tuple(kernel), (1,) * lead + tuple(stride),
                                 [(0, 0)] * lead + [(p, p) for p in padding])

    def avg_pool2d(x, kernel, stride=(), padding=(0,), ceil_mode=False, count_include_pad=True,
                   divisor_override=None):
        if ceil_mode:
            raise NotImplementedError("avg_pool2d with ceil_mode")
        total = window(x, kernel, stride, padding, 0.0, lax.add)
        if divisor_override:
            return total / divisor_override
        if count_include_pad:
            return total / math.prod(list(kernel) * (2 // len(kernel)))
        return total / window(jnp.ones_like(x), kernel, stride, padding, 0.0, lax.add)

    def max_pool2d(x, kernel, stride=(), padding=(0,), dilation=(1,), ceil_mode=False):
        if ceil_mode or any(d != 1 for d in dilation):
            raise NotImplementedError("max_pool2d with ceil_mode or dilation")
        return window(x, kernel, stride, padding, -jnp.inf, lax.max), None  # indices: not translated

    def reduce(fn):
        def run(x, dim=None, keepdim=False, dtype=None):
            return fn(x, axis=dims(x, dim), keepdims=keepdim)
        return run

    def norm(x, ord=2, dim=None, keepdim=False, dtype=None):
        return jnp.sum(jnp.abs(x) ** ord, axis=dims(x, dim), keepdims=keepdim) ** (1.0 / ord)

    def to_copy(x, dtype=None, **_):
        return x if dtype is None else x.astype(_np_dtype(dtype))

    def arange(start, end=None, step=1, dtype=None, **_):
        return jnp.arange(start, end, step, dtype=None if dtype is None else _np_dtype(dtype))

    def full(size, value, dtype=None, **_):
        return jnp.full(tuple(size), value, dtype=None if dtype is None else _np_dtype(dtype))

    def full_like(x, value, dtype=None, **_):
        return jnp.full(x.shape, value, dtype=x.dtype if dtype is None else _np_dtype(dtype))

    def div(a, b, rounding_mode=None):
        if rounding_mode == "floor":
            return jnp.floor_divide(a, b)
        if rounding_mode == "trunc":
            return jnp.trunc(a / b)
        return a / b

    def index_tensor(x, indices):
        return x[tuple(slice(None) if i is None else i for i in indices)]

    identity = lambda x, *a, **k: x
    table = {
        aten.view.default: lambda x, size: jnp.reshape(x, size),
        aten._unsafe_view.default: lambda x, size: jnp.reshape(x, size),
        aten.reshape.default: lambda x, size: jnp.reshape(x, size),
        aten.expand.default: lambda x, size, implicit=False: expand(x, size),
        aten.permute.default: lambda x, order: jnp.transpose(x, order),
        aten.t.default: lambda x: x.T,
        aten.transpose.int: lambda x, a, b: jnp.swapaxes(x, a, b),
        aten.unsqueeze.default: lambda x, d: jnp.expand_dims(x, d % (x.ndim + 1)),
        aten.squeeze.dims: lambda x, d: jnp.squeeze(x, tuple(i % x.ndim for i in d if x.shape[i] == 1)),
        aten.squeeze.dim: lambda x, d: jnp.squeeze(x, d) if x.shape[d] == 1 else x,
        aten.slice.Tensor: slice_,
        aten.select.int: select,
        aten.cat.default: cat,
        aten.clone.default: identity,
        aten.alias.default: identity,
        aten.contiguous.default: identity,
        aten.lift_fresh_copy.default: identity,
        aten._to_copy.default: to_copy,
        aten.arange.start_step: arange,
        aten.arange.start: lambda start, end, **k: arange(start, end, 1, **k),
        aten.arange.default: lambda end, **k: arange(0, end, 1, **k),
        aten.full.default: full,
        aten.full_like.default: full_like,
        aten.zeros_like.default: lambda x, dtype=None, **k: full_like(x, 0, dtype),
        aten.ones_like.default: lambda x, dtype=None, **k: full_like(x, 1, dtype),
        aten.scalar_tensor.default: lambda v, dtype=None, **k: jnp.asarray(v, None if dtype is None
                                                                           else _np_dtype(dtype)),
        aten.add.Tensor: lambda a, b, alpha=1: a + (b if alpha == 1 else alpha * b),
        aten.add.Scalar: lambda a, b, alpha=1: a + alpha * b,
        aten.sub.Tensor: lambda a, b, alpha=1: a - (b if alpha == 1 else alpha * b),
        aten.sub.Scalar: lambda a, b, alpha=1: a - alpha * b,
        aten.rsub.Scalar: lambda a, b, alpha=1: b - alpha * a,
        aten.mul.Tensor: operator.mul,
        aten.mul.Scalar: operator.mul,
        aten.div.Tensor: div,
        aten.div.Scalar: div,
        aten.div.Tensor_mode: div,
        aten.neg.default: operator.neg,
        aten.abs.default: jnp.abs,
        aten.exp.default: jnp.exp,
        aten.log.default: jnp.log,
        aten.sqrt.default: jnp.sqrt,
        aten.rsqrt.default: lax.rsqrt,
        aten.pow.Tensor_Scalar: lambda x, e: x**e,
        aten.pow.Tensor_Tensor: lambda x, e: x**e,
        aten.cos.default: jnp.cos,
        aten.sin.default: jnp.sin,
        aten.tanh.default: jnp.tanh,
        aten.sigmoid.default: jax.nn.sigmoid,
        aten.maximum.default: jnp.maximum,
        aten.minimum.default: jnp.minimum,
        aten.clamp.default: lambda x, lo=None, hi=None: jnp.clip(x, lo, hi),
        aten.eq.Scalar: operator.eq,
        aten.eq.Tensor: operator.eq,
        aten.ne.Scalar: operator.ne,
        aten.ne.Tensor: operator.ne,
        aten.ge.Scalar: operator.ge,
        aten.ge.Tensor: operator.ge,
        aten.gt.Scalar: operator.gt,
        aten.gt.Tensor: operator.gt,
        aten.le.Scalar: operator.le,
        aten.le.Tensor: operator.le,
        aten.lt.Scalar: operator.lt,
        aten.lt.Tensor: operator.lt,
        aten.bitwise_and.Tensor: jnp.bitwise_and,
        aten.bitwise_or.Tensor: jnp.bitwise_or,
        aten.bitwise_not.default: jnp.bitwise_not,
        aten.logical_not.default: jnp.logical_not,
        aten.logical_and.default: jnp.logical_and,
        aten.logical_or.default: jnp.logical_or,
        aten.where.self: jnp.where,
        aten.any.dim: lambda x, dim, keepdim=False: jnp.any(x, axis=dim % x.ndim, keepdims=keepdim),
        aten.any.dims: lambda x, dim=None, keepdim=False: jnp.any(x, axis=dims(x, dim), keepdims=keepdim),
        aten.any.default: lambda x: jnp.any(x),
        aten.all.default: lambda x: jnp.all(x),
        aten.amax.default: reduce(jnp.max),
        aten.amin.default: reduce(jnp.min),
        aten.argmin.default: lambda x, dim=None, keepdim=False: jnp.argmin(
            x, axis=None if dim is None else dim % x.ndim, keepdims=keepdim),
        aten.argmax.default: lambda x, dim=None, keepdim=False: jnp.argmax(
            x, axis=None if dim is None else dim % x.ndim, keepdims=keepdim),
        aten.sum.dim_IntList: reduce(jnp.sum),
        aten.sum.default: lambda x, dtype=None: jnp.sum(x),
        aten.mean.dim: reduce(jnp.mean),
        aten.cumsum.default: lambda x, dim, dtype=None: jnp.cumsum(x, axis=dim % x.ndim),
        aten.linalg_vector_norm.default: norm,
        aten._softmax.default: lambda x, dim, half_to_float=False: jax.nn.softmax(x, axis=dim),
        aten._log_softmax.default: lambda x, dim, half_to_float=False: jax.nn.log_softmax(x, axis=dim),
        aten.mm.default: jnp.matmul,
        aten.bmm.default: jnp.matmul,
        aten.addmm.default: lambda bias, a, b, beta=1, alpha=1: beta * bias + alpha * (a @ b),
        aten.embedding.default: lambda w, idx, *a: jnp.take(w, idx, axis=0),
        aten.gather.default: lambda x, dim, idx, sparse_grad=False: jnp.take_along_axis(x, idx, axis=dim),
        aten.index_select.default: lambda x, dim, idx: jnp.take(x, idx, axis=dim),
        aten.index.Tensor: index_tensor,
        aten.sort.default: sort,
        aten.sort.stable: lambda x, stable=None, dim=-1, descending=False: sort(x, dim, descending),
        aten.topk.default: topk,
        aten.constant_pad_nd.default: pad,
        aten.avg_pool2d.default: avg_pool2d,
        aten.max_pool2d_with_indices.default: max_pool2d,
    }
    return table


def _unsupported(ep: ExportedProgram, table: dict) -> list[str]:
    skip = {operator.getitem, aten._assert_tensor_metadata.default, aten.sym_constrain_range_for_size.default}
    return sorted({str(n.target) for n in ep.graph.nodes
                   if n.op == "call_function" and n.target not in table and n.target not in skip})


def translate(ep: ExportedProgram) -> tuple[Callable, dict[str, np.ndarray]]:
    """A JAX function ``fn(weights: dict, *user_inputs) -> tuple`` computing ``ep`` (core ATen, static shapes),
    and the weights (parameters, buffers, constants) it takes."""
    import jax.numpy as jnp

    table = _ops()
    missing = _unsupported(ep, table)
    if missing:
        raise ValueError(f"kvpass export --format jax: the decomposed program calls {missing}, which the JAX "
                         "translation does not cover")
    sig = ep.graph_signature
    state = {**ep.state_dict, **ep.constants}
    weights: dict[str, np.ndarray] = {}
    bindings: list[tuple[str, str | None]] = []  # (placeholder name, weight key or None for a user input)
    for spec in sig.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            bindings.append((spec.arg.name, None))
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            weights[spec.target] = state[spec.target].detach().numpy()
            bindings.append((spec.arg.name, spec.target))
        else:
            raise ValueError(f"kvpass export --format jax: unsupported program input {spec.kind} ({spec.arg.name})")
    if any(spec.kind != OutputKind.USER_OUTPUT for spec in sig.output_specs):
        raise ValueError("kvpass export --format jax: the program mutates its inputs; only functional programs "
                         "translate")
    nodes = list(ep.graph.nodes)

    def run(params: dict[str, Any], *inputs: Any) -> tuple:
        env: dict[Any, Any] = {}
        user = iter(inputs)
        for name, key in bindings:
            env[name] = params[key] if key is not None else next(user)

        def value(a):
            if isinstance(a, torch.fx.Node):
                return env[a.name]
            if isinstance(a, list | tuple):
                return type(a)(value(x) for x in a)
            return a

        for node in nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                return tuple(value(a) for a in node.args[0])
            if node.target is operator.getitem:
                env[node.name] = value(node.args[0])[node.args[1]]
                continue
            if node.target is aten._assert_tensor_metadata.default:
                continue
            kwargs = {k: value(v) for k, v in node.kwargs.items()
                      if k not in ("device", "layout", "pin_memory", "memory_format", "non_blocking")}
            result = table[node.target](*value(node.args), **kwargs)
            meta = node.meta.get("val")
            if isinstance(meta, torch.Tensor):
                result = jnp.asarray(result).astype(_np_dtype(meta.dtype))
                if tuple(result.shape) != tuple(meta.shape):
                    raise RuntimeError(f"kvpass jax translation: {node.target} at {node.name} gave shape "
                                       f"{tuple(result.shape)}, torch recorded {tuple(meta.shape)}")
            elif isinstance(meta, list | tuple):
                result = tuple(jnp.asarray(r).astype(_np_dtype(m.dtype)) if isinstance(m, torch.Tensor) else r
                               for r, m in zip(result, meta, strict=True))
            env[node.name] = result
        raise RuntimeError("kvpass jax translation: graph has no output")

    return run, weights


def _x64() -> None:
    import jax

    jax.config.update("jax_enable_x64", True)  # int64 positions / ids / metadata, as torch has them


def write(programs: Programs, out: Path, progress: Progress) -> list[str]:
    import jax

    _x64()
    progress.add(3)
    weights: dict[str, np.ndarray] = {}
    files = []
    for name, ep, example in (("prefill", programs.prefill, programs.prefill_example),
                              ("decode", programs.decode, programs.decode_example)):
        progress.start(f"decomposing and translating {name} to JAX")
        fn, w = translate(decompose(ep))
        for key, arr in w.items():
            if key in weights and not np.array_equal(weights[key], arr):
                raise RuntimeError(f"kvpass export --format jax: weight {key!r} differs between the programs")
            weights[key] = arr
        shapes = [jax.ShapeDtypeStruct(t.shape, _np_dtype(t.dtype)) for t in example]
        w_shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in w.items()}
        exported = jax.export.export(jax.jit(fn))(w_shapes, *shapes)
        (out / f"{name}.jaxexport").write_bytes(exported.serialize())
        files.append(f"{name}.jaxexport")
        progress.done()
    progress.start("saving weights")
    np.savez(out / WEIGHTS, **weights)
    progress.done()
    return [*files, WEIGHTS]


class JaxRunner:
    """Calls the deserialized ``jax.export`` programs; the state stays JAX arrays between calls."""

    def __init__(self, path: Path) -> None:
        import jax

        _x64()
        self._prefill = jax.export.deserialize(bytearray((path / "prefill.jaxexport").read_bytes()))
        self._decode = jax.export.deserialize(bytearray((path / "decode.jaxexport").read_bytes()))
        with np.load(path / WEIGHTS) as data:
            self._all = {k: jax.numpy.asarray(data[k]) for k in data.files}

    def prefill(self, ids: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, Any]:
        logits, *state = self._prefill.call(self._params(self._prefill), ids, positions)
        return np.asarray(logits)[0, -1], state

    def decode(self, ids: np.ndarray, positions: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        logits, *state = self._decode.call(self._params(self._decode), ids, positions, *state)
        return np.asarray(logits)[0, -1], state

    def prefill_block(self, ids: np.ndarray, positions: np.ndarray, valid: np.ndarray, observe: np.ndarray,
                      state: Any) -> tuple[np.ndarray, Any]:
        state = [s.numpy() if isinstance(s, torch.Tensor) else s for s in state]  # the first block's: torch
        logits, *state = self._prefill.call(self._params(self._prefill), ids, positions, valid, observe, *state)
        return np.asarray(logits)[0, -1], state

    def _params(self, exported) -> dict:
        import jax

        params_tree = jax.tree_util.tree_unflatten(exported.in_tree, list(range(len(exported.in_avals))))[0][0]
        return {k: self._all[k] for k in params_tree}


def load(path: Path, manifest: dict) -> JaxRunner:
    return JaxRunner(path)


FORMAT = ExportFormat(
    name="jax",
    description="jitted JAX functions (jax.export, StableHLO) translated from the decomposed ATen programs",
    requires=("jax", "flatbuffers"),
    install="pip install jax flatbuffers",
    dynamic_prompt=False,
    keeps_kvpass_ops=False,
    runnable=True,
    prefill_block=True,
    write=write,
    load=load,
)
