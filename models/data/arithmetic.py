"""Multi-step arithmetic problems with worked solutions and checkable answers (generated, seeded).

A problem starts from a digit and applies a chain of ``n_steps`` operations, all modulo 10:
``S`` add one, ``P`` subtract one, ``D`` double, ``N`` negate. The solution writes every running
total, then the answer after ``#``::

    prompt  <bos>7,S,D,N,P,S,S,D,N=      ("start at 7, add one, double, negate, ...")
    answer  7,8,6,4,3,4,5,0,0#0<eos>

The prompt spaces its operations like the solution spaces its totals, so the operation a total
needs sits at the same distance before it in every step.

A diffusion LM fills a canvas of ``gen_length`` masks after the prompt; like LLaDA's SFT data the
answer is padded with ``<eos>`` to the canvas length. Every running total needs the previous one
and the next operation, so the final answer is right only if all steps are.
"""

from __future__ import annotations

import dataclasses
import random

VOCAB = ["<bos>", "<eos>", "<mask>", *"0123456789", "S", "P", "D", "N", "=", ",", "#"]
TOKEN_ID = {tok: i for i, tok in enumerate(VOCAB)}
BOS, EOS, MASK = TOKEN_ID["<bos>"], TOKEN_ID["<eos>"], TOKEN_ID["<mask>"]
OPS = {"S": lambda a: (a + 1) % 10, "P": lambda a: (a - 1) % 10, "D": lambda a: (2 * a) % 10,
       "N": lambda a: (-a) % 10}


@dataclasses.dataclass(frozen=True)
class ArithmeticProblem:
    start: int
    ops: tuple[str, ...]

    @property
    def totals(self) -> list[int]:
        acc = [self.start]
        for op in self.ops:
            acc.append(OPS[op](acc[-1]))
        return acc

    @property
    def answer(self) -> int:
        return self.totals[-1]

    def prompt_text(self) -> str:
        return f"{self.start}," + ",".join(self.ops) + "="

    def solution_text(self) -> str:
        return ",".join(map(str, self.totals)) + f"#{self.answer}"

    def prompt_ids(self) -> list[int]:
        return [BOS] + encode(self.prompt_text())

    def answer_ids(self, gen_length: int) -> list[int]:
        """Solution, one ``<eos>``, then ``<eos>`` padding up to ``gen_length`` tokens."""
        ids = encode(self.solution_text()) + [EOS]
        if gen_length < len(ids):
            raise ValueError(f"gen_length={gen_length} is shorter than the solution ({len(ids)} tokens with <eos>)")
        return ids + [EOS] * (gen_length - len(ids))


def encode(text: str) -> list[int]:
    bad = sorted({c for c in text if c not in TOKEN_ID})
    if bad:
        raise ValueError(f"characters {bad} are not in the arithmetic vocabulary {VOCAB}")
    return [TOKEN_ID[c] for c in text]


def decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] if VOCAB[i] not in ("<bos>", "<eos>", "<mask>") else "" for i in ids
                   if VOCAB[i] != "<eos>")


def parse_answer(ids: list[int]) -> int | None:
    """The digit after ``#`` in a generated answer (up to its first ``<eos>``), or None."""
    if EOS in ids:
        ids = ids[: ids.index(EOS)]
    hashes = [i for i, t in enumerate(ids) if t == TOKEN_ID["#"]]
    if not hashes or hashes[0] + 1 >= len(ids):
        return None
    tok = VOCAB[ids[hashes[0] + 1]]
    return int(tok) if tok.isdigit() else None


def solution_length(n_steps: int) -> int:
    """Tokens of the solution including its ``<eos>``: ``n_steps + 1`` totals, commas, ``#d``, ``<eos>``."""
    return 2 * (n_steps + 1) - 1 + 2 + 1


def arithmetic_problems(n: int, n_steps: int = 8, seed: int = 0) -> list[ArithmeticProblem]:
    """``n`` problems of ``n_steps`` operations each, deterministic in ``seed``."""
    if n_steps < 2:
        raise ValueError(f"n_steps={n_steps}: a multi-step problem needs at least 2 steps")
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    rng = random.Random(seed)
    return [ArithmeticProblem(rng.randrange(10), tuple(rng.choice("SPDN") for _ in range(n_steps)))
            for _ in range(n)]


def chance_accuracy(problems: list[ArithmeticProblem]) -> float:
    """Accuracy of always answering the most frequent answer digit (the chance baseline)."""
    if not problems:
        raise ValueError("chance_accuracy needs at least one problem")
    counts = [0] * 10
    for p in problems:
        counts[p.answer] += 1
    return max(counts) / len(problems)
