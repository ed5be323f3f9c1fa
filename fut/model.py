"""The LLaMA-style causal LM, built from params with a seeded random init (nothing is downloaded)."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .config import ModelConfig


def llama_config(cfg: ModelConfig, vocab_size: int, seq_len: int, eos_id: int = 0) -> LlamaConfig:
    # Eager attention: SDPA on CPU breaks double-backward and forward-mode AD, which the estimators use.
    # A new config object per model: the attention choice lives on it and would leak between models.
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=seq_len,
        rms_norm_eps=cfg.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, use_cache=False,
        attn_implementation="eager")


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int, eos_id: int = 0) -> LlamaForCausalLM:
    """Seeded init that leaves the caller's global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        model = LlamaForCausalLM(llama_config(cfg, vocab_size, seq_len, eos_id))
    return model.float()


def count_parameters(cfg: ModelConfig, vocab_size: int, seq_len: int) -> int:
    """Parameter count without allocating: the model is built on the meta device."""
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(cfg, vocab_size, seq_len))
    return sum(p.numel() for p in model.parameters())
