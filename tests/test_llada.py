"""models/llada.py, models/llada_generate.py, models/data/arithmetic.py, models/train_llada.py."""

import pytest
import torch
from kvpass.models.data.arithmetic import (
    EOS,
    MASK,
    VOCAB,
    ArithmeticProblem,
    arithmetic_problems,
    chance_accuracy,
    encode,
    parse_answer,
    solution_length,
)
from kvpass.models.llada import LLaDAConfig, LLaDAModelLM, load_llada
from kvpass.models.llada_generate import (
    generate_dual_cache,
    generate_llada,
    generate_window,
    num_transfer_tokens,
)


def tiny(seed: int = 0, layers: int = 2) -> LLaDAModelLM:
    torch.manual_seed(seed)
    return LLaDAModelLM(LLaDAConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=layers, num_attention_heads=2)).eval()


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_attention_heads=3"):
        LLaDAConfig(hidden_size=32, num_attention_heads=3)
    with pytest.raises(ValueError, match="mask_token_id=99"):
        LLaDAConfig(mask_token_id=99)
    with pytest.raises(ValueError, match="unknown LLaDAConfig fields \\['bogus'\\]"):
        LLaDAConfig.from_dict({"bogus": 1})
    assert LLaDAConfig.from_dict(LLaDAConfig().to_dict()) == LLaDAConfig()


def test_attention_is_bidirectional():
    m = tiny()
    x = torch.randint(3, len(VOCAB), (1, 12))
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1 - 3) % (len(VOCAB) - 3) + 3
    with torch.no_grad():
        a, b = m(x), m(y)
    assert not torch.allclose(a[0, 0], b[0, 0])   # the first position sees the last token


def test_position_ids_and_row_subsets():
    m = tiny()
    x = torch.randint(0, len(VOCAB), (1, 20))
    with torch.no_grad():
        full = m(x)
        cache = m.new_kv_cache(1, 20)
        pos = torch.arange(20)
        filled = m(x, pos[None], cache, pos)
        rows = pos[5:9]
        part = m(x[:, rows], rows[None], cache, rows)  # a block's rows over everybody's cached keys/values
    torch.testing.assert_close(filled, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(part, full[:, 5:9], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kv_cache and cache_positions go together"):
        m(x, pos[None], cache, None)
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        m(x[0])


def test_save_load_roundtrip(tmp_path):
    m = tiny()
    m.save_pretrained(tmp_path, dtype=torch.float32)
    m2 = LLaDAModelLM.from_pretrained(tmp_path)
    x = torch.randint(0, len(VOCAB), (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(m(x), m2(x))
    with pytest.raises(FileNotFoundError, match="not a LLaDA checkpoint"):
        LLaDAModelLM.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown LLaDA checkpoint 'nope'"):
        load_llada("nope")


def test_arithmetic_problems():
    p = ArithmeticProblem(7, ("S", "D", "N", "P"))
    assert p.totals == [7, 8, 6, 4, 3] and p.answer == 3
    assert p.prompt_text() == "7,S,D,N,P=" and p.solution_text() == "7,8,6,4,3#3"
    ans = p.answer_ids(14)
    assert len(ans) == 14 and ans[len(p.solution_text())] == EOS and ans[-1] == EOS
    assert solution_length(4) == len(p.solution_text()) + 1
    assert parse_answer(ans) == 3 and parse_answer(encode("3,8")) is None
    assert arithmetic_problems(5, seed=1) == arithmetic_problems(5, seed=1) != arithmetic_problems(5, seed=2)
    assert 0.1 <= chance_accuracy(arithmetic_problems(500)) < 0.3
    with pytest.raises(ValueError, match="gen_length=3 is shorter"):
        p.answer_ids(3)
    with pytest.raises(ValueError, match="n_steps=1"):
        arithmetic_problems(2, n_steps=1)
    with pytest.raises(ValueError, match="not in the arithmetic vocabulary"):
        encode("3/4")


def test_transfer_schedule():
    masks = torch.ones(2, 10, dtype=torch.bool)
    masks[1, 7:] = False
    sched = num_transfer_tokens(masks, 4)
    assert sched.tolist() == [[3, 3, 2, 2], [2, 2, 2, 1]]


def test_llada_block_decoding_fills_every_mask():
    m = tiny()
    prompt = torch.tensor([arithmetic_problems(1)[0].prompt_ids()])
    out = generate_llada(m, prompt, gen_length=16, block_length=8, steps=16)
    assert not (out.tokens == MASK).any() and out.nfe == 16
    assert out.token_layers == 16 * out.tokens.shape[1] * 2
    thr = generate_llada(m, prompt, gen_length=16, block_length=8, threshold=0.9)
    assert not (thr.tokens == MASK).any() and thr.nfe <= 16
    with pytest.raises(ValueError, match="steps=5 must be a positive multiple"):
        generate_llada(m, prompt, gen_length=16, block_length=8, steps=5)
    with pytest.raises(ValueError, match="gen_length=10 must be a positive multiple of block_length=8"):
        generate_llada(m, prompt, gen_length=10, block_length=8)


def test_dual_cache_with_one_step_per_block_equals_no_cache():
    # one step per block = only the block-boundary full forwards, so the dual cache is exact
    m = tiny(seed=1)
    prompt = torch.tensor([arithmetic_problems(1, seed=4)[0].prompt_ids()])
    ref = generate_llada(m, prompt, gen_length=24, block_length=8, steps=3)
    dual = generate_dual_cache(m, prompt, gen_length=24, block_length=8, steps=3, threshold=None)
    assert torch.equal(ref.tokens, dual.tokens)
    many = generate_dual_cache(m, prompt, gen_length=24, block_length=8, threshold=0.9)
    assert not (many.tokens == MASK).any()
    n = many.tokens.shape[1]
    assert many.token_layers == 2 * (3 * n + (many.nfe - 3) * 8)


def test_window_decoding_stops_at_eos():
    m = load_llada()
    p = arithmetic_problems(1, seed=11)[0]
    prompt = torch.tensor([p.prompt_ids()])
    out = generate_window(m, prompt, gen_length=64)
    gen = out.tokens[0, prompt.shape[1]:].tolist()
    assert EOS in gen
    first = gen.index(EOS)
    assert all(t == MASK for t in gen[first + 1:] if t != EOS)
    assert MASK not in gen[:first]
    with pytest.raises(ValueError, match="one prompt"):
        generate_window(m, prompt.expand(2, -1), gen_length=8)


def test_shipped_checkpoint_beats_chance():
    m = load_llada()
    assert m.config.mask_token_id == MASK and len(VOCAB) == m.config.vocab_size
    problems = arithmetic_problems(30, seed=2024)
    correct = 0
    for p in problems:
        out = generate_window(m, torch.tensor([p.prompt_ids()]), gen_length=32)
        correct += parse_answer(out.tokens[0, len(p.prompt_ids()):].tolist()) == p.answer
    assert correct / len(problems) >= 2 * chance_accuracy(problems)


def test_training_script_runs(tmp_path):
    from kvpass.models.train_llada import main

    main(["--out", str(tmp_path), "--steps", "3", "--layers", "2", "--hidden", "32", "--ffn", "64", "--heads", "2",
          "--tokens-per-step", "256", "--eval-every", "0", "--n-steps", "3", "--final-eval", "0"])
    m = LLaDAModelLM.from_pretrained(tmp_path)
    assert m.config.num_hidden_layers == 2
