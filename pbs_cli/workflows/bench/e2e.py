"""`pbs bench --e2e`: time to first token of a model, dense and with a profile applied."""

from __future__ import annotations

import statistics
import time

from ..capture import logits_kwargs
from ..errors import E2EUnavailable, ModelUnsupported, ProfileNotForModel
from ..progress import ProgressFn
from ._util import _free, _one_line, _sync
from .results import E2E_REPS, E2E_WARMUP, BenchSettings, E2EResult


def _ttft_ms(model, input_ids, device, warmup: int = E2E_WARMUP, reps: int = E2E_REPS) -> float:
    """Median wall-clock ms of one prefill with use_cache=True up to the first token's logits."""
    import torch

    kwargs = logits_kwargs(model)
    times = []
    for i in range(warmup + reps):
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(input_ids=input_ids, use_cache=True, **kwargs)
            token = out.logits[:, -1].argmax(-1)
        int(token[0])  # waits for the GPU
        elapsed = (time.perf_counter() - t0) * 1e3
        del out, token
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def run_e2e(s: BenchSettings, device, progress: ProgressFn) -> tuple[list[E2EResult], list[str]]:
    """TTFT of the model as loaded (dense attention), then with the profile applied. Everything
    that can fail on the user's input (the model, the lengths, the profile and whether it fits
    the model) is checked before the first timing; `run_bench` runs this before the attention
    bench, so a profile made for another model fails in seconds, not after the whole bench."""
    from pbs_kernels.profile import PbsProfile

    from ..model import build_prompt, check_seq_len, load_model

    try:
        from pbs_kernels.integrations.hf import PbsIntegrationError, apply_profile, attention_layers, remove_profile
    except ImportError as e:
        raise E2EUnavailable(_one_line(e)) from None
    profile = PbsProfile.load(s.profile) if s.profile else PbsProfile.default()
    loaded = load_model(s.model, device=device.type, dtype=s.dtype)
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
    prompts = {n: build_prompt(loaded, n).input_ids for n in s.seq_lens}
    total = 2 * len(s.seq_lens)
    desc = "e2e ttft"
    progress(desc, 0, total)
    dense = {}
    for i, n in enumerate(s.seq_lens):
        dense[n] = _ttft_ms(loaded.model, prompts[n], device, s.e2e_warmup, s.e2e_reps)
        progress(desc, i + 1, total)
    _free(device)
    model = apply_profile(loaded.model, profile)
    results = []
    for i, n in enumerate(s.seq_lens):
        ms = _ttft_ms(model, prompts[n], device, s.e2e_warmup, s.e2e_reps)
        results.append(E2EResult(n, dense[n], ms, dense[n] / ms if ms > 0 else None))
        progress(desc, len(s.seq_lens) + i + 1, total)
    del model, loaded, prompts
    _free(device)
    return results, notes
