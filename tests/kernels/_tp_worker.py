"""One rank of the tensor-parallel test (run by torchrun from test_tensor_parallel.py).

Loads a saved model with transformers' tp_plan="auto" (heads shard over the ranks; each rank's
attention sees only its local query and KV heads), runs one prefill dense and one with a PBS
profile, and rank 0 writes both logits and the per-layer stats to the output file.
"""
import json
import sys

import torch

from pbs_kernels import LayerConfig, PbsProfile
from pbs_kernels.integrations.hf import apply_profile, pbs_stats, remove_profile
from transformers import AutoModelForCausalLM


def main(folder: str, out: str, threshold: float) -> None:
    model = AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto", dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 600), generator=torch.Generator().manual_seed(0))
    profile = PbsProfile(defaults=LayerConfig(block_size=32, segment_size=64, threshold=threshold, min_seq_len=0))
    with torch.no_grad():
        dense = model(ids).logits
        apply_profile(model, profile, backend="torch", collect_stats=True)
        pbs = model(ids).logits
        stats = pbs_stats(model)
        remove_profile(model)
    rank = torch.distributed.get_rank()
    if rank == 0:
        torch.save({
            "dense": dense, "pbs": pbs, "world": torch.distributed.get_world_size(),
            "stats": {int(k): {"dense": s.dense, "reason": s.reason, "heads": len(s.density_per_head or [])}
                      for k, s in stats.items()},
        }, out)
    torch.distributed.barrier()
    # Leave together: a rank exiting with gloo still connected can abort in C++ (pbs's finish()).
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
