"""Tiny Hugging Face causal LMs built offline from configs with random weights, for tests.

Tests import these as ``from hf_models import tiny_llama`` (pytest's default "prepend" import mode puts
``tests/`` on sys.path because it has no ``__init__.py``). Every builder seeds its own generator, so the same
arguments give the same weights in any test, in any order, under xdist.

``eos_token_id`` is left unset so that ``generate(max_new_tokens=n)`` always runs exactly ``n`` forward calls
(a random model may otherwise emit the EOS id and stop early); attention is "eager" so attention modules are
plain PyTorch and deterministic on CPU.
"""
from __future__ import annotations

import torch


def _seeded(seed: int, build):
    """Build under a fixed seed without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.eval()


def _common(vocab: int, overrides: dict) -> dict:
    settings = dict(vocab_size=vocab, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
                    pad_token_id=0, attn_implementation="eager")
    settings.update(overrides)
    return settings


def tiny_llama(num_layers: int = 2, hidden: int = 64, vocab: int = 128, seed: int = 0, **overrides):
    """A ``LlamaForCausalLM`` (RMSNorm, q/k/v/o projections, gate/up/down MLP, rotary) of a few hundred kB."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**_common(vocab, dict(hidden_size=hidden, intermediate_size=2 * hidden,
                                               num_hidden_layers=num_layers, num_attention_heads=4,
                                               num_key_value_heads=2, **overrides)))
    return _seeded(seed, lambda: LlamaForCausalLM(config))


def tiny_bloom(num_layers: int = 2, hidden: int = 64, vocab: int = 128, seed: int = 0, **overrides):
    """A ``BloomForCausalLM`` (LayerNorm, fused query_key_value, alibi; its attention and MLP add the residual)."""
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(**_common(vocab, dict(hidden_size=hidden, n_layer=num_layers, n_head=4, **overrides)))
    return _seeded(seed, lambda: BloomForCausalLM(config))


def tiny_qwen2(num_layers: int = 2, hidden: int = 64, vocab: int = 128, seed: int = 0, **overrides):
    """A ``Qwen2ForCausalLM`` (Llama-like, with q/k/v biases)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**_common(vocab, dict(hidden_size=hidden, intermediate_size=2 * hidden,
                                               num_hidden_layers=num_layers, num_attention_heads=4,
                                               num_key_value_heads=2, **overrides)))
    return _seeded(seed, lambda: Qwen2ForCausalLM(config))


def input_ids(batch: int = 1, seq: int = 8, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    """Random prompt token ids, shape ``(batch, seq)``, reproducible by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, seq), generator=generator)
