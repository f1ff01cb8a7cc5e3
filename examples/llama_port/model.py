"""The golden model of the example: a tiny Llama in float32, built offline from a fixed seed.

A porting team's golden is the original PyTorch model. Here it is an HF ``LlamaForCausalLM`` small enough to run
in a second on a CPU, with weights drawn from our own seeded generator rather than from HF's initialiser, so the
golden (and the greedy tokens it generates) does not change when a transformers release changes its init order.

The configuration uses linear RoPE scaling (factor 2), as long-context Llama variants do, so that forgetting the
scaling in the port is a bug the example can show.
"""
from __future__ import annotations

import torch

#: What ``generate`` is called with, on both sides: prefill (token 0) plus one decode step (token 1).
GENERATE_KWARGS = {"max_new_tokens": 2, "do_sample": False}

#: The architecture. 12 layers: more than the 10 the original tool needed before it found any layer at all.
CONFIG = {
    "hidden_size": 128,
    "num_hidden_layers": 12,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 384,
    "vocab_size": 256,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    # No special tokens: a random model has no end-of-sequence, and generate() must not stop on (or pad with) id 2.
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}
PROMPT_LENGTH = 16
DEFAULT_SEED = 4

#: Standard deviation of the random weights, per parameter kind. Linear weights follow HF's 0.02, except:
#: q/k projections are wider so that attention is peaked as in a trained model (with 0.02 it is nearly uniform,
#: and positions, hence RoPE, hardly matter); the lm_head is wider so that the logits have a clear winner (a
#: tie-breaking bf16 rounding would make the healthy port look broken); norm weights scatter around 1 like
#: trained ones do, instead of HF's exact ones.
WEIGHT_STD = {"embed_tokens": 0.02, "proj": 0.02, "qk_proj": 0.06, "lm_head": 0.15, "norm": 0.1}


def llama_config():
    """The HF ``LlamaConfig`` of the golden (eager attention: the plain reference math, no fused kernels)."""
    from transformers import LlamaConfig

    config = LlamaConfig(**CONFIG)
    config._attn_implementation = "eager"
    return config


def _std(name: str) -> float:
    if "norm" in name:
        return WEIGHT_STD["norm"]
    if "embed_tokens" in name:
        return WEIGHT_STD["embed_tokens"]
    if "lm_head" in name:
        return WEIGHT_STD["lm_head"]
    if "q_proj" in name or "k_proj" in name:
        return WEIGHT_STD["qk_proj"]
    return WEIGHT_STD["proj"]


def parameter_shapes(config: dict = CONFIG) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of ``LlamaForCausalLM(config)``, known without importing transformers."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * (hidden // config["num_attention_heads"])
    layer = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
             "self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv, hidden),
             "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, hidden),
             "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
             "mlp.down_proj.weight": (hidden, inter)}
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
    return shapes


@torch.no_grad()
def golden_weights(seed: int = DEFAULT_SEED) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``(state_dict, input_ids)`` of the golden of ``seed``, without building it (the port needs no transformers).

    Every parameter is drawn, in sorted-name order, from one ``torch.Generator`` seeded with ``seed``; norm
    weights are ``1 + N(0, 0.1)``, the others ``N(0, std)``. The prompt is ``PROMPT_LENGTH`` ids from the same
    generator.
    """
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in sorted(parameter_shapes().items()):
        values = torch.randn(shape, generator=generator, dtype=torch.float32) * _std(name)
        weights[name] = values + 1.0 if "norm" in name else values
    input_ids = torch.randint(0, CONFIG["vocab_size"], (1, PROMPT_LENGTH), generator=generator)
    return weights, input_ids


@torch.no_grad()
def build_golden(seed: int = DEFAULT_SEED):
    """``(model, input_ids)``: the float32 golden in eval mode with the weights and prompt of ``golden_weights``."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config())
    weights, input_ids = golden_weights(seed)
    params = dict(model.named_parameters())
    if {n: tuple(p.shape) for n, p in params.items()} != {n: tuple(w.shape) for n, w in weights.items()}:
        raise RuntimeError("this transformers release names or shapes LlamaForCausalLM's parameters differently "
                           "from model.parameter_shapes(): update it")
    for name, param in params.items():
        param.copy_(weights[name])
    return model.eval(), input_ids


@torch.no_grad()
def golden_generate(model, input_ids) -> list[int]:
    """The golden's greedy new token ids (what a healthy port must print)."""
    out = model.generate(input_ids, **GENERATE_KWARGS)
    return out[0, input_ids.shape[1]:].tolist()
