"""`pbs bench --e2e`: time to first token of a model, dense and with a profile applied."""

from __future__ import annotations

import statistics
import time

import torch

from .. import distributed
from ..capture import logits_kwargs
from ..errors import E2EUnavailable, ModelUnsupported, ProfileNotForModel
from ..model import build_prompt, check_seq_len, load_model
from ..progress import ProgressFn
from ._util import _free, _one_line
from .results import E2EResult
from .settings import E2E_REPS, E2E_WARMUP, BenchSettings


def _ttft_ms(model, input_ids, device, warmup: int = E2E_WARMUP, reps: int = E2E_REPS):
    """(median wall-clock ms of one prefill with use_cache=True up to the first token's logits,
    those logits in fp32 on the CPU). Under torchrun every rep starts with all ranks lined up
    (distributed.sync_all) and counts the slowest rank's time (distributed.slowest): a sharded
    prefill is done when its last rank is."""
    kwargs = logits_kwargs(model)
    times = []
    logits = None
    for i in range(warmup + reps):
        distributed.sync_all(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(input_ids=input_ids, use_cache=True, **kwargs)
            token = out.logits[:, -1].argmax(-1)
        int(token[0])  # waits for the GPU
        elapsed = (time.perf_counter() - t0) * 1e3
        if i == warmup + reps - 1:
            logits = out.logits[0, -1].float().cpu()
        del out, token
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(distributed.slowest(times, device)), logits


def run_e2e(s: BenchSettings, profile, device, progress: ProgressFn) -> tuple[list[E2EResult], list[str]]:
    """TTFT of the model as loaded (dense attention), then with `profile` (the PbsProfile that
    run_bench loaded from s.profile, or the defaults) applied. Everything that can fail on the
    user's input (the model, the lengths, whether the profile fits the model) is checked before
    the first timing; `run_bench` runs this before the attention bench, so a profile made for
    another model fails in seconds, not after the whole bench."""
    try:  # the integration needs transformers, an optional dependency
        from pbs_kernels.integrations.hf import PbsIntegrationError, apply_profile, attention_layers, remove_profile
    except ImportError as e:
        raise E2EUnavailable(_one_line(e)) from None
    loaded = load_model(s.model, device=device.type, dtype=s.dtype, tensor_parallel=True)
    for n in s.seq_lens:
        check_seq_len(loaded, n)
    layers = [m.layer_idx for m in attention_layers(loaded.model)]
    extra = sorted(i for i in profile.layers if layers and i > max(layers))
    if extra:
        raise ProfileNotForModel(s.profile or "default", extra[0], loaded.name, max(layers) + 1)
    try:
        # apply_profile is where the runtime checks that the profile fits the model (layer count,
        # attention interface); undone at once for the dense timings.
        remove_profile(apply_profile(loaded.model, profile))
    except PbsIntegrationError as e:
        raise ModelUnsupported(loaded.name, type(loaded.model).__name__, str(e)) from None
    notes = [f"e2e model: {loaded.name}; profile: {s.profile or 'method defaults'}"]
    if device.type != "cuda":
        notes.append("e2e on cpu: wall-clock times, not meaningful as performance figures")
    if loaded.ranks > 1:
        notes.append(f"e2e tensor-parallel over {loaded.ranks} processes: each time is the slowest rank's, all "
                     "ranks started together")
    prompts = {n: build_prompt(loaded, n).input_ids for n in s.seq_lens}
    total = 2 * len(s.seq_lens)
    desc = "e2e ttft"
    progress(desc, 0, total)
    dense = {}
    for i, n in enumerate(s.seq_lens):
        dense[n] = _ttft_ms(loaded.model, prompts[n], loaded.device, s.e2e_warmup, s.e2e_reps)
        progress(desc, i + 1, total)
    _free(device)
    model = apply_profile(loaded.model, profile)
    results = []
    for i, n in enumerate(s.seq_lens):
        ms, logits = _ttft_ms(model, prompts[n], loaded.device, s.e2e_warmup, s.e2e_reps)
        ms_dense, logits_dense = dense[n]
        results.append(E2EResult(n, ms_dense, ms, ms_dense / ms if ms > 0 else None,
                                 logits_error=float((logits - logits_dense).norm() / logits_dense.norm()),
                                 same_token=bool(logits.argmax() == logits_dense.argmax())))
        progress(desc, len(s.seq_lens) + i + 1, total)
    del model, loaded, prompts
    _free(device)
    return results, notes
