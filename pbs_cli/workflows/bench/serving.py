"""Serving cases of `pbs bench`: the last chunk of a prompt against its cached prefix, and one
packed batch of sequences of mixed lengths, each against dense attention on the same GPU.
Siblings of prompt.prompt_case: (harness, workload(s)) -> a gated, credited SeqLenResult.

* chunk_case (per --seq-len N and chunk size C): queries N-C .. N-1 against all N keys.
    sdpa-lower-right  SDPA with a lower-right causal bias (K/V heads repeated beforehand)
    varlen-flash      torch.nn.attention.varlen.varlen_attn (FlashAttention varlen, bottom-right
                      causal), when this torch has it
    pbs-chunk         pbs_attention with a PbsPrefixCache holding the order of the segments the
                      earlier chunks completed (the steady state of chunked prefill)
    pbs-chunk-nocache the same call without the cache (re-scores the whole prefix)
* varlen_case (--lengths): the sequences packed [total, heads, D] in flash-attn's layout.
    dense-per-seq     dense_causal_attention per sequence (the runtime's fallback, cuDNN first)
    varlen-flash      varlen_attn in one launch, when available
    pbs-varlen        pbs_attention_varlen (the batch packed, one launch per op, short ones dense)

The dense rows of each case are its registry (CHUNK_BASELINES, VARLEN_BASELINES): a new one is
an entry there. Every row's output is checked in the same run against fp32 dense attention
(chunked, never N x N): error above the bench's max error is FAILED and gets no speedup.
speedup: the fastest dense row of the case / the row.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from pbs_kernels.attention import PbsPrefixCache, dense_causal_attention, pbs_attention, pbs_attention_varlen
from pbs_kernels.reference import dense_reference
from torch.nn.attention.bias import causal_lower_right

from ..lengths import format_length
from ._util import _free
from .harness import Dense, Harness, credit, fastest
from .results import UNAVAILABLE, MethodResult, SeqLenResult
from .workloads import Workload

_NO_VARLEN = "needs CUDA and torch.nn.attention.varlen with causal masking"
_UNAVAILABLE_ON = (RuntimeError, NotImplementedError)  # a backend that does not take these shapes


def _varlen_fn():
    """torch's FlashAttention varlen entry point and how it takes causality and GQA, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch before 2.10
        return None
    return varlen_attn, inspect.signature(varlen_attn).parameters


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


def _dense_rows(h: Harness, registry: dict[str, Dense], case, ref, n: int, result: SeqLenResult, step) -> None:
    """The case's dense rows, in registry order, then its fastest one as the speedup's denominator."""
    rows = {}
    for name, b in registry.items():
        call = b.call(case)
        if isinstance(call, str):
            rows[name] = MethodResult(b.row or name, UNAVAILABLE, note=call)
        elif call is not None:
            rows[name] = h.measure(b.row or name, call, ref, n, dense=True, unavailable_on=_UNAVAILABLE_ON)
        step()
    result.methods += rows.values()
    best = fastest(rows)
    if best is not None:
        result.fastest_dense, result.fastest_dense_ms = rows[best].method, rows[best].ms


# ---------------------------------------------------------------------------------------------
# The last chunk of a prompt.


@dataclass
class Chunk:
    """The last `chunk` queries of an n-token prompt (qc) against its n keys."""

    qc: Any
    k: Any
    v: Any
    scale: float
    n: int
    chunk: int


def _lower_right(c: Chunk):
    G = c.qc.shape[1] // c.k.shape[1]
    kr, vr = (c.k, c.v) if G == 1 else (c.k.repeat_interleave(G, 1), c.v.repeat_interleave(G, 1))
    bias = causal_lower_right(c.chunk, c.n)
    return lambda: F.scaled_dot_product_attention(c.qc, kr, vr, attn_mask=bias, scale=c.scale)


def _chunk_varlen(c: Chunk):
    if c.qc.shape[0] != 1:
        return None  # the packed layout holds one sequence here
    qp, kp, vp = (t[0].transpose(0, 1).contiguous() for t in (c.qc, c.k, c.v))
    cu_q = torch.tensor([0, c.chunk], dtype=torch.int32, device=c.qc.device)
    cu_k = torch.tensor([0, c.n], dtype=torch.int32, device=c.qc.device)
    call = varlen_dense(qp, kp, vp, cu_q, cu_k, c.chunk, c.n, c.scale)
    return _NO_VARLEN if call is None else (lambda: call().transpose(0, 1)[None])


CHUNK_BASELINES = {"sdpa-lower-right": Dense(_lower_right), "varlen-flash": Dense(_chunk_varlen)}


