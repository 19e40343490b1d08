"""Which Hugging Face decoders kvpass compiles exactly: every causal-LM model type of the installed transformers.

For each model type (``--types``, default: every type in transformers' causal-LM auto mapping) and attention
implementation (sdpa, eager), a fresh process builds a tiny random-weight config (4 layers, width 64; sizes are
overridden where the config or a sub-config (text_config, vision_config, ...) names them: MLA configs get one latent
head per query head, MoE configs 4 experts, BERT-style configs ``is_decoder``; a per-layer kind list cycles through
its kinds, so a hybrid's tiny layers hold attention and a sliding-window model's a full-attention layer) and runs two
generations of a left-padded batch of 2 (30-token prompts, 8 new tokens) through ``backend="kvpass"``
(``aot_eager``):

* exact: H2O with budget 64, which covers the sequence: greedy tokens equal HF's and fp32 logits within 1e-5;
* compressed: budget 16, which evicts: the KV slots each layer holds afterwards and the number of compiles (a layer
  kvpass leaves to HF, such as a sliding-window one, grows by a token per step: one dynamic-shape recompile, as
  under plain ``torch.compile``).

Each row ends as ``exact``, ``mismatch`` (the largest logit difference, and the padded row's difference from HF
generating that row alone, for kvpass and for HF: which of the two mishandles the padding), ``refused`` (kvpass's
error, quoted: a form kvpass does not compress, refused by name rather than left uncompressed), ``error`` (any other
failure under kvpass), ``compile-error`` (plain ``torch.compile(backend="aot_eager")`` of the model fails the same
way: Dynamo cannot trace it, whatever the backend), or ``hf-error`` (HF itself cannot build or run the tiny config
with that attention implementation: a config that needs more than sizes, an implementation the model does not offer).
Figures go to BENCHMARKS.md.

    python benchmarks/hf_decoder_coverage.py --out results/coverage.json            # about 2 h on 2 CPU cores
    python benchmarks/hf_decoder_coverage.py --out results/coverage.json --resume   # after an interruption
    python benchmarks/hf_decoder_coverage.py --types llama,deepseek_v3,gpt_oss
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import re
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

from kvpass.validate import csv, positive_int, word

ATTENTION = ("sdpa", "eager")
MEMORY_LIMIT = 8 << 30  # bytes of address space per model type
# tiny sizes, applied to the keys a config has (several spellings: GPT-2/J/Neo, XGLM, BLOOM-era configs)
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, n_embd=64, n_layer=4, n_head=4, n_inner=128, rotary_dim=8, num_layers=4, num_heads=4,
            d_model=64, attention_heads=4, ffn_dim=128, window_size=8, num_experts=4, num_local_experts=4,
            n_routed_experts=4, moe_intermediate_size=32, num_experts_per_tok=2, shared_expert_intermediate_size=32,
            n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, linear_num_key_heads=2, linear_num_value_heads=4,
            linear_key_head_dim=16, linear_value_head_dim=16, tie_word_embeddings=False,
            is_decoder=True,  # BERT-style configs: causal, with a cache (HF warns their causal LMs need it)
            attn_layer_period=2, attn_layer_offset=1, attn_layer_indices=[1, 3])  # hybrids: attention in 2 of 4 layers
LAYER_KINDS = ("layer_types", "layers_block_type")  # per-layer kind lists (attention, sliding, linear, mamba, ...)


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_sizes(config: dict) -> dict:
    """TINY's keys the config has; a per-layer kind list cycles through every kind the full list holds, so the 4
    tiny layers mix them (a hybrid's first 4 layers may hold no attention, a sliding model's no full attention)."""
    sizes = {k: v for k, v in TINY.items() if k in config}
    for key in LAYER_KINDS:
        if isinstance(config.get(key), list) and config[key]:
            kinds = list(dict.fromkeys(config[key]))
            sizes[key] = [kinds[i % len(kinds)] for i in range(TINY["num_hidden_layers"])]
    return sizes


def tiny_model(model_type: str, attn: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    default = AutoConfig.for_model(model_type).to_dict()
    sizes = tiny_sizes(default)
    # sub-configs (text_config, vision_config, ...) shrink the same way: a full-size vision tower fills memory
    sizes.update({name: tiny_sizes(sub) for name, sub in default.items()
                  if isinstance(sub, dict) and TINY.keys() & sub.keys()})
    if "kv_lora_rank" in default:  # MLA: every query head reads the one latent; the rotary part sets head_dim
        sizes.update(num_key_value_heads=sizes.get("num_attention_heads", 4), head_dim=TINY["qk_rope_head_dim"])
    config = AutoConfig.for_model(model_type, **sizes)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    message = next((line for line in text if "kvpass:" in line), text[0] if text else type(err).__name__)
    return f"{type(err).__name__}: {message[message.find('kvpass:') if 'kvpass:' in message else 0:][:300]}"


def crash(returncode: int, stderr: str) -> str:
    """Why a ``--one`` process printed no rows: its last exception line (not a trailing warning), or its exit."""
    raised = [line for line in stderr.splitlines() if re.match(r"[\w.]+(Error|Exception|Interrupt)\b", line)]
    return (raised[-1] if raised else f"process died (exit {returncode})")[:300]


def max_logit_diff(out, ref, row: int | None = None) -> float:
    """Largest logit difference over the generated steps: all rows, or batch ``row`` of ``out`` against ``ref``'s
    only row."""
    pairs = zip(out.logits, ref.logits, strict=True)
    return max(float((a - b if row is None else a[row] - b[0]).abs().max()) for a, b in pairs)


def check(model_type: str, attn: str) -> dict:
    """One row: build, run HF, then kvpass exact and compressed."""
    import torch

    import kvpass
    from kvpass.backend import kvpass_backend

    row = {"type": model_type, "attn": attn}
    try:
        model = tiny_model(model_type, attn)
        ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[0, :7], ids[0, :7] = 0, 0  # left padding

        def generate(ids=ids, mask=mask):
            return model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                  return_dict_in_generate=True, output_logits=True)

        ref = generate()
    except Exception as err:  # noqa: BLE001  (any HF failure is a row, not a crash)
        return {**row, "status": "hf-error", "error": first_line(err)}
    forward, compiles = model.forward, []

    def counting(gm, example_inputs, **kw):
        compiles.append(1)
        return kvpass_backend(gm, example_inputs, **kw)

    try:
        for budget in (64, 16):
            torch._dynamo.reset()
            compiles.clear()
            model.forward = torch.compile(forward, backend=counting,
                                          options={"policy": "h2o", "budget": budget, "compiler": "aot_eager"})
            out = generate()
            if budget == 64:
                diff = max_logit_diff(out, ref)
                same = bool(torch.equal(out.sequences, ref.sequences))
                graphs = kvpass.explain(model).graphs
                row.update(status="exact" if same and diff <= 1e-5 else "mismatch", max_logit_diff=diff,
                           tokens_equal=same, sites=[len(g["budgets"]) for g in graphs][:1],
                           rewritten=[g["counters"].get("prefill_sites", 0) for g in graphs][:1],
                           counters={k: v for k, v in graphs[0]["counters"].items() if v})
                if row["status"] == "mismatch":  # whose decode is wrong? alone, the padded row has no padding
                    model.forward, real = forward, mask[0].bool()
                    alone = generate(ids[:1, real], mask[:1, real])
                    row.update(padded_row_vs_hf_alone={"kvpass": max_logit_diff(out, alone, row=0),
                                                       "hf": max_logit_diff(ref, alone, row=0)})
            else:
                row.update(compressed_slots=[s.slots for s in kvpass.kv_stats(out.cache)],
                           compressed_compiles=len(compiles))
    except Exception as err:  # noqa: BLE001
        row.update(status="refused" if "kvpass:" in str(err) else "error", error=first_line(err))
    if row["status"] == "error":  # is it kvpass's, or does Dynamo fail on this model with any backend?
        torch._dynamo.reset()
        model.forward = torch.compile(forward, backend="aot_eager")
        try:
            generate()
        except Exception as err:  # noqa: BLE001
            row.update(status="compile-error", error=first_line(err))
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--types", type=csv(word),
                   help="comma-separated model types (default: every causal-LM type of transformers)")
    p.add_argument("--timeout", type=positive_int, default=300, help="seconds per model type (default 300)")
    p.add_argument("--out", type=Path, help="write the rows as JSON here (after every model type)")
    p.add_argument("--resume", action="store_true", help="keep the rows --out holds and check only the other types")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: check one type in this process, print JSON rows
    args = p.parse_args(argv)
    if args.one:
        warnings.filterwarnings("ignore")
        # a config that is large even with tiny sizes fails here with MemoryError, not by the OOM killer elsewhere
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        print(json.dumps([check(args.one, attn) for attn in ATTENTION]))
        return 0
    known = causal_lm_types()
    types = args.types or known
    unknown = [t for t in types if t not in known]
    if unknown:
        p.error(f"--types: unknown model type(s) {unknown}; valid: transformers' causal-LM types, e.g. {known[:8]}")
    if args.resume and not (args.out and args.out.exists()):
        p.error(f"--resume needs an existing --out file; got {str(args.out) if args.out else 'no --out'}")
    rows = json.loads(args.out.read_text())["rows"] if args.resume else []
    done = {row["type"] for row in rows}
    start = time.time()
    for model_type in (t for t in types if t not in done):
        try:
            run = subprocess.run([sys.executable, __file__, "--one", model_type], capture_output=True, text=True,
                                 timeout=args.timeout)
            found = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("[")]
            rows += found[-1] if found else [{"type": model_type, "attn": a, "status": "error",
                                              "error": crash(run.returncode, run.stderr)} for a in ATTENTION]
        except subprocess.TimeoutExpired:
            rows += [{"type": model_type, "attn": a, "status": "error", "error": f"timeout {args.timeout}s"}
                     for a in ATTENTION]
        for row in rows[-2:]:
            detail = row.get("error", f"max diff {row.get('max_logit_diff', 0):.1e}, compressed slots "
                                      f"{row.get('compressed_slots')}, {row.get('compressed_compiles')} compiles"
                                      + (f", padded row vs HF alone {row['padded_row_vs_hf_alone']}"
                                         if "padded_row_vs_hf_alone" in row else ""))
            print(f"{row['type']:18s} {row['attn']:5s} {row['status']:8s} {detail}", flush=True)
        if args.out:
            write(args.out, rows)
    counts = collections.Counter(row["status"] for row in rows)
    print(f"\n{len({row['type'] for row in rows})} model types, {len(rows)} rows ({time.time() - start:.0f} s this "
          f"run): {dict(counts)}")
    return 0


def write(out: Path, rows: list[dict]) -> None:
    import torch
    import transformers

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": platform.platform(), "torch": torch.__version__, "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d"), "counts": dict(collections.Counter(row["status"] for row in rows)),
        "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
