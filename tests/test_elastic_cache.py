"""kvpass/ops_dllm.py, kvpass/passes/refresh_dllm_kv.py, kvpass/elastic.py (Elastic-Cache)."""

import math

import pytest
import torch
import torch.nn.functional as F
from kvpass.models.data.arithmetic import MASK, VOCAB, arithmetic_problems
from kvpass.models.llada import LLaDAConfig, LLaDAModelLM, load_llada
from kvpass.models.llada_generate import generate_window
from torch import nn

from kvpass.analysis import UnsupportedGraph
from kvpass.apps.elastic import BOUNDARIES, DRIFTS, ElasticCacheGenerator, ElasticConfig, export_dllm
from kvpass.ops.dllm import elastic_attend, elastic_attend_reference
from kvpass.passes.refresh_dllm_kv import STATE_OUTPUTS, RefreshDLLMKV


def tiny(seed: int = 0, layers: int = 3) -> LLaDAModelLM:
    torch.manual_seed(seed)
    return LLaDAModelLM(LLaDAConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=layers, num_attention_heads=2)).eval()


def op_args(n: int = 12, rows=(3, 5, 7, 9), b: int = 1, h: int = 2, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = torch.tensor(rows)
    q, k, v = (torch.randn(b, h, len(rows), d, generator=g) for _ in range(3))
    kc, vc, qc = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    track = r[:2]
    excluded = torch.zeros(n, dtype=torch.bool)
    excluded[r[2:]] = True
    return (q, k, v, r, kc, vc, qc, track, torch.tensor([1.0, 0.0]), torch.tensor([2, 3]),
            torch.tensor([1.0, 1.0]), excluded)


def test_opcheck():
    torch.library.opcheck(elastic_attend, op_args(),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_reference_semantics():
    args = op_args()
    q, k, v, rows, kc, vc, qc, track, tw, win, ww, excluded = args
    out, k2, v2, q2, sim, score = elastic_attend_reference(*args)
    assert torch.equal(k2[:, :, rows], k) and torch.equal(k2[:, :, 0], kc[:, :, 0])
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k2, v2))
    # the drift statistic: only the weighted tracked token (rows[0]) counts
    scale = q.shape[-1] ** -0.5
    before = torch.softmax(qc[:, :, 3:4] @ kc.transpose(-2, -1) * scale, -1)
    after = torch.softmax(q[:, :, 0:1] @ k2.transpose(-2, -1) * scale, -1)
    assert sim.shape == (2,)
    torch.testing.assert_close(sim[0], F.cosine_similarity(before, after, dim=1).mean())    # "heads"
    torch.testing.assert_close(sim[1], F.cosine_similarity(before, after, dim=-1).mean())   # "keys"
    assert torch.all(score[excluded] == -1) and torch.all(score[~excluded] > 0)
    expected = torch.softmax(q[:, :, 2:] @ k2.transpose(-2, -1) * scale, -1).sum(dim=(0, 1, 2))
    torch.testing.assert_close(score[~excluded], expected[~excluded])
    # nothing moved => similarity 1; nothing tracked => 1 by definition
    same = (qc[:, :, rows], kc[:, :, rows], vc[:, :, rows], *args[3:])
    torch.testing.assert_close(elastic_attend_reference(*same)[4], torch.ones(2), atol=1e-6, rtol=0)
    untracked = (*args[:8], torch.zeros(2), *args[9:])
    assert torch.equal(elastic_attend_reference(*untracked)[4], torch.ones(2))


def reference_drift_test(q_cache, k_cache, q_rows, k_new, n_track: int) -> torch.Tensor:
    """A transcription of the drift test in Elastic-Cache's ``LLaDABlock.attention``
    (VILA-Lab/Elastic-Cache, llada/model/modeling_llada.py): the step's query rows start with the tracked tokens
    (``query_position = cat([track_position, new_decoded_position, query_masked_position])`` in
    llada/generate.py), ``past_q``/``past_k`` are the caches before the step's rows are written."""
    past_q = q_cache[:, :, :n_track, :]  # q_cache[:, :, track_position, :] (the caller passes them first)
    past_k = k_cache
    scale_factor = 1 / math.sqrt(past_q.size(-1))
    att_weight = torch.softmax(q_rows @ k_new.transpose(-2, -1) * scale_factor, dim=-1)
    att_weight = att_weight[:, :, :n_track, :]
    past_att_weight = torch.softmax(past_q @ past_k.transpose(-2, -1) * scale_factor, dim=-1)
    return F.cosine_similarity(past_att_weight, att_weight, dim=1).mean()


