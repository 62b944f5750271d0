"""Serving rows of `pbs bench`: the last chunk of a prompt against its cached prefix, and one
packed batch of sequences of mixed lengths, each against dense attention on the same GPU.

* chunk rows (per --seq-len N and chunk size C): queries N-C .. N-1 against all N keys.
    sdpa-lower-right  SDPA with a lower-right causal bias (K/V heads repeated beforehand)
    varlen-flash      torch.nn.attention.varlen.varlen_attn (FlashAttention varlen, bottom-right
                      causal), when this torch has it
    pbs-chunk         pbs_attention with a PbsPrefixCache holding the order of the segments the
                      earlier chunks completed (the steady state of chunked prefill)
    pbs-chunk-nocache the same call without the cache (re-scores the whole prefix)
* varlen rows (--lengths): the sequences packed [total, heads, D] in flash-attn's layout.
    dense-per-seq     dense_causal_attention per sequence (the runtime's fallback, cuDNN first)
    varlen-flash      varlen_attn in one launch, when available
    pbs-varlen        pbs_attention_varlen (the batch packed, one launch per op, short ones dense)

Every row's output is checked in the same run against fp32 dense attention (chunked, never
N x N): error above the bench's max error is FAILED and gets no speedup. speedup: the fastest
dense row of the case / the row.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

from pbs_kernels.metrics import output_error as rel_error
from pbs_kernels.reference import dense_reference

from ..lengths import format_length
from ._util import _free
from .harness import DENSE_TOL
from .results import FAILED, OK, UNAVAILABLE, MethodResult, SeqLenResult

DENSE_ROWS = ("sdpa-lower-right", "varlen-flash", "dense-per-seq")
_NO_VARLEN = "needs CUDA and torch.nn.attention.varlen with causal masking"


def _varlen_fn():
    """torch's FlashAttention varlen entry point and how it takes causality and GQA, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, params


def varlen_dense(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float) -> Optional[Callable[[], Any]]:
    """A no-argument call of dense causal varlen attention on packed [T, heads, D] tensors, or None."""
    found = _varlen_fn()
    if found is None or not q.is_cuda:
        return None
    fn, params = found
    kw: dict = {"scale": scale}
    if "is_causal" in params:
        kw["is_causal"] = True
    elif "window_size" in params:
        kw["window_size"] = (-1, 0)
    else:
        return None
    G = q.shape[1] // k.shape[1]
    if G > 1 and "enable_gqa" in params:
        kw["enable_gqa"] = True
    elif G > 1:
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    return lambda: fn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)


def _row(bench, name: str, fn: Callable[[], Any], ref, n: int, *, dense: bool, density=None) -> MethodResult:
    try:
        out = fn()
    except (RuntimeError, NotImplementedError) as e:  # a backend that does not take these shapes
        return MethodResult(name, UNAVAILABLE, note=str(e).splitlines()[0][:160])
    row = MethodResult(name, OK, error=rel_error(out, ref), density=density)
    del out
    row.ms = bench.time(fn, n)
    if dense:
        if not row.error <= DENSE_TOL:
            row.status, row.note = FAILED, f"error {row.error:.3g} > {DENSE_TOL:g} vs the fp32 reference"
        return row
    return bench.gate(row)


def _speedups(result: SeqLenResult) -> None:
    dense = [m for m in result.methods if m.method in DENSE_ROWS and m.status == OK and m.ms]
    if not dense:
        return
    best = min(dense, key=lambda m: m.ms)
    result.fastest_dense, result.fastest_dense_ms = best.method, best.ms
    for m in result.methods:
        if m.status == OK and m.ms:
            m.speedup = best.ms / m.ms


