"""Device housekeeping shared by the bench's attention and end-to-end parts."""

from __future__ import annotations


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _one_line(e: BaseException) -> str:
    from ..errors import summary

    return summary(e)
