"""Export time and artifact size per format (kvpass export).

    python benchmarks/export_sizes.py                       # tiny random Llama (2 layers), all formats
    python benchmarks/export_sizes.py --model smollm2-135m --formats pt2,jax --prompt-len 512

Prints one row per format: wall-clock export seconds (torch.export + rewrite + the format's
compile/packaging) and the artifact directory's size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from kvpass.lowering.export import FORMATS, export, get_format, resolve_model


def tiny_llama() -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg).eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' (random 2-layer Llama), a shipped name or an HF directory")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--policy", default="snapkv")
    p.add_argument("--budget", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=40, help="for the static-shape formats")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = tiny_llama() if args.model == "tiny" else resolve_model(args.model)
    print(f"model={args.model} policy={args.policy} budget={args.budget} torch={torch.__version__}")
    print(f"{'format':<6} {'export s':>9} {'size MiB':>9}  files")
    for name in args.formats.split(","):
        fmt = get_format(name)
        static = {} if fmt.dynamic_prompt else {"prompt_len": args.prompt_len}
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            out = export(model, Path(tmp) / name, format=name, policy=args.policy, budget=args.budget,
                         progress=False, **static)
            seconds = time.perf_counter() - start
            files = sorted(f for f in out.iterdir() if f.is_file())
            size = sum(f.stat().st_size for f in files) / 2**20
            print(f"{name:<6} {seconds:>9.1f} {size:>9.2f}  {', '.join(f.name for f in files)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