@pytest.mark.parametrize(("b", "h", "sharp"), [(1, 4, 1.0), (2, 3, 1.0), (1, 4, 20.0)])
def test_drift_statistics_match_the_reference_and_the_keys_rule(b, h, sharp):
    """sim[0] ("heads", the default) == the reference's arithmetic; sim[1] ("keys") == kvpass's earlier rule.
    ``sharp`` scales the queries so that some keys get probability < 1e-8 in every head (the clamp in torch's
    cosine_similarity, which the reference inherits, then counts them as cosine ~0)."""
    g = torch.Generator().manual_seed(11)
    n, d, n_track, n_other, n_win = 30, 8, 3, 2, 4
    rows = torch.randperm(n, generator=g)[: n_track + n_other + n_win]   # [track, newly decoded, window]
    q, k, v = (torch.randn(b, h, len(rows), d, generator=g) for _ in range(3))
    kc, vc, qc = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    q, qc = q * sharp, qc * sharp
    excluded = torch.zeros(n, dtype=torch.bool)
    excluded[rows[n_track + n_other:]] = True
    win = torch.arange(n_track + n_other, len(rows))
    args = (q, k, v, rows, kc, vc, qc, rows[:n_track], torch.ones(n_track), win, torch.ones(n_win), excluded)
    sim = elastic_attend_reference(*args)[4]
    k_new = kc.index_copy(2, rows, k)
    want = reference_drift_test(qc[:, :, rows], kc, q, k_new, n_track)
    torch.testing.assert_close(sim[DRIFTS.index("heads")], want)
    # kvpass's earlier statistic: each head's attention row compared across the keys, mean over heads and tokens
    scale = d ** -0.5
    before = torch.softmax(qc[:, :, rows[:n_track]] @ kc.transpose(-2, -1) * scale, -1)
    after = torch.softmax(q[:, :, :n_track] @ k_new.transpose(-2, -1) * scale, -1)
    torch.testing.assert_close(sim[DRIFTS.index("keys")], F.cosine_similarity(before, after, dim=-1).mean())
    if sharp > 1:   # the clamp matters here: the reference's statistic is well below the unclamped cosine
        assert float((before.norm(dim=1) < 1e-8).float().mean()) > 0.2
        unclamped = F.cosine_similarity(before.double(), after.double(), dim=1, eps=1e-300).mean()
        assert float(sim[0]) < float(unclamped) - 0.1
    # a padding tracked slot (weight 0) changes neither statistic
    padded = (q, k, v, rows, kc, vc, qc, torch.cat([rows[:n_track], rows[:1]]), torch.tensor([1.0] * n_track + [0.0]),
              win, torch.ones(n_win), excluded)
    torch.testing.assert_close(elastic_attend_reference(*padded)[4], sim)


def test_pass_rewrites_every_layer_and_full_rows_equal_the_model():
    m = tiny()
    rp = RefreshDLLMKV()
    prog = rp(export_dllm(m))
    assert rp.counters == {"attention_sites": 3, "layer_graphs": 3}
    assert (prog.n_heads, prog.head_dim) == (2, 16) and len(prog.layers) == 3
    for layer in prog.layers:
        assert any(n.target is torch.ops.kvpass.elastic_attend.default for n in layer.graph.nodes)
    assert rp.uuid().startswith("RefreshDLLMKV:v2")
    # every row through every rewritten layer over fresh caches == the original forward
    gen = ElasticCacheGenerator(m)
    n = 10
    x = torch.randint(0, len(VOCAB), (1, n))
    pos = torch.arange(n)
    pro = gen._prologue(x, pos[None])
    h = pro[prog.hidden_from_prologue]
    kc, vc, qc = ([torch.zeros(1, 2, n, 16) for _ in range(3)] for _ in range(3))
    xc = [torch.zeros(1, n, 32) for _ in range(3)]
    one = torch.zeros(1, dtype=torch.long)
    for i in range(3):
        h, _, _ = gen._call(i, (x, pos[None]), pro, h, pos, kc, vc, qc, xc, one, torch.zeros(1), one, torch.ones(1),
                            torch.zeros(n, dtype=torch.bool))
    with torch.no_grad():
        torch.testing.assert_close(gen._epilogue((x, pos[None]), pro, h), m(x, pos[None]), rtol=0, atol=0)
    assert len(STATE_OUTPUTS) == 6


