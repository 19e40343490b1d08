"""kvpass.runtime.state: store state travels with the cache, so many caches share one compiled model.

Every conversation (request, episode) holds its own cache; kvpass's metadata of a store (slot positions, the
policy's statistic, tokens seen) is attached to the store the cache holds. These tests run conversations through
ONE compiled forward in lockstep and check each gives exactly the tokens it gives alone, and that nothing kvpass
keeps outlives the caches.
"""

import gc
import weakref

import pytest
import torch
from conftest import tiny_model
from transformers import LogitsProcessor, LogitsProcessorList

import kvpass
from kvpass.runtime.state import STATE_ATTR, GraphRecord, StoreState, store_state

POLICIES = {  # budget 16 < prompts of 30-40 tokens: every policy evicts
    "snapkv": {"window": 4},
    "h2o": {},
    "tova": {},
    "pyramidkv": {"window": 4},
    # (no observation prompt in the lockstep tests: EpiCache's blocks scored by their own last queries)
    "epicache-blockwise": {"policy": "epicache", "window": 4, "prefill_block": 16, "scores": "forward"},
}
EPISODES = {"policy": "epicache", "prefill_block": 16}  # EpiCache's own rule: blocks scored by a patched prompt


def compiled(model, name: str):
    options = {"policy": name, "budget": 16, "compiler": "aot_eager", **POLICIES[name]}
    return torch.compile(model.forward, backend="kvpass", options=options, dynamic="prefill_block" in options or None)


class Conversation:
    """Greedy decoding of one prompt (a row, or a left-padded batch) with its own cache, one step per ``step()``."""

    def __init__(self, forward, model, ids: torch.Tensor, mask: torch.Tensor | None = None, observe=None):
        self.forward, self.ids, self.observe = forward, ids, observe
        self.mask = torch.ones_like(ids) if mask is None else mask
        self.cache = kvpass.CompressedCache(config=model.config)
        self.tokens: list[list[int]] = []

    def step(self) -> None:
        mask = self.mask
        if not self.tokens:  # the prompt (left padding: positions count real tokens only)
            ids = self.ids
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with kvpass.observing(self.observe):
                out = self.forward(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache,
                                   use_cache=True)
        else:
            ids = torch.tensor(self.tokens[-1])[:, None]
            self.mask = mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            positions = mask.sum(-1, keepdim=True) - 1
            out = self.forward(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache,
                               use_cache=True)
        self.tokens.append(out.logits[:, -1].argmax(-1).tolist())


def prompts(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (1, (30, 40)[i % 2]), generator=g) for i in range(n)]


def run_alone(forward, model, ids, steps: int, **kw) -> list[list[int]]:
    conv = Conversation(forward, model, ids, **kw)
    for _ in range(steps):
        conv.step()
    return conv.tokens


def run_interleaved(conversations: list[Conversation], steps: int) -> list[list[list[int]]]:
    for _ in range(steps):
        for conv in conversations:
            conv.step()
    return [conv.tokens for conv in conversations]


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("n", [2, 8])
def test_conversations_interleaved_step_by_step_each_give_their_tokens_alone(policy, n):
    model = tiny_model()
    forward = compiled(model, policy)
    ids = prompts(n)
    steps = 10
    alone = [run_alone(forward, model, x, steps) for x in ids]
    assert len({str(a) for a in alone}) > 1  # the conversations differ, so a mix-up would show
    together = run_interleaved([Conversation(forward, model, x) for x in ids], steps)
    assert together == alone


def test_a_padded_batch_interleaved_with_single_rows_gives_its_tokens_alone():
    model = tiny_model()
    forward = compiled(model, "h2o")
    g = torch.Generator().manual_seed(5)
    batch = torch.randint(1, 128, (2, 40), generator=g)
    mask = torch.ones_like(batch)
    mask[0, :9], batch[0, :9] = 0, 0
    rows = prompts(3, seed=6)
    alone = [run_alone(forward, model, batch, 8, mask=mask)] + [run_alone(forward, model, x, 8) for x in rows]
    convs = [Conversation(forward, model, batch, mask=mask)] + [Conversation(forward, model, x) for x in rows]
    assert run_interleaved(convs, 8) == alone
    # each row of the batched cache counts its own tokens
    assert [s.tokens_seen for s in kvpass.kv_stats(convs[0].cache)][0] == [31 + 7, 40 + 7]


