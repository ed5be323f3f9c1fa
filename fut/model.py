"""The causal LM: a LLaMA-style model built from params with a seeded random init, or the user's own checkpoint
(`model.pretrained`, fut/pretrained.py). Nothing is downloaded."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from . import pretrained
from .config import ConfigError, ModelConfig


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


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int, eos_id: int = 0) -> torch.nn.Module:
    """The pretrained checkpoint's model, or a seeded init that leaves the caller's global RNG untouched."""
    if cfg.pretrained is not None:
        return pretrained_model(cfg, seq_len)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        model = LlamaForCausalLM(llama_config(cfg, vocab_size, seq_len, eos_id))
    return model.float()


def check_seq_len(cfg: ModelConfig, seq_len: int) -> None:
    """A pretrained model's positions bound the sequence length."""
    limit = pretrained.max_positions(Path(cfg.pretrained))
    if limit is not None and seq_len > limit:
        raise ConfigError(f"params: data.seq_len = {seq_len} is not allowed; expected an int <= {limit}, the "
                          f"max_position_embeddings of model.pretrained = {cfg.pretrained!r}")


def pretrained_model(cfg: ModelConfig, seq_len: int) -> torch.nn.Module:
    """The checkpoint exactly as stored: refused if any of its parameters would start random."""
    check_seq_len(cfg, seq_len)
    model, missing = pretrained.load_model(Path(cfg.pretrained))
    if missing:
        raise ConfigError(f"params: model.pretrained = {cfg.pretrained!r} is not allowed; expected weights for "
                          f"every parameter, but its safetensors lack {', '.join(missing[:3])}"
                          + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
                          + " (they would start random)")
    return model


def count_parameters(cfg: ModelConfig, vocab_size: int, seq_len: int) -> int:
    """Parameter count without allocating: the model is built on the meta device (tied weights count once)."""
    if cfg.pretrained is not None:
        model = pretrained.meta_model(Path(cfg.pretrained))
    else:
        with torch.device("meta"):
            model = LlamaForCausalLM(llama_config(cfg, vocab_size, seq_len))
    return sum(p.numel() for p in model.parameters())