class _CausalBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, h):
        q = self.proj(h).view(1, -1, 2, 4).transpose(1, 2)
        return h + F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(1, -1, 8)


class _CausalModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_CausalBlock(), _CausalBlock()])

    def forward(self, input_ids, position_ids):
        h = input_ids[..., None].float().expand(-1, -1, 8) + position_ids[..., None]
        for layer in self.layers:
            h = layer(h)
        return h


def test_pass_rejects_causal_attention():
    with pytest.raises(UnsupportedGraph, match="is_causal=True"):
        RefreshDLLMKV()(export_dllm(_CausalModel()))


@pytest.mark.parametrize("seed", [0, 1])
def test_always_refresh_equals_no_cache_exactly(seed):
    # gamma above 1: every step's drift test fails at layer 0; with the fresh boundary (a departure) every
    # position is then recomputed from layer 0 on
    m = tiny(seed=seed)
    gen = ElasticCacheGenerator(m, ElasticConfig(gamma=2.0, boundary="fresh"))
    p = arithmetic_problems(1, seed=seed)[0]
    prompt = torch.tensor([p.prompt_ids()])
    ref = generate_window(m, prompt, gen_length=40)
    out = gen.generate(prompt, 40)
    assert torch.equal(out.tokens, ref.tokens) and out.nfe == ref.nfe
    n, layers = prompt.shape[1] + 40, 3
    assert out.refresh_from == [0] * out.nfe and out.step_rows[0] == n
    assert out.token_layers == n * layers * out.nfe + sum(out.step_rows[1:])   # + layer 0's drift test
    # the reference's cached boundary: layer 0 runs the step rows only, every position from layer 1 on
    out = ElasticCacheGenerator(m, ElasticConfig(gamma=2.0)).generate(prompt, 40)
    assert out.refresh_from == [0] + [1] * (out.nfe - 1) and out.step_rows[0] == n
    assert out.token_layers == n * layers + sum(rows + n * (layers - 1) for rows in out.step_rows[1:])


def test_always_refresh_equals_no_cache_on_the_shipped_model():
    m = load_llada()
    gen = ElasticCacheGenerator(m, ElasticConfig(gamma=2.0, boundary="fresh"))
    for p in arithmetic_problems(2, seed=5):
        prompt = torch.tensor([p.prompt_ids()])
        assert torch.equal(gen.generate(prompt, 64).tokens, generate_window(m, prompt, gen_length=64).tokens)


def test_one_token_per_step_mode():
    m = load_llada()
    p = arithmetic_problems(1, seed=6)[0]
    prompt = torch.tensor([p.prompt_ids()])
    ref = generate_window(m, prompt, gen_length=48, threshold=None)
    assert ref.nfe == int((ref.tokens[0, prompt.shape[1]:] != MASK).sum())   # one commit per step
    # refresh every step; with the fresh boundary from layer 0 on: exactly no-cache decoding
    out = ElasticCacheGenerator(m, ElasticConfig(gamma=2.0, threshold=None, boundary="fresh")).generate(prompt, 48)
    assert torch.equal(out.tokens, ref.tokens)
    # the reference's (cached) boundary refreshes from layer 1 on: layer 1's cached inputs may be stale
    out = ElasticCacheGenerator(m, ElasticConfig(gamma=2.0, threshold=None)).generate(prompt, 48)
    assert out.refresh_from[1:] == [1] * (out.nfe - 1)
    with pytest.raises(ValueError, match="tokens_per_step=0"):
        ElasticConfig(threshold=None, tokens_per_step=0)


def test_never_refresh_reuses_every_cache():
    m = tiny()
    gen = ElasticCacheGenerator(m, ElasticConfig(gamma=-2.0))
    prompt = torch.tensor([arithmetic_problems(1)[0].prompt_ids()])
    out = gen.generate(prompt, 48)
    n, layers = prompt.shape[1] + 48, 3
    assert out.refresh_from == [0] + [None] * (out.nfe - 1)
    assert out.token_layers == n * layers + layers * sum(out.step_rows[1:])
    assert max(out.step_rows[1:]) <= 3 + 2 * 16      # tracked + committed last step + window