def chunk_case(h: Harness, wl: Workload, chunk: int) -> SeqLenResult:
    """The last `chunk` queries of the workload's prompt against all its keys."""
    layer = h.layer
    q, k, v, scale = wl.q, wl.k, wl.v, wl.scale
    B, HQ, N, D = q.shape
    c = Chunk(q[:, :, N - chunk:].contiguous(), k, v, scale, N, chunk)
    result = SeqLenResult(N, B, HQ, k.shape[1], D, reference="fp32", fastest_dense=None, fastest_dense_ms=None,
                          case=f"chunk {format_length(chunk)} of {format_length(N)}")
    step = h.steps(f"bench chunk {format_length(chunk)}/{format_length(N)}", 3 + len(CHUNK_BASELINES))
    ref = dense_reference(c.qc, k, v, scale)
    step()
    _dense_rows(h, CHUNK_BASELINES, c, ref, N, result, step)
    # min_seq_len 0: the sparse path at every length, as the whole-prompt "pbs" row
    kw = h.pbs_kwargs(min_seq_len=0, scale=scale)
    # The steady state: the cache holds the order of the segments the earlier chunks completed,
    # from the previous chunk's call (untimed).
    warm = PbsPrefixCache()
    start = max(0, N - 2 * chunk)
    if N - chunk > layer.segment_size:
        pbs_attention(q[:, :, start:N - chunk], k[:, :, :N - chunk], v[:, :, :N - chunk], cache=warm, **kw)
    held = warm.pos

    def with_cache():
        return pbs_attention(c.qc, k, v, cache=PbsPrefixCache(held, warm.segment_size), **kw)

    _, st = pbs_attention(c.qc, k, v, return_stats=True, cache=PbsPrefixCache(held, warm.segment_size), **kw)
    row = h.measure("pbs-chunk", with_cache, ref, N, dense=False, unavailable_on=_UNAVAILABLE_ON, density=st.density)
    row.note = f"cache holds {warm.n_done} of {N - chunk} prefix positions"
    result.methods.append(row)
    step()
    _, st0 = pbs_attention(c.qc, k, v, return_stats=True, **kw)
    result.methods.append(h.measure("pbs-chunk-nocache", lambda: pbs_attention(c.qc, k, v, **kw), ref, N,
                                    dense=False, unavailable_on=_UNAVAILABLE_ON, density=st0.density))
    step()
    del ref
    _free(q.device)
    return credit(result)


# ---------------------------------------------------------------------------------------------
# A packed batch of mixed lengths.


@dataclass
class Packed:
    """Sequences packed [total, heads, D] (q, k, v) with their offsets `cu`, and each one's
    [1, heads, n, D] views."""

    q: Any
    k: Any
    v: Any
    cu: Any
    longest: int
    scale: float
    views: list


def _per_seq(p: Packed):
    return lambda: torch.cat([dense_causal_attention(a, b, c, scale=p.scale)[0].transpose(0, 1)
                              for a, b, c in p.views])


def _varlen_flash(p: Packed):
    call = varlen_dense(p.q, p.k, p.v, p.cu, p.cu, p.longest, p.longest, p.scale)
    return _NO_VARLEN if call is None else call


VARLEN_BASELINES = {"dense-per-seq": Dense(_per_seq), "varlen-flash": Dense(_varlen_flash)}


def _pack(ts) -> torch.Tensor:
    return torch.cat([t[0].transpose(0, 1) for t in ts], dim=0).contiguous()


def varlen_case(h: Harness, seqs: list[Workload]) -> SeqLenResult:
    """One packed batch of the workloads (batch 1 each, their lengths mixed)."""
    lengths = [w.q.shape[2] for w in seqs]
    scale = seqs[0].scale
    _, HQ, _, D = seqs[0].q.shape
    dev = seqs[0].q.device
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    total, longest = int(cu[-1]), max(lengths)
    p = Packed(_pack([w.q for w in seqs]), _pack([w.k for w in seqs]), _pack([w.v for w in seqs]), cu, longest,
               scale, [(w.q, w.k, w.v) for w in seqs])
    result = SeqLenResult(total, len(lengths), HQ, seqs[0].k.shape[1], D, reference="fp32", fastest_dense=None,
                          fastest_dense_ms=None, case="varlen " + "+".join(format_length(n) for n in lengths))
    step = h.steps(f"bench varlen {len(lengths)} sequences", 2 + len(VARLEN_BASELINES))
    ref = _pack([dense_reference(w.q, w.k, w.v, scale) for w in seqs])
    step()
    _dense_rows(h, VARLEN_BASELINES, p, ref, longest, result, step)
    kw = h.pbs_kwargs(scale=scale)  # the layer's min_seq_len: short sequences run dense, as a model's would
    _, stats = pbs_attention_varlen(p.q, p.k, p.v, cu, cu, longest, longest, return_stats=True, **kw)
    tiles = sum(st.density * n * n for st, n in zip(stats, lengths))
    row = h.measure("pbs-varlen", lambda: pbs_attention_varlen(p.q, p.k, p.v, cu, cu, longest, longest, **kw), ref,
                    longest, dense=False, unavailable_on=_UNAVAILABLE_ON, density=tiles / sum(n * n for n in lengths))
    n_dense = sum(st.dense for st in stats)
    row.note = f"{len(lengths) - n_dense} sequences PBS, {n_dense} dense; density weighted by n^2"
    result.methods.append(row)
    step()
    del ref
    _free(dev)
    return credit(result)
