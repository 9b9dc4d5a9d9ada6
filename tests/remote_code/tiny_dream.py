"""A tiny Dream-shaped masked diffusion LM, written for dlmprobe's offline tests.

Saved as ``modeling_tiny_dream.py`` next to a ``config.json`` whose ``auto_map`` points here, it
loads the way Dream-7B does: remote code behind ``trust_remote_code=True``. The module tree is
Qwen2's (``model.{embed_tokens, layers, norm, rotary_emb}``, an untied ``lm_head``), which is
what TransformerLens 4.3's Dream adapter reads, with bidirectional attention. Like Dream, its
logits are shifted: the hidden state at position i predicts the token at i + 1. Like Dream's
forward, ``attention_mask`` is None or a (batch, 1, pos, pos) boolean mask (True = attend), and
positions come from ``position_ids`` (default ``arange``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput


class DreamConfig(PretrainedConfig):
    model_type = "Dream"

    def __init__(
        self,
        vocab_size: int = 64,
        hidden_size: int = 32,
        intermediate_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 2,
        num_key_value_heads: int = 2,
        hidden_act: str = "silu",
        max_position_embeddings: int = 256,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        mask_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads, self.hidden_act = num_key_value_heads, hidden_act
        self.max_position_embeddings, self.rms_norm_eps, self.rope_theta = max_position_embeddings, rms_norm_eps, rope_theta
        self.mask_token_id = mask_token_id
        self.attention_dropout = 0.0
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)


class DreamRMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class DreamRotaryEmbedding(nn.Module):
    """(cos, sin) for ``position_ids``, recomputed per call (no buffers to lose on meta loading)."""

    def __init__(self, config: DreamConfig):
        super().__init__()
        self.d_head, self.theta = config.hidden_size // config.num_attention_heads, config.rope_theta

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.theta ** -(torch.arange(0, self.d_head, 2, device=x.device, dtype=torch.float32) / self.d_head)
        angles = (position_ids[..., None].float() * inv_freq).repeat(1, 1, 2)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class DreamAttention(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        d, self.n_heads, self.n_kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.d_head = d // self.n_heads
        self.q_proj = nn.Linear(d, d, bias=True)
        self.k_proj = nn.Linear(d, self.n_kv * self.d_head, bias=True)
        self.v_proj = nn.Linear(d, self.n_kv * self.d_head, bias=True)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        batch, length, width = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, length, self.n_heads, self.d_head).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, length, self.n_kv, self.d_head).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, length, self.n_kv, self.d_head).transpose(1, 2)
        cos, sin = (t[:, None] for t in position_embeddings)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)
        if isinstance(attention_mask, torch.Tensor):
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        pattern = scores.float().softmax(dim=-1).to(q.dtype)
        z = (pattern @ v).transpose(1, 2).reshape(batch, length, width)
        return self.o_proj(z), pattern


class DreamMLP(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DreamDecoderLayer(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.self_attn = DreamAttention(config)
        self.mlp = DreamMLP(config)
        self.input_layernorm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        attn, _ = self.self_attn(self.input_layernorm(hidden_states), attention_mask, position_embeddings)
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class DreamBaseModel(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DreamDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = DreamRotaryEmbedding(config)

    def forward(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=False):
        x = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand(input_ids.shape[0], -1)
        position_embeddings = self.rotary_emb(x, position_ids)
        hidden = [x]
        for layer in self.layers:
            x = layer(x, attention_mask=attention_mask, position_embeddings=position_embeddings)
            hidden.append(x)
        x = self.norm(x)
        hidden[-1] = x  # transformers' convention: the last hidden state is post-final-norm
        return x, (tuple(hidden) if output_hidden_states else None)


class DreamModel(PreTrainedModel):
    config_class = DreamConfig
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["DreamDecoderLayer"]

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=None, return_dict=None, **kwargs):
        x, hidden = self.model(input_ids, attention_mask, position_ids, bool(output_hidden_states))
        return MaskedLMOutput(logits=self.lm_head(x), hidden_states=hidden)
