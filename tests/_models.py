"""Tiny models saved with save_pretrained, loaded by the CLI tests the way a user's folder is."""
from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_llama(folder: Path, *, layers: int = 2, max_positions: int = 4096, local: bool = True) -> Path:
    """A 2-head Llama with the demo tokenizer. local=True: every token embedding shares one large
    direction and q_proj = k_proj with a small RoPE base, so q·k follows RoPE's kernel of the
    distance and attention is sharply local, which PBS can exploit (a random model's uniform
    attention has nothing to skip, so no speedup target is reachable on it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pbs_kernels.demo import VOCAB, build_demo_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                      max_position_embeddings=max_positions, rope_theta=100.0)
    model = LlamaForCausalLM(cfg)
    if local:
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(0.1).add_(torch.randn(128))
            for layer in model.model.layers:
                w = torch.randn(64, 128) * 0.35
                layer.self_attn.q_proj.weight.copy_(torch.cat([w, w], 0))
                layer.self_attn.k_proj.weight.copy_(w)
    model.save_pretrained(folder)
    build_demo_tokenizer().save_pretrained(folder)
    return Path(folder)
