"""One layer's calibration activations and what a PBS setting does to them.

`LayerEvaluator(capture)` computes the dense reference of the layer once (output and per-row
log-sum-exp, from the attend op over every causal tile, so the reference and the sparse result
share their arithmetic), then `evaluate(config)` runs PBS on the same Q/K/V and returns the
accuracy figures of docs/design.md, Metrics (output error, recall, density) and the cost relative to dense
attention: measured kernel time on CUDA, the cost model elsewhere (cost.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pbs_kernels.attention import pbs_plan
from pbs_kernels.metrics import output_error, recall_from_lse
from pbs_kernels.profile import LayerConfig

from .cost import dense_time_ms, pbs_time_ms, predicted_cost

__all__ = ["LayerCapture", "LayerEvaluator", "LayerMeasure"]


@dataclass
class LayerCapture:
    """Post-RoPE inputs of one attention layer from the dense calibration prefill.

    q: [1, HQ, N, D]; k, v: [1, H, N, D]; scale: the model's softmax scale.
    unsupported: why PBS cannot run this layer (the integration keeps it dense), or None.
    window, softcap: the layer's sliding window (when shorter than the prompt) and logit soft-
    capping, as the model runs it: the reference and every setting are evaluated with them.
    """

    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    unsupported: str | None = None
    window: int | None = None
    softcap: float | None = None

    @classmethod
    def of(cls, layer, q, k, v) -> LayerCapture:
        """From a `workflows.capture.CapturedLayer` and its (moved or made contiguous) tensors; a
        window as long as the prompt is no window."""
        w = layer.sliding_window
        return cls(layer.layer, q, k, v, scale=layer.scale, unsupported=layer.fallback,
                   window=int(w) if w is not None and w < k.shape[2] else None, softcap=layer.softcap)

    @property
    def n_tokens(self) -> int:
        return self.q.shape[2]

    def to(self, device) -> LayerCapture:
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return LayerCapture(self.layer, move(self.q), move(self.k), move(self.v), self.scale, self.unsupported,
                            self.window, self.softcap)

    def features(self) -> dict:
        """The layer's window and soft-capping as pbs_attention / pbs_plan keywords."""
        return {"window": self.window, "softcap": self.softcap}


@dataclass
class LayerMeasure:
    """What one setting does on one layer. cost: time / dense time (measured or predicted).
    predicted_cost: the cost model's figure, kept beside a measured cost to check the model."""

    error: float
    recall: float
    density: float
    cost: float
    predicted_cost: float
    time_ms: float | None = None
    density_per_head: list[float] = field(default_factory=list)


class LayerEvaluator:
    """Scores PBS settings on one layer's captured Q/K/V.

    cost_model: "measured" (CUDA: time `pbs_attention` against the fastest dense SDPA backend)
    or "predicted" (cost.predicted_cost from the tile density).
    """

    def __init__(self, capture: LayerCapture, *, cost_model: str, backend: str = "auto",
                 dense_ms: float | None = None):
        if cost_model not in ("measured", "predicted"):
            raise ValueError(f"LayerEvaluator: cost_model {cost_model!r}")
        self.capture = capture
        self.cost_model = cost_model
        self.backend = backend
        q, k = capture.q, capture.k
        N = q.shape[2]
        self.n_tokens = N
        # Dense reference through the same attend kernel over every causal tile (a threshold-1.0
        # plan without permutation), so the output is exact dense attention and its lse the full
        # softmax normaliser recall is measured against.
        ref_b = 128 if N >= 1024 else 16
        with torch.no_grad():
            full = pbs_plan(q, k, capture.v, block_size=ref_b, segment_size=ref_b, threshold=1.0, permute=False,
                            scale=capture.scale, backend=backend, **capture.features())
            self.ref_out, self.ref_lse = full.attend(q, return_lse=True)
        del full
        self.dense_ms = dense_ms
        self.dense_backend: str | None = None
        if cost_model == "measured" and dense_ms is None:
            # Full budget: every trial's cost is divided by this one number.
            self.dense_ms, self.dense_backend = dense_time_ms(q, k, capture.v, scale=capture.scale)

    @torch.no_grad()
    def evaluate(self, config: LayerConfig) -> LayerMeasure:
        """Accuracy and cost of `config` on this layer (config.dense: the exact dense point)."""
        cap = self.capture
        if config.dense or self.n_tokens <= config.segment_size:
            return LayerMeasure(error=0.0, recall=1.0, density=1.0, cost=1.0, predicted_cost=1.0,
                                time_ms=self.dense_ms, density_per_head=[1.0] * cap.q.shape[1])
        q, k, v, scale = cap.q, cap.k, cap.v, cap.scale
        be = self.backend
        b = config.block_size
        plan = pbs_plan(q, k, v, scale=scale, backend=be, **config.plan_kwargs(), **cap.features())
        out, lse = plan.attend(q, return_lse=True)
        error = output_error(out, self.ref_out)
        recall = recall_from_lse(lse, self.ref_lse)
        per_head = plan.density_per_head().float().cpu()
        density = float(per_head.mean())
        # The vertical keys are work too (at most vertical_keys / segment_size of dense).
        work = density + plan.vertical_density()
        del out, lse, plan
        predicted = predicted_cost(block_size=b, permute=config.permute, density=work, n_tokens=self.n_tokens)
        time = None
        cost = predicted
        if self.cost_model == "measured":
            time = pbs_time_ms(q, k, v, scale=scale, backend=be, quick=True, **config.plan_kwargs(),
                               **cap.features())
            cost = time / self.dense_ms
        return LayerMeasure(error=error, recall=recall, density=density, cost=cost, predicted_cost=predicted,
                            time_ms=time, density_per_head=[round(float(x), 5) for x in per_head])
