"""Tensor-parallel test helpers: the tiny Llama every TP test loads, and a torchrun launcher.

The model has 4 query / 2 key-value heads, so two ranks hold one KV group each, and the demo
tokenizer, so `pbs eval` can build prompts for it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def save_tp_llama(folder: Path) -> Path:
    """Random weights (seed 0), saved with save_pretrained like a user's model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pbs_kernels.demo import VOCAB, build_demo_tokenizer

    cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    build_demo_tokenizer().save_pretrained(folder)
    return Path(folder)


def torchrun(args: list, *, nproc: int = 2, timeout: int = 300, cwd=None) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node N ARGS...` on gloo (CPU),
    with this checkout first on the path and one thread per rank (the CI machine has 2 cores)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "kernels"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