def test_refresh_boundaries_and_depth():
    m = load_llada()
    p = arithmetic_problems(1, seed=8)[0]
    prompt = torch.tensor([p.prompt_ids()])
    ref = generate_window(m, prompt, gen_length=64)
    for boundary in ("fresh", "cached"):
        out = ElasticCacheGenerator(m, ElasticConfig(gamma=0.999, boundary=boundary)).generate(prompt, 64)
        depths = [d for d in out.refresh_from[1:] if d is not None]
        assert depths, "a strict gamma must trigger refreshes"
        assert all(0 <= d <= m.config.num_hidden_layers for d in depths)
        assert (out.tokens == ref.tokens).float().mean() > 0.8
        # accounting: step rows through the layers before the refresh (and, with the fresh boundary, through
        # the failing layer too), every position through the refreshed layers
        n, layers = ref.tokens.shape[1], m.config.num_hidden_layers
        expected = n * layers
        for first, rows in zip(out.refresh_from[1:], out.step_rows[1:], strict=True):
            if first is None:
                expected += rows * layers
            else:
                expected += rows * (first + (boundary == "fresh")) + n * (layers - first)
        assert out.token_layers == expected


def test_compiled_layers_do_not_recompile_per_step():
    m = tiny()
    gen = ElasticCacheGenerator(m, ElasticConfig(gamma=0.999, compile="aot_eager"))
    prompt = torch.tensor([arithmetic_problems(1)[0].prompt_ids()])
    eager = ElasticCacheGenerator(m, ElasticConfig(gamma=0.999)).generate(prompt, 40)
    torch._dynamo.utils.counters.clear()
    first = gen.generate(prompt, 40)
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 0 < compiled <= 2 * 3          # at most (step rows, all rows) per layer
    gen.generate(torch.tensor([arithmetic_problems(1, seed=3)[0].prompt_ids()]), 40)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled
    assert torch.equal(first.tokens, eager.tokens)
    assert set(first.step_rows[1:]) == {3 + 2 * 16}   # static row budget when compiled


def test_defaults_are_the_reference_rule():
    cfg = ElasticConfig()
    assert (cfg.drift, cfg.boundary) == ("heads", "cached") == (DRIFTS[0], BOUNDARIES[0])
    assert (cfg.window, cfg.gamma, cfg.threshold, cfg.track_num) == (16, 0.9, 0.9, 1)


@pytest.mark.parametrize("drift", DRIFTS)
def test_gamma_tests_the_chosen_drift_statistic(drift):
    """Each step's refresh starts after the first layer whose ``sim[drift]`` is below gamma (cached boundary), or
    at that layer (fresh boundary); layers after it are not tested."""
    m = load_llada()
    prompt = torch.tensor([arithmetic_problems(1, seed=8)[0].prompt_ids()])
    for boundary in BOUNDARIES:
        gen = ElasticCacheGenerator(m, ElasticConfig(gamma=0.8, threshold=None, drift=drift, boundary=boundary))
        calls = []
        run = gen._call

        def record(layer, inputs, pro, h, rows, *rest, run=run, calls=calls):
            out = run(layer, inputs, pro, h, rows, *rest)
            calls.append((layer, len(rows), out[1].clone()))
            return out

        gen._call = record
        out = gen.generate(prompt, 32)
        n = prompt.shape[1] + 32
        steps, cur = [], None
        for layer, n_rows, sim in calls:
            if layer == 0 and (n_rows < n or not steps):   # a step starts (not the fresh boundary's layer-0 redo)
                cur = []
                steps.append(cur)
            if n_rows < n:   # a tested layer (step rows); full-row layers are refreshes
                cur.append(sim[DRIFTS.index(drift)])
        assert len(steps) == out.nfe
        for tested, first in zip(steps[1:], out.refresh_from[1:], strict=True):
            failed = [i for i, s in enumerate(tested) if float(s) < 0.8]
            if first is None:
                assert not failed
            else:
                assert failed == [len(tested) - 1] and first == failed[0] + (boundary == "cached")
        if drift == "heads":   # on this sharply attending model the reference's statistic is low: refreshes
            assert sum(f is not None for f in out.refresh_from[1:]) > 0


def test_bad_config_and_input():
    with pytest.raises(ValueError, match=r"boundary='nope'; valid: \('cached', 'fresh'\)"):
        ElasticConfig(boundary="nope")
    with pytest.raises(ValueError, match=r"drift='head'; valid: \('heads', 'keys'\)"):
        ElasticConfig(drift="head")
    with pytest.raises(ValueError, match="window=0"):
        ElasticConfig(window=0)
    with pytest.raises(ValueError, match="threshold=1.5"):
        ElasticConfig(threshold=1.5)
    gen = ElasticCacheGenerator(tiny())
    with pytest.raises(ValueError, match="one prompt"):
        gen.generate(torch.zeros(2, 5, dtype=torch.long), 8)
