"""Device housekeeping shared by the bench's attention and end-to-end parts. torch is imported
inside the functions: baselines.py imports this module and stays torch-free at import."""

from __future__ import annotations

import gc

from ..errors import summary


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _one_line(e: BaseException) -> str:
    return summary(e)
