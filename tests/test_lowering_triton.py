"""lowering.triton_lowering: the kvpass ops' CUDA route through the kernels, and the reference switch."""

from __future__ import annotations

from unittest import mock

import kernel_helpers as kh  # noqa: I001  (sets TRITON_INTERPRET=1 before triton decorates the kernels)
import pytest
import torch
from kvpass.lowering import triton_lowering as TL
from test_kernels_elastic_drift import make_args

from kvpass.ops import REFERENCES
from kvpass.ops import dllm as ops_dllm
from kvpass.ops import kv as ops
from kvpass.policies import make_policy


def inputs(seed: int, t: int = 5, c: int = 9):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(2, 4, t, 16, generator=gen), *torch.randn(2, 2, 2, c + t, 16, generator=gen)
    return q, k, v, kh.random_pos(gen, 2, 2, c, t)


def test_cuda_implementations_are_registered():
    for op in ("kvpass::attend", "kvpass::compact", "kvpass::elastic_attend", "kvpass::score"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")


def test_cpu_ops_still_run_the_references():
    q, k, v, pos = inputs(0)
    spec = make_policy("snapkv", window=3).spec()
    got = torch.ops.kvpass.attend(q, k, v, pos, 0.25, spec, 0)
    ref = ops.attend_reference(q, k, v, pos, 0.25, spec, 0)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))


def test_kernel_route_matches_reference_and_env_forces_reference(monkeypatch):
    q, k, v, pos = inputs(1)
    for name, params in [("h2o", {}), ("epicache", {"window": 2, "scores": "forward"}), ("streaming_llm", {})]:
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
    assert TL.decompositions(cpu, inline_ops=True) == REFERENCES  # every op the passes insert
    with mock.patch.object(TL, "on_cuda", return_value=True):
        table = TL.decompositions(cpu, inline_ops=False)
        attend, compact, elastic, _ = TL.triton_ops()
        score = table.pop(torch.ops.kvpass.score.default)  # SnapKV prefill: the kernel; others: no decomposition
        assert table == {torch.ops.kvpass.attend.default: attend, torch.ops.kvpass.compact.default: compact,
                         torch.ops.kvpass.elastic_attend.default: elastic}
        obs, pos = torch.rand(1, 2, 6), torch.arange(6).expand(1, 2, 6).contiguous()
        keys = torch.empty(1, 2, 6, 4)
        assert score(make_policy("h2o").spec(), obs, keys, pos, torch.zeros(1, 2, 6), 6, 3) is NotImplemented
        inline = TL.decompositions(cpu, inline_ops=True)
        assert inline[torch.ops.kvpass.extend_meta.default] is REFERENCES[torch.ops.kvpass.extend_meta.default]
        h2o_args = (make_policy("h2o").spec(), obs, keys, pos, torch.zeros(1, 2, 6), 6, 3)
        assert all(torch.equal(a, b) for a, b in zip(inline[torch.ops.kvpass.score.default](*h2o_args),
                                                     ops.score_reference(*h2o_args), strict=True))
        with TL.forcing_reference(True):
            assert TL.decompositions(cpu, inline_ops=False) is None
        assert TL.decompositions(cpu, inline_ops=False).keys() == {*table, torch.ops.kvpass.score.default}
        monkeypatch.setenv(TL.ENV_REFERENCE, "1")
        assert TL.decompositions(cpu, inline_ops=False) is None


