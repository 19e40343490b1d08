"""Export time and artifact size per format (kvpass export), whole-prompt and block-wise prefill.

    python benchmarks/export_sizes.py                       # tiny random Llama (2 layers), all formats, both prefills
    python benchmarks/export_sizes.py --prefill-block 8 --window 4 --check-prompt 37   # block rows + token check
    python benchmarks/export_sizes.py --model smollm2-135m --formats pt2,jax --prompt-len 512
    python benchmarks/export_sizes.py --model smollm2-135m --formats pt2 --budget 512 --prefill-block 512 \\
        --check-prompt 1536                                 # + the artifact's tokens vs the compiled model's

Prints one row per (format, prefill): wall-clock export seconds (torch.export + rewrite + the format's
compile/packaging) and the artifact directory's size. ``--check-prompt N`` also generates ``--check-steps``
greedy tokens from each runnable artifact (loaded in this process) and from the model compiled with the
``kvpass`` backend and the same options (block-wise prefill, ``dynamic=True``), for a prompt of N tokens
(the Paul Graham essays for a shipped model, random ids for the tiny one), and prints whether they agree.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from kvpass.lowering.export import FORMATS, get_format

from kvpass import export, load
from kvpass.exporter import resolve_model
from kvpass.validate import ArgType, check_int, choice, csv, non_negative_int, positive_int


def _block(text: str) -> int | None:
    return None if text == "none" else int(text)


BLOCKS = ArgType(_block, lambda b: b if b is None else check_int(b), "'none' or a positive integer")


def tiny_llama() -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg).eval()


def check_prompt(model_name: str, n: int) -> list[int]:
    """A prompt of ``n`` tokens: real text for a shipped model, seeded random ids otherwise."""
    if model_name == "tiny":
        return torch.randint(1, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    from kvpass.models import load_tokenizer
    from kvpass.models.data.corpora import essays_text

    ids = load_tokenizer(model_name)(essays_text()[: 20 * n])["input_ids"][:n]
    if len(ids) != n:
        raise ValueError(f"only {len(ids)} tokens of text for a {n}-token prompt")
    return ids


def compiled_tokens(model: torch.nn.Module, ids: list[int], steps: int, options: dict) -> list[int]:
    """Greedy tokens of ``model`` compiled by the kvpass backend with ``options`` (fp32, as the artifact)."""
    torch._dynamo.reset()
    forward = model.forward
    model.forward = torch.compile(forward, backend="kvpass", dynamic=True, options={**options, "compiler": "aot_eager"})
    eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None
    try:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False, pad_token_id=0)
    finally:
        model.forward, model.generation_config.eos_token_id = forward, eos
        torch._dynamo.reset()
    return out[0, len(ids):].tolist()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' (random 2-layer Llama), a shipped name or an HF directory")
    p.add_argument("--formats", type=csv(choice(FORMATS, "format")), default=list(FORMATS))
    p.add_argument("--policy", default="snapkv")
    p.add_argument("--budget", type=positive_int, default=16)
    p.add_argument("--window", type=positive_int, help="the policy's observation window (default: the policy's own)")
    p.add_argument("--prompt-len", type=positive_int, default=40,
                   help="for the static-shape formats, whole-prompt prefill")
    p.add_argument("--prefill-block", type=csv(BLOCKS), default=[None, 8],
                   help="comma list: 'none' (whole-prompt prefill) and/or block sizes (default: none,8)")
    p.add_argument("--check-prompt", type=non_negative_int, default=0,
                   help="check the artifacts' tokens on a prompt of N tokens (0: no check)")
    p.add_argument("--check-steps", type=positive_int, default=32)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = tiny_llama() if args.model == "tiny" else resolve_model(args.model)
    blocks = args.prefill_block
    options = {"policy": args.policy, "budget": args.budget, **({} if args.window is None else {"window": args.window})}
    print(f"model={args.model} {options} torch={torch.__version__}")
    print(f"{'format':<6} {'prefill':<10} {'export s':>9} {'size MiB':>9}  {'tokens':<8} files")
    for name in args.formats:
        fmt = get_format(name)
        for block in blocks:
            static = ({"prefill_block": block} if block else {} if fmt.dynamic_prompt
                      else {"prompt_len": args.prompt_len})
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                out = export(model, Path(tmp) / name, format=name, progress=False, **options, **static)
                seconds = time.perf_counter() - start
                files = sorted(f for f in out.iterdir() if f.is_file())
                size = sum(f.stat().st_size for f in files) / 2**20
                verdict = "-"
                if args.check_prompt and fmt.runnable and (block or fmt.dynamic_prompt):
                    ids = check_prompt(args.model, args.check_prompt)
                    got = load(out).generate(ids, args.check_steps)
                    want = compiled_tokens(model, ids, args.check_steps, {**options, "prefill_block": block})
                    verdict = "same" if got == want else "DIFFER"
                    if got != want:
                        print(f"  artifact {got}\n  compiled {want}", flush=True)
                prefill = f"block {block}" if block else "whole"
                print(f"{name:<6} {prefill:<10} {seconds:>9.1f} {size:>9.2f}  {verdict:<8} "
                      f"{', '.join(f.name for f in files)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
