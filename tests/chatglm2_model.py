"""A tiny ChatGLM2-6B-style model for tests: the module classes and attribute names of THUDM's modeling_chatglm.py
(not in transformers), with a small config and random weights.

What matters for pairing is reproduced: the ``Embedding`` wrapper around ``word_embeddings`` (also an
``nn.Embedding``, so both modules have the type name ``Embedding``) that returns its output transposed to
sequence-first; ``RotaryEmbedding`` (which a substring rule ``Embedding`` would match); ``GLMBlock`` with
``RMSNorm``, ``SelfAttention`` (fused ``query_key_value`` with bias, multi-query groups, ``CoreAttention``, ``dense``)
and ``MLP`` (``dense_h_to_4h``, SwiGLU, ``dense_4h_to_h``); ``[seq, batch, hidden]`` tensors throughout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class ChatGLMConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    kv_channels: int = 16
    multi_query_group_num: int = 2
    ffn_hidden_size: int = 96
    padded_vocab_size: int = 128
    layernorm_epsilon: float = 1e-5
    seq_length: int = 64


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, hidden_states):
        variance = hidden_states.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.eps))


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)), persistent=False)

    def forward(self, seq_len: int):
        theta = torch.outer(torch.arange(seq_len).float(), self.inv_freq)
        return torch.stack([torch.cos(theta), torch.sin(theta)], dim=-1)  # [seq, dim/2, 2]


def apply_rotary_pos_emb(x, rope_cache):
    """ChatGLM2 rotates the first half of each head's channels, pairwise; x: [seq, batch, heads, head_dim]."""
    rot_dim = rope_cache.shape[-2] * 2
    x, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    xs = x.reshape(*x.shape[:-1], rot_dim // 2, 2)
    cache = rope_cache[: x.shape[0]].view(x.shape[0], 1, 1, rot_dim // 2, 2)
    out = torch.stack([xs[..., 0] * cache[..., 0] - xs[..., 1] * cache[..., 1],
                       xs[..., 1] * cache[..., 0] + xs[..., 0] * cache[..., 1]], dim=-1)
    return torch.cat([out.flatten(3), x_pass], dim=-1)


class CoreAttention(nn.Module):
    def forward(self, query_layer, key_layer, value_layer, attention_mask):
        # [seq, batch, heads, head_dim] -> [batch, heads, seq, head_dim]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query_layer, key_layer, value_layer))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + attention_mask
        context = torch.softmax(scores.float(), dim=-1).type_as(v) @ v
        context = context.permute(2, 0, 1, 3)
        return context.reshape(*context.shape[:2], -1)


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.heads, self.head_dim = config.num_attention_heads, config.kv_channels
        self.groups = config.multi_query_group_num
        qkv = self.heads * self.head_dim + 2 * self.groups * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, qkv, bias=True)
        self.core_attention = CoreAttention()
        self.dense = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states, attention_mask, rotary_pos_emb, kv_cache=None, use_cache=True):
        mixed = self.query_key_value(hidden_states)
        q, k, v = mixed.split([self.heads * self.head_dim, self.groups * self.head_dim,
                               self.groups * self.head_dim], dim=-1)
        q = apply_rotary_pos_emb(q.view(*q.shape[:2], self.heads, self.head_dim), rotary_pos_emb)
        k = apply_rotary_pos_emb(k.view(*k.shape[:2], self.groups, self.head_dim), rotary_pos_emb)
        v = v.view(*v.shape[:2], self.groups, self.head_dim)
        repeat = self.heads // self.groups
        k = k.repeat_interleave(repeat, dim=2)
        v = v.repeat_interleave(repeat, dim=2)
        context = self.core_attention(q, k, v, attention_mask)
        return self.dense(context), (k, v) if use_cache else None


class MLP(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states):
        gate, up = self.dense_h_to_4h(hidden_states).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = SelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, hidden_states, attention_mask, rotary_pos_emb, kv_cache=None, use_cache=True):
        attention_output, kv_cache = self.self_attention(self.input_layernorm(hidden_states), attention_mask,
                                                         rotary_pos_emb, kv_cache=kv_cache, use_cache=use_cache)
        layernorm_input = hidden_states + attention_output
        output = layernorm_input + self.mlp(self.post_attention_layernorm(layernorm_input))
        return output, kv_cache


class GLMTransformer(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)

    def forward(self, hidden_states, attention_mask, rotary_pos_emb):
        for layer in self.layers:
            hidden_states, _ = layer(hidden_states, attention_mask, rotary_pos_emb)
        return self.final_layernorm(hidden_states)


class Embedding(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids):
        return self.word_embeddings(input_ids).transpose(0, 1).contiguous()  # [seq, batch, hidden]


class ChatGLMModel(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.embedding = Embedding(config)
        self.rotary_pos_emb = RotaryEmbedding(config.kv_channels // 2)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)

    def forward(self, input_ids):
        seq = input_ids.shape[1]
        hidden = self.embedding(input_ids)
        rope = self.rotary_pos_emb(seq)
        mask = torch.full((seq, seq), float("-inf")).triu(1)
        return self.output_layer(self.encoder(hidden, mask, rope))


class ChatGLMForConditionalGeneration(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.config = config
        self.transformer = ChatGLMModel(config)

    def forward(self, input_ids):
        return self.transformer(input_ids)


def tiny_chatglm2(seed: int = 0, **overrides) -> ChatGLMForConditionalGeneration:
    """A ChatGLM2-style model with random (seeded) weights, norms and biases away from their init values."""
    config = ChatGLMConfig(**overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ChatGLMForConditionalGeneration(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("layernorm.weight", ".bias")):
                    p.add_(0.1 * torch.randn_like(p))
    return model.eval()