def chunk_case(bench, wl, n: int, chunk: int) -> SeqLenResult:
    """The last `chunk` queries of an n-token prompt against its n keys."""
    import torch
    import torch.nn.functional as F
    from pbs_kernels.attention import PbsPrefixCache, pbs_attention

    cfg = bench.cfg
    q, k, v, scale = wl.q, wl.k, wl.v, wl.scale
    B, HQ, N, D = q.shape
    H = k.shape[1]
    qc = q[:, :, N - chunk:].contiguous()
    result = SeqLenResult(N, B, HQ, H, D, reference="fp32", fastest_dense=None, fastest_dense_ms=None,
                          case=f"chunk {format_length(chunk)} of {format_length(N)}")
    desc = f"bench chunk {format_length(chunk)}/{format_length(N)}"
    bench.progress(desc, 0, 5)
    ref = dense_reference(qc, k, v, scale)
    G = HQ // H
    kr, vr = (k, v) if G == 1 else (k.repeat_interleave(G, 1), v.repeat_interleave(G, 1))
    from torch.nn.attention.bias import causal_lower_right

    bias = causal_lower_right(chunk, N)
    result.methods.append(_row(bench, "sdpa-lower-right",
                               lambda: F.scaled_dot_product_attention(qc, kr, vr, attn_mask=bias, scale=scale), ref, N,
                               dense=True))
    del kr, vr
    bench.progress(desc, 1, 5)
    qp = qc[0].transpose(0, 1).contiguous() if B == 1 else None
    if qp is not None:
        kp, vp = (t[0].transpose(0, 1).contiguous() for t in (k, v))
        cu_q = torch.tensor([0, chunk], dtype=torch.int32, device=q.device)
        cu_k = torch.tensor([0, N], dtype=torch.int32, device=q.device)
        call = varlen_dense(qp, kp, vp, cu_q, cu_k, chunk, N, scale)
        if call is not None:
            row = _row(bench, "varlen-flash", lambda: call().transpose(0, 1)[None], ref, N, dense=True)
            result.methods.append(row)
        else:
            result.methods.append(MethodResult("varlen-flash", UNAVAILABLE, note=_NO_VARLEN))
        del kp, vp
    bench.progress(desc, 2, 5)
    # min_seq_len 0: the sparse path at every length, as the whole-prompt "pbs" row
    knobs = dict(cfg.runtime_kwargs(), min_seq_len=0, scale=scale, backend=bench.backend)
    # The steady state: the cache holds the order of the segments the earlier chunks completed,
    # from the previous chunk's call (untimed).
    warm = PbsPrefixCache()
    start = max(0, N - 2 * chunk)
    if N - chunk > cfg.segment_size:
        pbs_attention(q[:, :, start:N - chunk], k[:, :, :N - chunk], v[:, :, :N - chunk], cache=warm, **knobs)
    held = warm.pos

    def with_cache():
        return pbs_attention(qc, k, v, cache=PbsPrefixCache(held, warm.segment_size), **knobs)

    _, st = pbs_attention(qc, k, v, return_stats=True, cache=PbsPrefixCache(held, warm.segment_size), **knobs)
    row = _row(bench, "pbs-chunk", with_cache, ref, N, dense=False, density=st.density)
    row.note = f"cache holds {warm.n_done} of {N - chunk} prefix positions"
    result.methods.append(row)
    bench.progress(desc, 3, 5)
    _, st0 = pbs_attention(qc, k, v, return_stats=True, **knobs)
    result.methods.append(_row(bench, "pbs-chunk-nocache", lambda: pbs_attention(qc, k, v, **knobs), ref, N,
                               dense=False, density=st0.density))
    bench.progress(desc, 5, 5)
    _speedups(result)
    del ref
    _free(q.device)
    return result


def varlen_case(bench, lengths: list[int], make) -> SeqLenResult:
    """One packed batch of sequences of `lengths` tokens (make(n, i) -> Workload)."""
    import torch
    from pbs_kernels.attention import dense_causal_attention, pbs_attention_varlen

    cfg = bench.cfg
    seqs = [make(n, i) for i, n in enumerate(lengths)]
    scale = seqs[0].scale
    B, HQ, _, D = seqs[0].q.shape
    H = seqs[0].k.shape[1]
    dev = seqs[0].q.device

    def pack(ts):
        return torch.cat([t[0].transpose(0, 1) for t in ts], dim=0).contiguous()

    q, k, v = pack([w.q for w in seqs]), pack([w.k for w in seqs]), pack([w.v for w in seqs])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    total, longest = int(cu[-1]), max(lengths)
    result = SeqLenResult(total, len(lengths), HQ, H, D, reference="fp32", fastest_dense=None, fastest_dense_ms=None,
                          case="varlen " + "+".join(format_length(n) for n in lengths))
    desc = f"bench varlen {len(lengths)} sequences"
    bench.progress(desc, 0, 4)
    ref = pack([dense_reference(w.q, w.k, w.v, scale) for w in seqs])
    views = [(w.q, w.k, w.v) for w in seqs]

    def per_seq():
        return torch.cat([dense_causal_attention(a, b, c, scale=scale)[0].transpose(0, 1) for a, b, c in views])

    result.methods.append(_row(bench, "dense-per-seq", per_seq, ref, longest, dense=True))
    bench.progress(desc, 1, 4)
    call = varlen_dense(q, k, v, cu, cu, longest, longest, scale)
    if call is not None:
        result.methods.append(_row(bench, "varlen-flash", call, ref, longest, dense=True))
    else:
        result.methods.append(MethodResult("varlen-flash", UNAVAILABLE, note=_NO_VARLEN))
    bench.progress(desc, 2, 4)
    knobs = dict(cfg.runtime_kwargs(), scale=scale, backend=bench.backend)
    _, stats = pbs_attention_varlen(q, k, v, cu, cu, longest, longest, return_stats=True, **knobs)
    tiles = sum(st.density * n * n for st, n in zip(stats, lengths))
    row = _row(bench, "pbs-varlen", lambda: pbs_attention_varlen(q, k, v, cu, cu, longest, longest, **knobs), ref,
               longest, dense=False, density=tiles / sum(n * n for n in lengths))
    n_dense = sum(st.dense for st in stats)
    row.note = f"{len(lengths) - n_dense} sequences PBS, {n_dense} dense; density weighted by n^2"
    result.methods.append(row)
    bench.progress(desc, 4, 4)
    _speedups(result)
    del seqs, views, ref
    _free(dev)
    return result
