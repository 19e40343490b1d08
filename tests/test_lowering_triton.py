"""lowering.triton_lowering: the kvpass ops' CUDA route through the kernels, and the reference switch."""

from __future__ import annotations

from unittest import mock

import kernel_helpers as kh  # noqa: I001  (sets TRITON_INTERPRET=1 before triton decorates the kernels)
import torch
from kvpass.lowering import triton_lowering as TL

from kvpass import ops
from kvpass.policies import make_policy


def inputs(seed: int, t: int = 5, c: int = 9):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(2, 4, t, 16, generator=gen), *torch.randn(2, 2, 2, c + t, 16, generator=gen)
    return q, k, v, kh.random_pos(gen, 2, 2, c, t)


def test_cuda_implementations_are_registered():
    for op in ("kvpass::attend", "kvpass::compact"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")


def test_cpu_ops_still_run_the_references():
    q, k, v, pos = inputs(0)
    spec = make_policy("snapkv", window=3).spec()
    got = torch.ops.kvpass.attend(q, k, v, pos, 0.25, spec, 0)
    ref = ops.attend_reference(q, k, v, pos, 0.25, spec, 0)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))


def test_kernel_route_matches_reference_and_env_forces_reference(monkeypatch):
    q, k, v, pos = inputs(1)
    for name, params in [("h2o", {}), ("epicache", {"window": 2}), ("streaming_llm", {})]:
        spec = make_policy(name, **params).spec()
        ref = ops.attend_reference(q, k, v, pos, 0.25, spec, 4)
        monkeypatch.delenv(TL.ENV_REFERENCE, raising=False)
        with mock.patch.object(ops, "attend_reference", side_effect=AssertionError("reference called")):
            got = TL._attend_cuda(q, k, v, pos, 0.25, spec, 4)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
        monkeypatch.setenv(TL.ENV_REFERENCE, "1")
        forced = TL._attend_cuda(q, k, v, pos, 0.25, spec, 4)
        assert all(torch.equal(a, b) for a, b in zip(forced, ref, strict=True))
    keep, acc = torch.randn(pos.shape), torch.rand(pos.shape)
    monkeypatch.delenv(TL.ENV_REFERENCE)
    got = TL._compact_cuda(k, v, pos, keep, acc, 6, 8, 0)
    monkeypatch.setenv(TL.ENV_REFERENCE, "1")
    forced = TL._compact_cuda(k, v, pos, keep, acc, 6, 8, 0)
    with mock.patch.object(ops, "_FEW_EVICTIONS", -1):  # deterministic tie-breaking among empty slots
        ref = ops.compact_reference(k, v, pos, keep, acc, 6, 8, 0)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    assert torch.equal(forced[2], ops.compact_reference(k, v, pos, keep, acc, 6, 8, 0)[2])


def test_inductor_decompositions_per_device(monkeypatch):
    monkeypatch.delenv(TL.ENV_REFERENCE, raising=False)
    cpu = [torch.zeros(2)]
    assert TL.decompositions(cpu, inline_ops=False) is None  # CPU: unchanged (opaque ops)
    assert TL.decompositions(cpu, inline_ops=True) == ops.REFERENCES
    with mock.patch.object(TL, "on_cuda", return_value=True):
        table = TL.decompositions(cpu, inline_ops=False)
        attend, compact = TL.triton_ops()
        assert table == {torch.ops.kvpass.attend.default: attend, torch.ops.kvpass.compact.default: compact}
        assert TL.decompositions(cpu, inline_ops=True)[torch.ops.kvpass.score.default] is ops.score_reference
        monkeypatch.setenv(TL.ENV_REFERENCE, "1")
        assert TL.decompositions(cpu, inline_ops=False) is None


def test_triton_ops_run_eagerly_like_the_reference():
    q, k, v, pos = inputs(2, t=1, c=20)  # a decode step
    attend, compact = TL.triton_ops()
    spec = make_policy("tova").spec()
    for a, b in zip(attend(q, k, v, pos, 0.25, spec, 0), ops.attend_reference(q, k, v, pos, 0.25, spec, 0),
                    strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    keep, acc = torch.randn(pos.shape), torch.rand(pos.shape)
    got = compact(k, v, pos, keep, acc, 20, 20, 0)
    ref = ops.compact_reference(k, v, pos, keep, acc, 20, 20, 0)
    assert torch.equal(got[2][got[2] >= 0], ref[2][ref[2] >= 0])
