"""A LLaDA-architecture masked diffusion language model, small enough to train on a CPU.

LLaDA (Nie et al., "Large Language Diffusion Models", 2025) is a Llama-shaped Transformer whose
attention is *bidirectional* (no causal mask) and which predicts the tokens hidden behind a
``[MASK]`` token id: pre-norm RMSNorm, rotary position embeddings, SwiGLU MLP, untied LM head.

The model follows gpt-fast's shape: one file, a config dataclass that reads and writes an
HF-style ``config.json``, a forward that takes explicit ``position_ids`` (so any subset of rows can
be run at its true positions) and an optional static per-layer KV cache written with
``index_copy_`` at ``cache_positions`` (what Fast-dLLM's dual cache needs). It knows nothing of
kvpass.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class LLaDAConfig:
    """HF-style configuration (``model_type="llada"``); ``save``/``load`` use ``config.json``."""

    vocab_size: int = 19
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 1024
    bos_token_id: int = 0
    eos_token_id: int = 1
    mask_token_id: int = 2
    model_type: str = "llada"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(f"head_dim={self.hidden_size // self.num_attention_heads} must be even for RoPE")
        for name in ("bos_token_id", "eos_token_id", "mask_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}={value} is outside the vocabulary [0, {self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LLaDAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LLaDAConfig fields {unknown}; valid fields: {sorted(known)}")
        return cls(**data)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of the true token positions, ``[B, 1, T, head_dim]``."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.to(torch.float32)[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos(), emb.sin()


class LLaDABlock(nn.Module):
    """Pre-norm bidirectional self-attention + SwiGLU MLP."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.n_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.input_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.post_attention_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache_positions: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = h.shape
        x = self.input_layernorm(h)
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            k_cache.index_copy_(2, cache_positions, k)
            v_cache.index_copy_(2, cache_positions, v)
            k, v = k_cache, v_cache
        attn = F.scaled_dot_product_attention(q, k, v)  # bidirectional: no mask, not causal
        h = h + self.o_proj(attn.transpose(1, 2).reshape(b, t, -1))
        x = self.post_attention_layernorm(h)
        return h + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LLaDAModelLM(nn.Module):
    """``logits = model(input_ids, position_ids)``; ``[MASK]`` is ``config.mask_token_id``.

    With ``kv_cache`` (from :meth:`new_kv_cache`) and ``cache_positions`` (``[T]``, the canvas
    positions of the ``T`` input rows), each layer writes its rows' keys/values into the cache and
    attends over the whole cache: a full forward with ``cache_positions = arange(N)`` fills it, a
    forward of a block's rows reuses everybody else's cached keys/values.
    """

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config)
        self.layers = nn.ModuleList(LLaDABlock(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def new_kv_cache(self, batch: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        c = self.config
        shape = (batch, c.num_attention_heads, length, c.head_dim)
        dev, dt = self.lm_head.weight.device, self.lm_head.weight.dtype
        return [(torch.zeros(shape, device=dev, dtype=dt), torch.zeros(shape, device=dev, dtype=dt))
                for _ in range(c.num_hidden_layers)]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                kv_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                cache_positions: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if (kv_cache is None) != (cache_positions is None):
            raise ValueError("kv_cache and cache_positions go together: got "
                             f"kv_cache={'set' if kv_cache is not None else None}, "
                             f"cache_positions={'set' if cache_positions is not None else None}")
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(position_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, None if kv_cache is None else kv_cache[i], cache_positions)
        return self.lm_head(self.norm(h))

    # --- checkpoints: config.json + model.safetensors -------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype = torch.float16) -> None:
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        state = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> LLaDAModelLM:
        from safetensors.torch import load_file

        path = Path(directory)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {str(path)!r}: not a LLaDA checkpoint directory")
        model = cls(LLaDAConfig.from_dict(json.loads((path / "config.json").read_text())))
        state = {k: v.to(torch.float32) for k, v in load_file(str(path / "model.safetensors")).items()}
        model.load_state_dict(state)
        return model.eval()


CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"


def load_llada(name: str = "llada-arith") -> LLaDAModelLM:
    """Load a checkpoint shipped in ``models/checkpoints/<name>`` (fp32 weights, eval mode)."""
    path = CHECKPOINT_DIR / name
    if not path.is_dir():
        found = sorted(p.name for p in CHECKPOINT_DIR.iterdir()) if CHECKPOINT_DIR.is_dir() else []
        raise ValueError(f"unknown LLaDA checkpoint {name!r}; shipped: {found}")
    return LLaDAModelLM.from_pretrained(path)
