"""Tensor-parallel runs under torchrun: the one recipe `load_model`, `pbs bench --e2e` and
`pbs eval` share.

    r = ranks()                      # from torchrun's environment; r.active when WORLD_SIZE > 1
    dev = rank_device("auto")        # this rank's device, checked (cuda:LOCAL_RANK or cpu)
    check_shardable(name, config)    # NotShardable from the config alone
    start(dev)                       # the process group: gloo on the CPU, nccl on CUDA
    model = AutoModelForCausalLM.from_pretrained(path, **load_kwargs())
    ...
    finish()                         # pbs's entry point calls it once the command succeeded

Every rank runs the same code with the same inputs, so every collective (transformers' all-reduce
in each layer, the barriers and reductions below) is matched on every rank. Only rank 0 prints
and writes files (`is_main`); the others compute silently. Outside torchrun, what the
workflows call in every run (is_main, load_kwargs, sync_all, slowest) does nothing distributed
and never touches torch.distributed.

Timings: `sync_all` lines the ranks up before a timed call (device sync, then a barrier), and
`slowest` replaces each rank's figure by the maximum over ranks: a prefill is done when its last
rank is done, so rank 0 reports the slowest rank's time, not its own.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

from .errors import CudaUnavailable, DeviceError, NotShardable, TensorParallelDevice

__all__ = ["Ranks", "check_shardable", "finish", "is_main", "load_kwargs", "rank_device", "ranks", "slowest", "start",
           "sync_all"]

# transformers' own process group waits up to 2 hours (rank skew while sharded weights load);
# ours replaces it, so it must wait as long.
PG_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Ranks:
    """Where this process sits in a torchrun launch (world 1: a plain single process)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def ranks() -> Ranks:
    """This process's place from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK,
    LOCAL_WORLD_SIZE); Ranks() when not launched by torchrun."""
    world = max(_env_int("WORLD_SIZE", 1), 1)
    if world == 1:
        return Ranks()
    return Ranks(world, _env_int("RANK", 0), _env_int("LOCAL_RANK", 0), max(_env_int("LOCAL_WORLD_SIZE", world), 1))


def is_main() -> bool:
    """True on the process that prints and writes files: rank 0, or the only process."""
    return ranks().main


def _active_group() -> bool:
    if not ranks().active:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank_device(device: str = "auto"):
    """This rank's torch.device for 'auto' | 'cpu' | 'cuda', checked without touching the process
    group: the CPU on a machine with GPUs is refused (transformers shards onto the accelerator it
    detects, whatever we ask), so are CUDA asked for and absent and fewer GPUs than local ranks."""
    import torch

    r = ranks()
    device = getattr(device, "value", device)
    if device not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"unknown device {device!r}; use auto, cpu or cuda")
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise CudaUnavailable()
    if device == "cpu" and cuda:
        raise TensorParallelDevice("cpu_with_gpu", r.local_world, torch.cuda.device_count())
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    if device == "cuda" and torch.cuda.device_count() < r.local_world:
        raise TensorParallelDevice("too_few_gpus", r.local_world, torch.cuda.device_count())
    return torch.device("cuda", r.local_rank) if device == "cuda" else torch.device("cpu")


def start(dev) -> None:
    """Initialise the process group for `dev` (rank_device's) if nobody did yet: gloo on the
    CPU, nccl on CUDA with this rank's GPU bound."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            # Bound at init: barrier() then uses this GPU instead of guessing one (and warning).
            dist.init_process_group("nccl", timeout=PG_TIMEOUT, device_id=dev)
        else:
            dist.init_process_group("gloo", timeout=PG_TIMEOUT)


def finish() -> None:
    """Leave the process group together: a barrier, then destroy it. Without this the ranks exit
    one by one with gloo's threads still connected, and the later rank can abort in C++
    ("terminate called without an active exception", SIGABRT: seen once in CI on a 2-rank run
    whose output was already written). Does nothing where no group was started, and never
    imports torch for a command that did not."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()


def check_shardable(name: str, config, world: int | None = None) -> None:
    """NotShardable unless transformers has a tensor-parallel plan for this architecture and its
    query and key/value heads split evenly over `world` ranks (transformers loads uneven shards
    without complaint and fails inside the first forward with a reshape error)."""
    import math

    world = ranks().world if world is None else world
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    arch = type(config).__name__.removesuffix("Config")
    if not (getattr(text, "base_model_tp_plan", None) or getattr(config, "base_model_tp_plan", None)):
        raise NotShardable(name, world, arch=arch)
    heads = getattr(text, "num_attention_heads", None)
    kv = getattr(text, "num_key_value_heads", None) or heads
    if isinstance(heads, int) and isinstance(kv, int) and (heads % world or kv % world):
        g = math.gcd(heads, kv)
        valid = [n for n in range(1, g + 1) if g % n == 0]
        raise NotShardable(name, world, arch=arch, heads=heads, kv_heads=kv, valid=valid)


def load_kwargs() -> dict:
    """from_pretrained's keywords for a sharded load (empty outside torchrun)."""
    if not ranks().active:
        return {}
    # tp_plan="auto" works on transformers 5.17 (the GPU machine) and 5.24 (this one); 5.24 wants a
    # DistributedConfig instead and says so with a FutureWarning, which load_model silences.
    return {"tp_plan": "auto"}


def sync_all(device) -> None:
    """Wait for this rank's device, then for every rank: the start line of a timed call."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if _active_group():
        import torch.distributed as dist

        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def slowest(values: Sequence[float], device=None) -> list[float]:
    """Each value replaced by its maximum over the ranks (one all-reduce; every rank must call it
    with as many values). Outside torchrun: the values unchanged."""
    values = [float(v) for v in values]
    if not _active_group() or not values:
        return values
    import torch
    import torch.distributed as dist

    # nccl reduces CUDA tensors only; gloo takes CPU ones.
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=on)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()
