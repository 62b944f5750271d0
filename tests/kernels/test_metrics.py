"""metrics: the oracle at a given recall and selection efficiency."""
import itertools

import torch

from pbs_kernels.metrics import oracle_tiles_at_recall, selection_efficiency


def test_oracle_tiles_at_recall_is_the_fewest_tiles_reaching_it():
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        m = torch.rand(3, 3, generator=g) ** 3
        m = m / m.sum(-1, keepdim=True)
        rows = torch.tensor([4.0, 4.0, 2.0])
        recall = float(torch.rand((), generator=g)) * 0.9 + 0.05
        gain = (m * (rows / rows.sum())[:, None]).flatten().tolist()
        best = min(n for n in range(10) for c in itertools.combinations(range(9), n)
                   if sum(gain[i] for i in c) >= recall - 1e-6)
        assert oracle_tiles_at_recall(m, rows, recall) == best


def test_selection_efficiency():
    assert selection_efficiency(50, 100) == 0.5
    assert selection_efficiency(0, 0) == 1.0
