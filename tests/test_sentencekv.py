"""Policy ``sentencekv``: SentenceKV's retrieval over a tiered store, checked against a literal re-implementation of
the reference's attention (zzbright1998/SentenceKV, ``custom_llama_sentencekv.py``, ``LlamaAttention.forward``) run
inside HF's own model.

The oracle keeps the whole KV cache, as the reference does, and masks: at prefill it records SnapKV's kept slots per
head and each sentence's abstract; each decode step attends to the first ``sinks`` kept slots, the ``recent`` newest
and the retrieved sentences' tokens (or to every kept slot while the sentence is short). kvpass must give the same
greedy tokens and logits, with the kept tokens split between a 63-slot device store and the lower tier.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import family_model, tiny_model

import kvpass
from kvpass.errors import OptionError, UnsupportedGraph

ENDS = [5, 7, 9, 11, 13]
SENTENCEKV = {"policy": "sentencekv", "offload": "cpu", "sentence_ends": ENDS, "compiler": "aot_eager"}


class ReferenceSentenceKV:
    """The reference's per-layer rules for batch 1. It repeats the kv heads and keeps SnapKV's choice per query head;
    ``group_mean`` averages SnapKV's pooled scores over each GQA group first, as kvpass's per-kv-head stores do (the
    same without GQA)."""

    def __init__(self, budget: int, semantic_factor: float, sinks: int = 32, recent: int = 32, window: int = 32,
                 kernel: int = 7, threshold: int = 1, group_mean: bool = True) -> None:
        self.budget, self.factor, self.sinks, self.recent = budget, semantic_factor, sinks, recent
        self.window, self.kernel, self.threshold, self.group_mean = window, kernel, threshold, group_mean
        self.ids: torch.Tensor | None = None  # the forward's input ids, set before each call
        self.layers: dict[int, dict] = {}

    def attention(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        q_len, state = query.shape[2], self.layers.setdefault(module.layer_idx, {})
        group = query.shape[1] // key.shape[1]
        self.kv_heads = key.shape[1]
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)  # (repeat_kv)
        logits = (query @ key.transpose(2, 3)) * scaling  # key/value: every token so far
        if q_len > 1:
            n = key.shape[2]
            causal = torch.ones(q_len, n, dtype=torch.bool).tril(n - q_len)
            out = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1) @ value
            self._prefill(state, query, key, scaling)
        else:
            out = torch.softmax(logits + self._step_mask(state, query, key), dim=-1) @ value
        return out.transpose(1, 2).contiguous(), None

    def _prefill(self, state, query, key, scaling) -> None:
        n, w = key.shape[2], self.window
        semantic = int(self.budget * self.factor)
        if self.factor and n >= w:
            obs = (query[..., -w:, :] @ key.transpose(2, 3)) * scaling
            obs[..., -w:] += torch.full((w, w), float("-inf")).triu(1)
            weights = torch.softmax(obs, dim=-1)[..., : n - w].sum(dim=-2)
            pooled = F.max_pool1d(weights, self.kernel, padding=self.kernel // 2, stride=1)
            if self.group_mean:
                group = query.shape[1] // self.kv_heads
                pooled = pooled.view(1, self.kv_heads, group, -1).mean(2).repeat_interleave(group, dim=1)
            # (max pooling makes ties; torch.topk breaks them as it may, kvpass keeps the earliest: so does this)
            top = pooled.sort(dim=-1, descending=True, stable=True).indices[..., : min(max(semantic - w, 1), n - w)]
            top = top.sort(dim=-1).values
            kept = torch.cat([top, torch.arange(n - w, n).expand(*top.shape[:2], w)], dim=-1)[0]  # [H, kept]
        else:
            kept = torch.arange(n).expand(key.shape[1], n)
        ids = self.ids[0].tolist()
        cuts = [0] + [i + 1 for i, t in enumerate(ids) if t in ENDS]
        if cuts[-1] < len(ids):
            cuts.append(len(ids))
        owner = torch.searchsorted(torch.tensor(cuts), kept, right=True) - 1
        n_sent = len(cuts) - 1
        cap = max(100, (kept.shape[1] // n_sent) * 2 + 50)
        state.update(slots=[kept[h].tolist() for h in range(kept.shape[0])], cap=cap, open=[],
                     means=[], tokens=[])
        for h in range(kept.shape[0]):
            k = key[0, h, kept[h]]
            state["means"].append([k[owner[h] == s].mean(0) if (owner[h] == s).any() else torch.zeros(k.shape[-1])
                                   for s in range(n_sent)])
            state["tokens"].append([torch.nonzero(owner[h] == s).flatten()[:cap].tolist() for s in range(n_sent)])

    def _step_mask(self, state, query, key) -> torch.Tensor:
        heads, n = query.shape[1], key.shape[2]
        token, position = int(self.ids[0, -1]), n - 1
        for h in range(heads):
            state["slots"][h].append(position)
        state["open"].append((query[0, :, 0].float(), len(state["slots"][0]) - 1))
        if token in ENDS:
            slots = [s for _, s in state["open"]]
            for h in range(heads):
                positions = [state["slots"][h][s] for s in slots]
                state["means"][h].append(key[0, h, positions].mean(0))
                state["tokens"][h].append(slots if len(slots) <= state["cap"] else [])
            state["open"] = []
        kv_len = len(state["slots"][0])
        mask = torch.full((1, heads, 1, n), float("-inf"))
        local = set(range(min(self.sinks, kv_len))) | set(range(max(0, kv_len - self.recent), kv_len))
        for h in range(heads):
            chosen = set(local)
            if len(state["open"]) <= self.threshold:
                chosen = set(range(kv_len))
            else:
                q = torch.stack([q for q, _ in state["open"]]).mean(0)[h]
                scores = torch.stack([m.float() @ q for m in state["means"][h]])
                picked = []
                for s in scores.argsort(descending=True, stable=True).tolist():
                    picked += [t for t in state["tokens"][h][s] if self.sinks < t < kv_len - self.recent]
                chosen |= set(picked[: self.budget - self.sinks - self.recent])
            mask[0, h, 0, [state["slots"][h][s] for s in chosen]] = 0.0
        return mask


def _model(kv_heads: int = 4):
    return tiny_model("llama", num_key_value_heads=kv_heads)


def _prompt(length: int = 300, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def _reference_run(model, ids, new_tokens, **rules):
    oracle = ReferenceSentenceKV(**rules)
    transformers.AttentionInterface.register("sentencekv_reference", oracle.attention)
    model.config._attn_implementation = "sentencekv_reference"
    cache, logits, tokens = transformers.DynamicCache(config=model.config), [], ids
    step = ids
    for _ in range(new_tokens):
        oracle.ids = tokens
        out = model(input_ids=step, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        step = out.logits[:, -1:].argmax(-1)
        tokens = torch.cat([tokens, step], dim=1)
    model.config._attn_implementation = "sdpa"
    return tokens, logits


def _kvpass_run(model, ids, new_tokens, **options):
    model.forward = torch.compile(model.forward, backend="kvpass", options={**SENTENCEKV, **options}, dynamic=True)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    return out


@pytest.mark.parametrize("budget, factor, in_place", [(100, 2.0, False), (96, 1.0, True), (120, 0.0, False)])
def test_decode_attends_as_the_reference_selects(budget, factor, in_place):
    """Sinks, recent window, sentences ranked by abstract against the open sentence's mean query, the reference's
    cut-offs (its per-sentence width, its ``slot > sinks`` filter), whole-cache steps while a sentence is short;
    semantic_factor 0 (kvpass's keep-everything option) is the oracle with SnapKV skipped. The retrieved tokens are
    gathered to the device, or (offload_attention) attended where the lower tier lives."""
    model, ids = _model(), _prompt()
    tokens, logits = _reference_run(copy.deepcopy(model), ids, 40, budget=budget, semantic_factor=factor)
    out = _kvpass_run(model, ids, 40, budget=budget, semantic_factor=factor, offload_attention=in_place)
    assert torch.equal(out.sequences, tokens)
    assert max(float((a - b).abs().max()) for a, b in zip(out.logits, logits, strict=True)) < 1e-5
    stats = kvpass.kv_stats(out.past_key_values)
    assert all(s.slots == 63 and s.tier_tokens > 0 and s.sentences > 10 for s in stats)
    kept = int(budget * factor) or ids.shape[1]
    assert stats[0].real_tokens + stats[0].tier_tokens == (kept + 39) * 4


def test_gqa_retrieves_per_query_head_from_its_kv_heads_tier():
    """4 query heads over 2 kv heads: retrieval ranks and gathers per query head, as the reference (SnapKV's prefill
    choice per kv head: kvpass's departure, mirrored by the oracle's ``group_mean``)."""
    model, ids = _model(kv_heads=2), _prompt(seed=4)
    tokens, logits = _reference_run(copy.deepcopy(model), ids, 30, budget=100, semantic_factor=2.0)
    out = _kvpass_run(model, ids, 30, budget=100, semantic_factor=2.0)
    assert torch.equal(out.sequences, tokens)
    assert max(float((a - b).abs().max()) for a, b in zip(out.logits, logits, strict=True)) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_steps_that_attend_every_kept_token_are_full_attention(arch):
    """With every step under the length threshold and every token kept, SentenceKV is full attention (Gemma-3: its
    local layers stay HF's)."""
    model, ids = (_model() if arch == "llama" else family_model(arch)), _prompt()
    ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    out = _kvpass_run(model, ids, 12, budget=100, semantic_factor=0, length_threshold=10**6)
    assert torch.equal(out.sequences, ref.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(out.logits, ref.logits, strict=True)) < 1e-5


def test_two_caches_interleave_and_a_copy_branches():
    model, ids_a, ids_b = _model(), _prompt(seed=1), _prompt(260, seed=2)
    alone = []
    options = {**SENTENCEKV, "budget": 100}
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, backend="kvpass", options=options, dynamic=True)

    def step(ids, cache, n):
        out = compiled(input_ids=ids, past_key_values=cache, use_cache=True,
                       position_ids=torch.arange(n - ids.shape[1], n)[None])
        return out.logits[:, -1], out.logits[:, -1:].argmax(-1)

    for ids in (ids_a, ids_b):
        cache, logits = transformers.DynamicCache(config=model.config), []
        last, token = step(ids, cache, ids.shape[1])
        for i in range(8):
            last, token = step(token, cache, ids.shape[1] + i + 1)
            logits.append(last)
        alone.append(logits)
    caches = [transformers.DynamicCache(config=model.config) for _ in range(2)]
    tokens = [step(ids, cache, ids.shape[1])[1] for ids, cache in zip((ids_a, ids_b), caches, strict=True)]
    branch = None
    for i in range(8):
        for j, ids in enumerate((ids_a, ids_b)):
            last, tokens[j] = step(tokens[j], caches[j], ids.shape[1] + i + 1)
            assert torch.allclose(last, alone[j][i], atol=1e-6)
        if i == 3:
            branch, branch_token = copy.deepcopy(caches[0]), tokens[0]
    for i in range(4, 8):  # the copy made after step 3 continues as the original did
        last, branch_token = step(branch_token, branch, ids_a.shape[1] + i + 1)
        assert torch.allclose(last, alone[0][i], atol=1e-6)


@pytest.mark.parametrize("in_place", [False, True], ids=["gathered", "in-place"])
def test_inductor_compiles_the_step_once_while_sentences_and_tier_grow(in_place):
    """With ``offload_attention`` too (the tier's side runs its own eager code), and decodes as ``aot_eager`` does."""
    model, ids = _model(), _prompt(400)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    out = _kvpass_run(model, ids, 30, budget=100, compiler="inductor", offload_attention=in_place)
    explained = kvpass.explain(model.forward)
    assert [g["kind"] for g in explained.graphs] == ["prefill", "decode"] and explained.forwards == 30
    assert explained.graphs[1]["counters"]["retrieval_sites"] == 2
    assert out.sequences.shape[1] == 430
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2
    if in_place:
        eager = _kvpass_run(_model(), ids, 30, budget=100, offload_attention=True)
        assert torch.equal(out.sequences, eager.sequences)


def test_refusals_quote_what_they_got():
    with pytest.raises(OptionError, match="sentence_ends"):
        kvpass.config.parse_options({**SENTENCEKV, "budget": 100, "sentence_ends": []})
    with pytest.raises(OptionError, match="must exceed 64; got 64"):
        kvpass.config.parse_options({**SENTENCEKV, "budget": 64})
    with pytest.raises(OptionError, match="'offload'"):
        kvpass.config.parse_options({**SENTENCEKV, "budget": 100, "offload": None})
    with pytest.raises(OptionError, match="prefill_block"):
        kvpass.config.parse_options({**SENTENCEKV, "budget": 100, "prefill_block": 64})
    with pytest.raises(OptionError, match="drop 'reserve' \\(got 8\\)"):
        kvpass.config.parse_options({**SENTENCEKV, "budget": 100, "reserve": 8})
    with pytest.raises(OptionError, match="semantic_factor"):
        kvpass.config.parse_options({**SENTENCEKV, "budget": 100, "semantic_factor": -1})
    model = _model()
    ids = torch.cat([_prompt(), _prompt(seed=3)])
    with pytest.raises(UnsupportedGraph, match="batch of 2"):
        _kvpass_run(model, ids, 2, budget=100)


def test_sentence_end_ids_converts_the_reference_strings():
    class Vocab:
        unk_token_id = 0
        table = {".": 13, "!": 0, "?": 30, "...": 1131}

        def convert_tokens_to_ids(self, token):
            return self.table.get(token, self.unk_token_id)

    assert kvpass.sentence_end_ids(Vocab()) == [13, 30, 1131]


def test_a_disk_tier_gives_the_host_tiers_outputs_and_leaves_no_files(tmp_path):
    model, ids = _model(), _prompt(seed=6)
    host = _kvpass_run(copy.deepcopy(model), ids, 12, budget=100)
    torch._dynamo.reset()
    disk = _kvpass_run(model, ids, 12, budget=100, offload="disk", offload_dir=str(tmp_path), offload_attention=True)
    assert torch.equal(disk.sequences, host.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(disk.logits, host.logits, strict=True)) < 1e-5
    assert kvpass.kv_stats(disk.past_key_values)[0].tier == "disk"
    assert list(tmp_path.iterdir()) == []
