"""A tiny LLaDA-shaped masked diffusion LM, written for dlmprobe's offline tests.

Saved as ``modeling_tiny_llada.py`` next to a ``config.json`` whose ``auto_map`` points here, it
loads the way LLaDA-8B does: remote code behind ``trust_remote_code=True``. The module tree and
config fields are what TransformerLens 4.3's LLaDA adapter reads (``model.transformer.{wte,
blocks, ln_f, ff_out}``; each block owns its projections and calls ``self.attention``, which the
adapter replaces). Only the dense Llama-style variant exists: bidirectional attention, RMS norms,
rotary positions, SiLU-gated MLP, untied output layer, no biases, no KV cache.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"

    def __init__(
        self,
        d_model: int = 32,
        n_heads: int = 2,
        n_kv_heads: int = 2,
        n_layers: int = 2,
        mlp_hidden_size: int = 64,
        vocab_size: int = 64,
        max_sequence_length: int = 256,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        mask_token_id: int | None = None,
        **kwargs,
    ):
        self.d_model, self.n_heads, self.n_kv_heads, self.n_layers = d_model, n_heads, n_kv_heads, n_layers
        self.mlp_hidden_size, self.vocab_size, self.embedding_size = mlp_hidden_size, vocab_size, vocab_size
        self.max_sequence_length, self.rope_theta, self.rms_norm_eps = max_sequence_length, rope_theta, rms_norm_eps
        self.mask_token_id = mask_token_id
        # The one variant this module implements (and TransformerLens's adapter checks for).
        self.block_type, self.block_group_size, self.layer_norm_type = "llama", 1, "rms"
        self.activation_type, self.rope, self.rope_full_precision = "silu", True, True
        self.alibi = self.attention_layer_norm = self.input_emb_norm = self.scale_logits = False
        self.include_bias = self.include_qkv_bias = self.weight_tying = False
        self.attention_dropout = 0.0
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)


class TinyRMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class TinyRotary(nn.Module):
    """Rotary position embedding on (batch, heads, pos, d_head) queries and keys, in float32.

    No buffers: the angles are recomputed per call, so loading on the meta device cannot leave
    them uninitialised.
    """

    def __init__(self, d_head: int, theta: float):
        super().__init__()
        self.d_head, self.theta = d_head, theta

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        first, second = x.chunk(2, dim=-1)
        return torch.cat((-second, first), dim=-1)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(k.shape[-2], device=k.device, dtype=torch.float32)
        inv_freq = self.theta ** -(torch.arange(0, self.d_head, 2, device=k.device, dtype=torch.float32) / self.d_head)
        angles = torch.outer(pos, inv_freq).repeat(1, 2)
        cos, sin = angles.cos(), angles.sin()
        q_cos, q_sin = cos[-q.shape[-2] :], sin[-q.shape[-2] :]
        q_rot = q.float() * q_cos + self._rotate_half(q.float()) * q_sin
        k_rot = k.float() * cos + self._rotate_half(k.float()) * sin
        return q_rot.to(q.dtype), k_rot.to(k.dtype)


class LLaDALlamaBlock(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        d, n_kv = config.d_model, config.n_kv_heads
        d_kv = n_kv * d // config.n_heads
        self.attn_norm = TinyRMSNorm(d, config.rms_norm_eps)
        self.ff_norm = TinyRMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d_kv, bias=False)
        self.v_proj = nn.Linear(d, d_kv, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False)
        self.act = nn.SiLU()
        self.rotary_emb = TinyRotary(d // config.n_heads, config.rope_theta)

    @staticmethod
    def _cast_attn_bias(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return bias.to(dtype)

    def attention(self, q, k, v, attention_bias=None, layer_past=None, use_cache=False):
        batch, length, width = q.shape
        n_heads, n_kv = self.config.n_heads, self.config.n_kv_heads
        d_head = width // n_heads
        q = q.view(batch, length, n_heads, d_head).transpose(1, 2)
        k = k.view(batch, length, n_kv, d_head).transpose(1, 2)
        v = v.view(batch, length, n_kv, d_head).transpose(1, 2)
        q, k = self.rotary_emb(q, k)
        k = k.repeat_interleave(n_heads // n_kv, dim=1)
        v = v.repeat_interleave(n_heads // n_kv, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d_head)
        if attention_bias is not None:
            scores = scores + self._cast_attn_bias(attention_bias, scores.dtype)
        pattern = scores.float().softmax(dim=-1).to(q.dtype)
        z = (pattern @ v).transpose(1, 2).reshape(batch, length, width)
        return self.attn_out(z), None

    def forward(self, x, attention_bias=None, layer_past=None, use_cache=False):
        h = self.attn_norm(x)
        att, cache = self.attention(self.q_proj(h), self.k_proj(h), self.v_proj(h), attention_bias, layer_past, use_cache)
        x = x + att
        h = self.ff_norm(x)
        x = x + self.ff_out(self.act(self.ff_proj(h)) * self.up_proj(h))
        return x, cache


class LLaDAModel(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.d_model),
                "blocks": nn.ModuleList(LLaDALlamaBlock(config) for _ in range(config.n_layers)),
                "ln_f": TinyRMSNorm(config.d_model, config.rms_norm_eps),
                "ff_out": nn.Linear(config.d_model, config.vocab_size, bias=False),
            }
        )

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False):
        x = self.transformer.wte(input_ids)
        bias = None
        if attention_mask is not None:  # padding keys get a large negative additive bias
            keep = attention_mask.to(x.dtype)[:, None, None, :]
            bias = (1.0 - keep) * torch.finfo(x.dtype).min
        hidden = [x]
        for block in self.transformer.blocks:
            x, _ = block(x, attention_bias=bias)
            hidden.append(x)
        # Like transformers' models: the last hidden state is the one after the final norm.
        x = self.transformer.ln_f(x)
        hidden[-1] = x
        return self.transformer.ff_out(x), (tuple(hidden) if output_hidden_states else None)


class LLaDAModelLM(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["LLaDALlamaBlock"]

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, output_hidden_states=None, return_dict=None, **kwargs):
        logits, hidden = self.model(input_ids, attention_mask, bool(output_hidden_states))
        return CausalLMOutputWithPast(logits=logits, hidden_states=hidden)