def test_triton_ops_run_eagerly_like_the_reference():
    q, k, v, pos = inputs(2, t=1, c=20)  # a decode step
    attend, compact, elastic, score = TL.triton_ops()
    spec = make_policy("tova").spec()
    for a, b in zip(attend(q, k, v, pos, 0.25, spec, 0), ops.attend_reference(q, k, v, pos, 0.25, spec, 0),
                    strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    keep, acc = torch.randn(pos.shape), torch.rand(pos.shape)
    got = compact(k, v, pos, keep, acc, 20, 20, 0)
    ref = ops.compact_reference(k, v, pos, keep, acc, 20, 20, 0)
    assert torch.equal(got[2][got[2] >= 0], ref[2][ref[2] >= 0])
    args = make_args(3, 1, 2, 20, 6, 16, 3, 4, torch.float32, pad=1)
    for a, b in zip(elastic(*args), ops_dllm.elastic_attend_reference(*args), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    spec = make_policy("snapkv", window=3).spec()
    obs, prefill_pos = torch.rand(2, 4, 14), kh.random_pos(torch.Generator().manual_seed(0), 2, 2, 0, 14)
    keys = torch.empty(2, 2, 14, 16)
    for a, b in zip(score(spec, obs, keys, prefill_pos, torch.zeros(2, 2, 14), 14, 6),
                    ops.score_reference(spec, obs, keys, prefill_pos, torch.zeros(2, 2, 14), 14, 6), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_score_route_runs_the_snapkv_kernel_on_prefills_only(monkeypatch):
    monkeypatch.delenv(TL.ENV_REFERENCE, raising=False)
    gen = torch.Generator().manual_seed(6)
    obs, keys = torch.rand(1, 4, 12, generator=gen), torch.empty(1, 2, 12, 16)
    pos, acc = kh.random_pos(gen, 1, 2, 0, 12), torch.rand(1, 2, 12, generator=gen)
    for name, params in [("snapkv", {"window": 4, "pooling": "max"}), ("pyramidkv", {"window": 3})]:
        spec = make_policy(name, **params).spec()
        ref = ops.score_reference(spec, obs, keys, pos, acc, 12, 5)
        with mock.patch.object(TL, "score_reference", side_effect=AssertionError("reference called")):
            got = TL._score_cuda(spec, obs, keys, pos, acc, 12, 5)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        with mock.patch.object(TL, "score_kernel", side_effect=AssertionError("kernel called")):
            for args in [(spec, obs, keys, pos, acc, 3, 5),  # a SnapKV decode / later block: the reference
                         (make_policy("h2o").spec(), obs, keys, pos, acc, 12, 5)]:  # another policy
                assert all(torch.equal(a, b) for a, b in zip(TL._score_cuda(*args), ops.score_reference(*args),
                                                             strict=True))
            with TL.forcing_reference():
                TL._score_cuda(spec, obs, keys, pos, acc, 12, 5)
    with pytest.raises(ValueError, match="SnapKV/PyramidKV prefills only; got policy .*h2o.* n_new=12"):
        TL.score_kernel(make_policy("h2o").spec(), obs, keys, pos, acc, 12, 5)


def test_elastic_kernel_route_and_forcing(monkeypatch):
    monkeypatch.delenv(TL.ENV_REFERENCE, raising=False)
    args = make_args(4, 2, 2, 16, 5, 16, 2, 3, torch.float32)
    ref = ops_dllm.elastic_attend_reference(*args)
    with mock.patch.object(TL, "elastic_attend_reference", side_effect=AssertionError("reference called")):
        got = TL._elastic_cuda(*args)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    with mock.patch.object(TL, "elastic_kernel", side_effect=AssertionError("kernel called")):
        with TL.forcing_reference():
            forced = TL._elastic_cuda(*args)
        monkeypatch.setenv(TL.ENV_REFERENCE, "1")
        assert all(torch.equal(a, b) for a, b in zip(TL._elastic_cuda(*args), ref, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(forced, ref, strict=True))


def test_reference_option_covers_compilation_and_every_call(monkeypatch):
    """What the backend's ``reference_kernels`` option does: compile, then run, with the references forced."""
    monkeypatch.delenv(TL.ENV_REFERENCE, raising=False)
    seen = []

    def compile_fn():
        seen.append(("compile", TL.reference_forced()))
        return lambda x: seen.append(("call", TL.reference_forced())) or x + 1

    for enabled in (True, False):
        seen.clear()
        fn = TL.compiled_with_reference(enabled, compile_fn)
        assert not TL.reference_forced()  # nothing leaks out of the compilation
        assert fn(1) == 2 and fn(2) == 3
        assert seen == [("compile", enabled), ("call", enabled), ("call", enabled)]
        assert not TL.reference_forced()
    # an enclosing forcing block (or the environment) wins over reference_kernels=False
    with TL.forcing_reference(True), TL.forcing_reference(False):
        assert TL.reference_forced()
    with pytest.raises(ValueError, match="reference_kernels must be True or False, got 'yes'"):
        TL.compiled_with_reference("yes", compile_fn)
    # the compiled function of a graph: the CUDA implementation it reaches runs the reference under the option
    q, k, v, pos = inputs(5)
    spec = make_policy("h2o").spec()
    with mock.patch.object(TL, "attend_kernel", side_effect=AssertionError("kernel called")):
        step = TL.compiled_with_reference(True, lambda: lambda: TL._attend_cuda(q, k, v, pos, 0.25, spec, 0))
        assert torch.equal(step()[1], ops.attend_reference(q, k, v, pos, 0.25, spec, 0)[1])


def test_elastic_cache_decodes_the_same_through_the_kernel(monkeypatch):
    """The shipped diffusion LM under Elastic-Cache: same tokens and same refresh decisions (drift tests)
    when every layer's ``kvpass::elastic_attend`` runs the kernels (as on CUDA) instead of the reference."""
    from kvpass.models.data.arithmetic import arithmetic_problems
    from kvpass.models.llada import load_llada

    from kvpass.apps.elastic import ElasticCacheGenerator, ElasticConfig

    monkeypatch.delenv(TL.ENV_REFERENCE, raising=False)
    model = load_llada()
    prompt = torch.tensor([arithmetic_problems(1, seed=1)[0].prompt_ids()])
    # one token per step: the shipped model's threshold decoding finishes in two steps, too few to see the drift
    # test decide both ways
    config = ElasticConfig(threshold=None)
    ref = ElasticCacheGenerator(model, config).generate(prompt, 24)
    gen = ElasticCacheGenerator(model, config)
    for layer in gen.program.layers:  # the CUDA implementation, run on CPU in the interpreter
        for node in layer.graph.nodes:
            if node.target is torch.ops.kvpass.elastic_attend.default:
                node.target = TL._elastic_cuda
        layer.recompile()
    with mock.patch.object(TL, "elastic_attend_reference", side_effect=AssertionError("reference called")):
        got = gen.generate(prompt, 24)
    assert torch.equal(got.tokens, ref.tokens)
    assert got.refresh_from == ref.refresh_from and got.nfe == ref.nfe
    # the drift tests decided both ways: some passed (no refresh, or one from a later layer), some failed
    assert any(r != 0 for r in ref.refresh_from[1:]) and any(r is not None for r in ref.refresh_from[1:])
