"""PBS under transformers' tensor parallelism (tp_plan="auto"), two CPU processes on gloo.

Heads are independent and a KV head's query group stays on one rank, so PBS on each rank's local
heads must give the same logits as one process holding every head: exactly dense at threshold
1.0, and the same sparse result as a single process at a lower threshold.
"""
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate", reason="transformers' tp_plan needs accelerate (the dev extra installs it)")

from pbs_kernels import LayerConfig, PbsProfile  # noqa: E402
from pbs_kernels.integrations.hf import apply_profile  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from _tp import torchrun  # noqa: E402

WORKER = Path(__file__).with_name("_tp_worker.py")


def _tp_run(folder, out, threshold):
    res = torchrun([WORKER, folder, out, threshold])
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out)


def _single_process(folder, threshold):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 600), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids).logits
        apply_profile(model, PbsProfile(defaults=LayerConfig(block_size=32, segment_size=64, threshold=threshold,
                                                             min_seq_len=0)), backend="torch")
        pbs = model(ids).logits
    return dense, pbs


@pytest.mark.parametrize("threshold", [1.0, 0.5])
def test_pbs_on_local_heads_matches_one_process(tp_llama, tmp_path, threshold):
    got = _tp_run(tp_llama, tmp_path / "tp.pt", threshold)
    assert got["world"] == 2
    # Every layer ran PBS, each rank on its 2 of the 4 query heads.
    assert got["stats"] == {0: {"dense": False, "reason": None, "heads": 2},
                            1: {"dense": False, "reason": None, "heads": 2}}
    dense_1, pbs_1 = _single_process(tp_llama, threshold)
    assert torch.allclose(got["dense"], dense_1, atol=1e-4)
    assert torch.allclose(got["pbs"], pbs_1, atol=1e-4)
    if threshold == 1.0:
        assert torch.allclose(got["pbs"], got["dense"], atol=1e-4)
    else:
        assert not torch.allclose(got["pbs"], got["dense"], atol=1e-4)  # the sparse path really ran
