import os

# Triton reads TRITON_INTERPRET when it defines a kernel, and importing kvpass may define some (through torch's
# Triton integration): switch the CPU interpreter on before any test imports kvpass, as the kernel tests need it
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.fx as fx  # noqa: E402
import transformers  # noqa: E402


def tiny_config(arch: str = "llama", attn: str = "sdpa", layers: int = 2, **overrides):
    """A tiny random-weight HF decoder config (GQA: 4 query heads, 2 kv heads)."""
    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),  # sliding + full layers
        # further decoders whose attention code differs: q/k norms, fused qkv, partial rotary, parallel blocks,
        # interleaved rotary, MoE, multi-query, no rotary (learned positions), attention multipliers, soft caps
        **{name: (getattr(transformers, f"{prefix}Config"), getattr(transformers, f"{prefix}{head}"))
           for name, prefix, head in [
               ("qwen3", "Qwen3", "ForCausalLM"), ("phi3", "Phi3", "ForCausalLM"), ("gemma", "Gemma", "ForCausalLM"),
               ("olmo2", "Olmo2", "ForCausalLM"), ("gpt_neox", "GPTNeoX", "ForCausalLM"), ("phi", "Phi", "ForCausalLM"),
               ("stablelm", "StableLm", "ForCausalLM"), ("cohere", "Cohere", "ForCausalLM"),
               ("starcoder2", "Starcoder2", "ForCausalLM"), ("mixtral", "Mixtral", "ForCausalLM"),
               ("granite", "Granite", "ForCausalLM"), ("falcon", "Falcon", "ForCausalLM"),
               ("gpt2", "GPT2", "LMHeadModel"),
               ("gpt_bigcode", "GPTBigCode", "ForCausalLM"), ("gemma2", "Gemma2", "ForCausalLM"),
               # latent caches (MLA), learned attention sinks, hybrids with mamba / linear-attention / conv layers
               ("deepseek_v3", "DeepseekV3", "ForCausalLM"), ("minicpm3", "MiniCPM3", "ForCausalLM"),
               ("gpt_oss", "GptOss", "ForCausalLM"), ("granite_swa", "GraniteSWA", "ForCausalLM"),
               ("falcon_h1", "FalconH1", "ForCausalLM"), ("qwen3_next", "Qwen3Next", "ForCausalLM"),
               ("lfm2", "Lfm2", "ForCausalLM"), ("smollm3", "SmolLM3", "ForCausalLM"),
               # no scale on the logits, a local layer's window in a bool buffer; heads folded into bmm's batch
               ("gpt_neo", "GPTNeo", "ForCausalLM"), ("xglm", "XGLM", "ForCausalLM")]},
    }
    # MLA: every head reads one latent (kv heads = heads); queries/keys of 8 + 8 dims, values of 12
    mla = dict(num_key_value_heads=4, head_dim=8, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
               kv_lora_rank=16, q_lora_rank=16)
    moe = dict(num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
               first_k_dense_replace=1, n_group=1, topk_group=1)
    arch_settings = {"deepseek_v3": {**mla, **moe}, "minicpm3": mla, "gpt_oss": moe,
                     "qwen3_next": {**moe, "layers": 4, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                                    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "head_dim": 16},
                     "lfm2": {"layer_types": ["conv", "full_attention"]},
                     "gpt_neo": {"num_layers": 2, "num_heads": 4, "attention_types": [[["global", "local"], 1]],
                                 "window_size": 8},
                     "xglm": {"num_layers": 2, "d_model": 64, "attention_heads": 4, "ffn_dim": 128}}
    overrides = {**arch_settings.get(arch, {}), **overrides}
    layers = overrides.pop("layers", layers)
    config_cls, model_cls = classes[arch]
    settings = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                    attn_implementation=attn)
    if arch not in ("llama", "qwen2", "mistral", "gemma3"):  # their default token ids lie outside the tiny vocabulary
        settings.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = config_cls(**{**settings, **overrides})
    return cfg, model_cls


def tiny_model(arch: str = "llama", attn: str = "sdpa", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg, model_cls = tiny_config(arch, attn, **overrides)
    return model_cls(cfg).eval()


def family_model(arch: str):
    """A tiny model of ``arch`` as the exactness tests across families use it: Gemma-3 with local layers (window 16,
    shorter than their prompts) between full-attention layers; Mistral without its default 4096-token window (which
    would leave every layer to HF)."""
    if arch == "gemma3":
        return tiny_model("gemma3", layers=4, head_dim=16, sliding_window=16,
                          layer_types=["sliding_attention", "full_attention"] * 2)
    if arch == "mistral":
        return tiny_model("mistral", sliding_window=None)
    return tiny_model(arch)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # Dynamo caches compiled frames per code object: without a reset, tests compiling the same HF
    # forward with other options would hit its recompile limit and silently run eager.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def dynamo_graph(fn, *args) -> fx.Graph:
    """The graph Dynamo hands a backend for ``fn(*args)``: what kvpass's analysis reads."""
    graphs = []
    torch.compile(fn, backend=lambda gm, _: graphs.append(gm.graph) or gm.forward, fullgraph=True)(*args)
    return graphs[0]