def test_generate_interleaved_with_hand_written_loops_gives_each_its_tokens():
    """generate() of one conversation, with two hand-written conversations stepped inside its own steps."""
    model = tiny_model()
    forward = compiled(model, "snapkv")
    model.forward = forward
    prompt, *others = prompts(3, seed=2)

    def greedy(cache):
        return model.generate(prompt, cache=cache, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                              pad_token_id=0).tolist()

    alone = greedy(kvpass.CompressedCache(config=model.config))
    others_alone = [run_alone(forward, model, x, 9) for x in others]

    class StepOthers(LogitsProcessor):
        def __call__(self, input_ids, scores):
            for conv in convs:
                conv.step()
            return scores

    convs = [Conversation(forward, model, x) for x in others]
    convs[0].step()  # the others run one step ahead: they interleave with generate's prefill and decode steps
    convs[1].step()
    together = model.generate(prompt, cache=kvpass.CompressedCache(config=model.config), max_new_tokens=8,
                              min_new_tokens=8, do_sample=False, pad_token_id=0,
                              logits_processor=LogitsProcessorList([StepOthers()]))
    assert together.tolist() == alone
    assert [c.tokens for c in convs] == others_alone


def test_observation_prompts_apply_to_their_own_prefill_only():
    # EpiCache's episodes: each prefill observed by its own patched prompt, through one compiled forward
    model = tiny_model()
    forward = torch.compile(model.forward, backend="kvpass", dynamic=True,
                            options={"budget": 16, "compiler": "aot_eager", **EPISODES})
    ids = prompts(1, seed=3)[0].expand(2, -1)[:1]
    patched = [torch.randint(1, 128, (6,), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    alone = [run_alone(forward, model, ids, 6, observe=p) for p in patched]
    together = run_interleaved([Conversation(forward, model, ids, observe=p) for p in patched], 6)
    assert together == alone


def test_a_dropped_cache_frees_its_state_and_200_conversations_leave_nothing_behind():
    model = tiny_model()
    forward = compiled(model, "h2o")

    def converse(seed: int) -> Conversation:
        ids = torch.randint(1, 128, (1, 24), generator=torch.Generator().manual_seed(seed))
        conv = Conversation(forward, model, ids)
        for _ in range(3):
            conv.step()
        return conv

    def held() -> tuple[int, int]:
        gc.collect()
        objects = gc.get_objects()
        # type(), not isinstance(): some objects alive in a torch process warn when their __class__ is read
        return (sum(type(o) is StoreState for o in objects), sum(issubclass(type(o), torch.Tensor) for o in objects))

    conv = converse(0)  # compiles the prefill and decode graphs
    state = store_state(conv.cache.layers[0].keys)
    assert isinstance(state, StoreState) and state.pos.shape == (1, 2, 16)
    dropped = weakref.ref(state.pos)
    del conv, state
    gc.collect()
    assert dropped() is None  # nothing kvpass holds keeps a dropped cache's metadata alive
    start = held()
    assert start[0] == 0
    for seed in range(1, 201):
        converse(seed)
    assert held() == start  # no state and no tensor left per conversation
    records = [o for o in gc.get_objects() if type(o) is GraphRecord]
    assert sorted(r.kind for r in records) == ["decode", "prefill"]  # compiled once, for all 201 conversations
    assert sum(r.forwards for r in records) == 201 * 3


def test_state_is_an_attribute_of_the_store_and_explain_reads_the_cache_or_the_compiled_model():
    model = tiny_model()
    model.forward = compiled(model, "h2o")
    conv = Conversation(model.forward, model, prompts(1)[0])
    conv.step()
    conv.step()
    keys = conv.cache.layers[0].keys
    assert getattr(keys, STATE_ATTR) is store_state(keys)
    assert store_state(torch.zeros(1)) is None and store_state(None) is None
    by_cache, by_model = kvpass.explain(conv.cache), kvpass.explain(model)
    assert [g["kind"] for g in by_cache.graphs] == [g["kind"] for g in by_model.graphs] == ["prefill", "decode"]
    assert by_cache.forwards == 2
    with pytest.raises(TypeError, match="got int"):
        kvpass.explain(3)
