"""The runtime's calls: the three stages of PBS, a plan that holds their intermediates, and
pbs_attention() built on the plan, with a dense fallback and statistics.

    keys = permute_stage(q, k, v, ...)        # K/V in slot order + original positions
    blocks = select_stage(q, keys, ...)       # kept tiles per query block
    plan = pbs_plan(q, k, v, ...)             # both, as one object; plan.attend(q) runs the kernel
    out = pbs_attention(q, k, v, ...)         # what models call
    out = pbs_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, ...)   # packed batches

Serving shapes (docs/serving.md): q may be the last M of the N key positions (a prompt chunk
against its cached prefix, bottom-right causal alignment as in FlashAttention), with an optional
PbsPrefixCache that keeps completed segments' order between chunks; sliding windows, learned
sinks and logit soft-capping are kernel options.

Tools that need the intermediates (analysis, tuning, benchmarks) call these instead of chaining
the ops themselves.

Each public function keeps plain keywords and builds one `PbsSettings` from them (cached per set
of values); everything below carries that value whole: the checks, the plan, the CUDA-graph and
crossover keys, varlen, the op calls (`permute_with` / `select_with` take it directly). The packed
varlen path is the same op calls with `packed=layout`: each op package picks Triton or torch.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import _host
from .blocks import BlockList, identity_positions
from .graphs import capturing, check_graph_mode, needs_grad, pbs_graphs, why_eager
from .limits import HEAD_DIMS
from .ops._common import default_scale, interpreting, resolve_backend
from .ops.attend import attend
from .ops.permute import gather_permuted, segment_order
from .ops.select import MAX_ROW, select_blocks
from .packing import packed_groups, packed_layout
from .settings import PbsSettings, check_vertical_keys  # noqa: F401  (check_vertical_keys: analysis, tests)


@dataclass
class PbsStats:
    """What one pbs_attention call computed.

    density: kept causal tiles / causal tiles (nb (nb + 1) / 2 per head), mean over heads, in
        [0, 1] (1.0 on the dense path).
    density_per_head: [HQ] float32 (mean over the batch).
    dense: True when the call fell back to dense attention (short prompt).
    blocks: the kept-tile lists (None on the dense path).
    pos: original position of each permuted key slot [B, H, N] (None on the dense path).
    extra_density: own-segment tiles above the block diagonal that permutation made necessary
        (an early key moved behind the diagonal block), per causal tile; the work is
        density + extra_density of dense causal attention.
    vertical_density: keys attended through `vertical_keys`, in tiles of block_size^2 pairs
        per causal tile (an upper bound; 0 when off): the work is density + extra_density +
        vertical_density of dense causal attention.
    """

    density: float
    density_per_head: torch.Tensor
    dense: bool
    blocks: BlockList | None = None
    pos: torch.Tensor | None = None
    extra_density: float = 0.0
    vertical_density: float = 0.0


def _fast_sdpa_order():
    """SDPA backends fastest first. cuDNN leads on Hopper (measured on an H200, bf16, D=128:
    544-595 TFLOP/s against the flash backend's 317-346), but torch does not always pick it."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    if "set_priority" not in inspect.signature(sdpa_kernel).parameters:
        return None
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    return lambda: sdpa_kernel(order, set_priority=True)


# (device, dtype, head dim) -> whether SDPA's cuDNN backend takes K/V with fewer heads than Q
# (grouped-query attention without copying K/V per query head) and gets the right answer.
_CUDNN_GQA: dict = {}


def _cudnn_gqa_ok(q: torch.Tensor) -> bool:
    """Probe once per (device, dtype, head dim) on a small input: cuDNN with 2 KV heads for 4
    query heads against cuDNN on copied K/V. The copy costs ~15% of cuDNN's time at 8K tokens
    (H100), which is the dense fallback's whole budget."""
    key = (q.device, q.dtype, q.shape[-1])
    if key not in _CUDNN_GQA:
        import warnings

        from torch.nn.attention import SDPBackend, sdpa_kernel

        g = torch.Generator(device=q.device).manual_seed(0)
        qs = torch.randn(1, 4, 256, q.shape[-1], device=q.device, dtype=q.dtype, generator=g)
        ks, vs = (torch.randn(1, 2, 256, q.shape[-1], device=q.device, dtype=q.dtype, generator=g) for _ in "kv")
        try:
            with warnings.catch_warnings(), sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                warnings.simplefilter("ignore")
                got = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
                want = F.scaled_dot_product_attention(qs, ks.repeat_interleave(2, 1), vs.repeat_interleave(2, 1),
                                                      is_causal=True)
            _CUDNN_GQA[key] = bool(((got.float() - want.float()).norm() / want.float().norm()) < 1e-2)
        except RuntimeError:  # no cuDNN attention for these inputs
            _CUDNN_GQA[key] = False
    return _CUDNN_GQA[key]


def dense_causal_attention(q, k, v, *, scale: float | None = None, window: int | None = None,
                           sinks: torch.Tensor | None = None, softcap: float | None = None) -> torch.Tensor:
    """Dense causal attention through SDPA with grouped-query heads (the fallback path): cuDNN
    with native grouped-query heads where it takes them, else SDPA on K/V copied per query head.

    q [B, HQ, M, D] may be the last M of k's N positions (bottom-right causal alignment, SDPA
    with a lower-right causal bias). A sliding window, sinks or soft-capping, which SDPA cannot
    do, take the exact fp32 torch path of `reference.dense_reference` (query rows in chunks)."""
    HQ, H = q.shape[1], k.shape[1]
    M, N = q.shape[2], k.shape[2]
    if window is not None or sinks is not None or softcap is not None:
        from .reference import dense_reference

        return dense_reference(q, k, v, scale, window=window, sinks=sinks, softcap=softcap).to(q.dtype)
    if M != N:
        from torch.nn.attention.bias import causal_lower_right

        if HQ != H:
            k = k.repeat_interleave(HQ // H, dim=1)
            v = v.repeat_interleave(HQ // H, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(M, N), scale=scale)
    ctx = _fast_sdpa_order() if q.is_cuda else None
    if HQ != H and ctx is not None and _cudnn_gqa_ok(q):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        try:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        except RuntimeError:  # shapes the probe did not cover (e.g. too long for cuDNN): copy instead
            pass
    if HQ != H:
        k = k.repeat_interleave(HQ // H, dim=1)
        v = v.repeat_interleave(HQ // H, dim=1)
    if ctx is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    with ctx():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def _check_tensors(q, k, v, sinks) -> None:
    """The checks of q, k, v [B, heads, N, D] and sinks that no setting decides (the settings
    check themselves: `PbsSettings.check`)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"pbs_attention: {name} must be a 4-D tensor [B, heads, N, D]")
    B, HQ, M, D = q.shape
    N = k.shape[2]
    if k.shape != v.shape:
        raise ValueError(f"pbs_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"pbs_attention: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head dim")
    if M > N:
        raise ValueError(
            f"pbs_attention: q_len {M} > kv_len {N}; queries must be the last M of the N key positions (M <= N)"
        )
    if M == 0:
        raise ValueError("pbs_attention: the sequence is empty (N = 0); pass at least one token")
    _check_heads_and_types(q, k, v, sinks, "pbs_attention")


def _check_heads_and_types(q, k, v, sinks, where: str) -> None:
    """Head counts, head dim, dtypes, devices, strides and sinks: shared by the batch layout
    [B, heads, N, D] and the packed one [total, heads, D] (heads at dim 1 in both)."""
    HQ, H, D = q.shape[1], k.shape[1], q.shape[-1]
    if HQ % H != 0:
        raise ValueError(f"{where}: query heads {HQ} must be a multiple of kv heads {H}")
    if D not in HEAD_DIMS:
        raise ValueError(f"{where}: head dim {D} is not supported; allowed {HEAD_DIMS}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"{where}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{where}: dtype {q.dtype} is not supported; use float16, bfloat16 or float32")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"{where}: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{where}: {name} is not contiguous in its last dimension; call .contiguous()")
    if sinks is not None and (not isinstance(sinks, torch.Tensor) or tuple(sinks.shape) != (HQ,)):
        raise ValueError(f"{where}: sinks must be a tensor of one logit per query head, shape ({HQ},)")


def _validate(q, k, v, sinks, settings: PbsSettings) -> None:
    _check_tensors(q, k, v, sinks)
    settings.check()


# (shapes, dtypes, devices, strides, sinks, settings) that passed _validate: a call with the same
# ones skips the ~25 checks (part of the per-call host cost that issue 22 measured).
_VALID: set = set()


def _inputs_key(q, k, v, sinks, settings: PbsSettings) -> tuple:
    """What `_validate` decides from: shapes, dtypes, devices, last strides, the sinks' kind and
    shape, the settings (q, k, v must be tensors)."""
    return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
            q.stride(-1), k.stride(-1), v.stride(-1),
            None if sinks is None else (type(sinks), getattr(sinks, "shape", None)), settings)


def _validate_cached(q, k, v, sinks, settings: PbsSettings) -> None:
    if _host.LEGACY_HOST or not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return _validate(q, k, v, sinks, settings)
    key = _inputs_key(q, k, v, sinks, settings)
    if key in _VALID:
        return None
    _validate(q, k, v, sinks, settings)
    if len(_VALID) > 4096:
        _VALID.clear()
    _VALID.add(key)
    return None


# Settings built from a call's keywords, by their values and types (True == 1 hashes like 1): a
# repeated call skips the construction and its checks.
_SETTINGS: dict = {}
_FIELDS = tuple(f.name for f in dataclasses.fields(PbsSettings))


def _settings(args: dict) -> PbsSettings:
    """The PbsSettings of a public function's keywords (`args`: its locals() on entry; the
    fields it does not take keep their defaults), built once per distinct set of values."""
    if _host.LEGACY_HOST:
        return PbsSettings(**{name: args[name] for name in _FIELDS if name in args})
    values = tuple([args.get(name, _ABSENT) for name in _FIELDS])
    try:
        key = (values, tuple([type(x) for x in values]))
        hit = _SETTINGS.get(key)
    except TypeError:  # an unhashable value: build it every time
        return PbsSettings(**{name: args[name] for name in _FIELDS if name in args})
    if hit is None:
        hit = PbsSettings(**{name: args[name] for name in _FIELDS if name in args})
        if len(_SETTINGS) > 4096:
            _SETTINGS.clear()
        _SETTINGS[key] = hit
    return hit


_ABSENT = object()  # a field the function does not take


# (settings, changes) -> settings.replace(**changes), for the per-call resolutions below
_REPLACED: dict = {}


def _with(s: PbsSettings, **changes) -> PbsSettings:
    """s.replace(**changes), built once per distinct (s, changes)."""
    key = (s, tuple(changes.items()))
    hit = _REPLACED.get(key)
    if hit is None:
        hit = s.replace(**changes)
        if len(_REPLACED) > 4096:
            _REPLACED.clear()
        _REPLACED[key] = hit
    return hit


def _with_scale(s: PbsSettings, q: torch.Tensor) -> PbsSettings:
    """s with its scale a float (None: 1/sqrt(D))."""
    return s if s.scale is not None else _with(s, scale=default_scale(q.shape[-1]))


def _resolve(s: PbsSettings, q: torch.Tensor, n_keys: int | None = None) -> PbsSettings:
    """`s` as the ops run it for q: the backend picked ("auto" per tensor), the scale a float
    (None: 1/sqrt(D)) and, given the key count `n_keys`, a window that reaches every key dropped."""
    be = s.backend if s.backend == "torch" else resolve_backend(s.backend, q)
    drop = s.window is not None and n_keys is not None and s.window >= n_keys  # no key is outside it
    if be == s.backend and s.scale is not None and not drop:
        return s
    return _with(s, backend=be, scale=default_scale(q.shape[-1]) if s.scale is None else s.scale,
                 window=None if drop else s.window)


def _upcast_for_interpreter(backend: str, *ts: torch.Tensor):
    """Triton's CPU interpreter computes bf16 `tl.dot` wrongly (relative error ~1e9 measured on
    Triton 3.9): run its kernels on fp32 copies instead. A no-op on CUDA and for other dtypes."""
    if backend == "triton" and interpreting() and ts[0].dtype == torch.bfloat16 and not ts[0].is_cuda:
        return tuple(t.float() for t in ts)
    return ts


class _ForwardOnly(torch.autograd.Function):
    """Ties the output of a Triton forward to its inputs so that a backward pass fails with a
    clear message instead of silently giving no gradient (the kernels are inference-only)."""

    @staticmethod
    def forward(ctx, out, q, k, v):
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(
            "pbs_attention: the Triton kernels are forward-only (an inference kernel) and have no "
            "backward; run under torch.no_grad()/inference_mode, or use backend='torch' to differentiate"
        )


@dataclass
class PbsPrefixCache:
    """The permutation of a prompt's completed segments, kept between its prefill chunks.

    Pass the same object to every `pbs_attention(..., cache=)` call of one prompt, chunk after
    chunk (each call's k/v: the whole prefix so far, the chunk's keys last). A call reuses the
    stored order for the segments completed by earlier calls, scores only the keys after them
    (O(chunk + segment) keys instead of the whole prefix) and stores the order of every segment
    complete after it. K/V themselves are not stored: each call gathers them in slot order from
    the k/v it is given (one O(N) pass, docs/serving.md has the cost model). A new prompt needs
    a new cache (or `reset()`).

    pos: [B, H, P] int32 original positions of the first P slots (P a multiple of
    segment_size), None before the first call.
    """

    pos: torch.Tensor | None = None
    segment_size: int | None = None

    @property
    def n_done(self) -> int:
        return 0 if self.pos is None else int(self.pos.shape[-1])

    def reset(self) -> None:
        self.pos = None
        self.segment_size = None

    def _prefix_for(self, B: int, H: int, N: int, M: int, segment_size: int, device) -> torch.Tensor | None:
        if self.pos is None:
            return None
        P = self.n_done
        if tuple(self.pos.shape[:2]) != (B, H) or self.pos.device != device:
            raise ValueError(f"pbs_attention: the prefix cache holds {tuple(self.pos.shape[:2])} (batch, kv heads) "
                             f"on {self.pos.device}, not ({B}, {H}) on {device}; use one cache per prompt")
        if self.segment_size != segment_size:
            raise ValueError(f"pbs_attention: the prefix cache was built with segment_size {self.segment_size}, "
                             f"not {segment_size}; use one cache per layer and setting")
        if P > N - M:
            raise ValueError(f"pbs_attention: the prefix cache holds {P} positions but the chunk starts at {N - M}; "
                             "pass each chunk once, in order, or reset() the cache for a new prompt")
        return self.pos

    def _store(self, pos: torch.Tensor, segment_size: int) -> None:
        n_full = (pos.shape[-1] // segment_size) * segment_size
        if n_full > self.n_done:
            self.pos = pos[:, :, :n_full].clone()
            self.segment_size = segment_size


@dataclass
class PermutedKeys:
    """Keys and values in slot order, from `permute_stage`.

    k, v: [B, H, N, D] (sorted by score inside each full segment; the inputs when not permuted).
    pos: [B, H, N] int32 original position of each slot.
    key_stats: pooled keys and earliest position per block (`blocks.key_block_stats`), or None
        when selection must compute them.
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    key_stats: tuple | None
    permuted: bool


def permute_stage(q, k, v, *, block_size: int = 128, segment_size: int = 256, permute: bool = True,
                  scale: float | None = None, backend: str = "auto",
                  cache: PbsPrefixCache | None = None) -> PermutedKeys:
    """Step 1: sort the keys of every full segment by the attention the last query block gives
    them (`permute=False`: keys stay in order, positions are the identity). q may be the last M
    of the N positions (then the chunk's last block scores); `cache` keeps completed segments'
    order between the chunks of one prompt (PbsPrefixCache)."""
    s = _settings(locals())
    return permute_with(q, k, v, s, cache)


def permute_with(q, k, v, s: PbsSettings, cache: PbsPrefixCache | None = None) -> PermutedKeys:
    """permute_stage on a PbsSettings (its block_size, segment_size, permute, scale, backend)."""
    s = _resolve(s, q)
    if not s.permute:
        B, H, N, _ = k.shape
        return PermutedKeys(k, v, identity_positions(B, H, N, k.device), None, False)
    q, k, v = _upcast_for_interpreter(s.backend, q, k, v)
    B, H, N, _ = k.shape
    prefix = cache._prefix_for(B, H, N, q.shape[2], s.segment_size, k.device) if cache is not None else None
    pos = segment_order(q, k, block_size=s.block_size, segment_size=s.segment_size, scale=s.scale,
                        backend=s.backend, prefix_pos=prefix)
    if cache is not None:
        cache._store(pos, s.segment_size)
    # The Triton gather pools the key blocks while it permutes; selection reuses that.
    k_p, v_p, key_stats = gather_permuted(k, v, pos, block_size=s.block_size, backend=s.backend, block_stats=True)
    return PermutedKeys(k_p, v_p, pos, key_stats, True)


def select_stage(q, keys: PermutedKeys, *, block_size: int = 128, segment_size: int = 256,
                 threshold: float = 0.9, scale: float | None = None, backend: str = "auto",
                 estimator: str = "mean", threshold_mass: str = "earlier",
                 window: int | None = None) -> BlockList:
    """Step 2: per query block, the fewest earlier-segment key blocks whose estimated attention
    mass reaches `threshold` (of the earlier segments' mass, or with threshold_mass="total" of the
    whole row's; with "head" the threshold holds for the mean over the head's query blocks, not
    for each), plus its own segment and the block holding token 0. The final rows (the query
    blocks holding the last block_size positions) keep every causal tile. `estimator`: how a tile's
    mass is estimated (`pbs_kernels.limits.ESTIMATORS`). With a sliding `window`: only blocks
    inside some query's window, the straddling ones masked."""
    s = _settings(locals())
    return select_with(q, keys, s)


def select_with(q, keys: PermutedKeys, s: PbsSettings) -> BlockList:
    """select_stage on a PbsSettings (its block_size, segment_size, threshold, scale, backend,
    estimator, threshold_mass, window; the window is used as it is)."""
    s = _resolve(s, q)
    (q,) = _upcast_for_interpreter(s.backend, q)
    k = keys.k.float() if q.dtype != keys.k.dtype else keys.k
    return select_blocks(q, k, keys.pos, s, key_stats=keys.key_stats)


@dataclass
class PbsPlan:
    """What PBS decided for one (q, k, v): K/V in slot order, their original positions and the
    kept tiles. `attend(q)` runs the sparse forward over them."""

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    blocks: BlockList
    scale: float
    backend: str
    block_size: int
    segment_size: int
    threshold: float
    permuted: bool
    estimator: str = "mean"
    threshold_mass: str = "earlier"
    window: int | None = None
    sinks: torch.Tensor | None = None
    softcap: float | None = None
    vertical_keys: int = 0

    @classmethod
    def of(cls, keys: PermutedKeys, blocks: BlockList, s: PbsSettings, sinks: torch.Tensor | None = None) -> PbsPlan:
        """The plan of permuted `keys` and their `blocks` under resolved settings `s`."""
        return cls(keys.k, keys.v, keys.pos, blocks, s.scale, s.backend, s.block_size, s.segment_size, s.threshold,
                   keys.permuted, s.estimator, s.threshold_mass, s.window, sinks, s.softcap, int(s.vertical_keys))

    def attend(self, q: torch.Tensor, *, return_lse: bool = False):
        """Output [B, HQ, M, D] in q's dtype (and the natural-log LSE [B, HQ, M] fp32 over the
        computed tiles, the sink included, with `return_lse=True`)."""
        dtype = q.dtype
        (qc,) = _upcast_for_interpreter(self.backend, q)
        k, v = (self.k, self.v) if self.k.dtype == qc.dtype else (self.k.to(qc.dtype), self.v.to(qc.dtype))
        res = attend(qc, k, v, self.pos, self.blocks, scale=self.scale, backend=self.backend, return_lse=return_lse,
                     window=self.window, sinks=self.sinks, softcap=self.softcap,
                     vertical_keys=self.vertical_keys, segment_size=self.segment_size)
        out, lse = res if return_lse else (res, None)
        out = out.to(dtype)
        return (out, lse) if return_lse else out

    def density_per_head(self) -> torch.Tensor:
        return self.blocks.density_per_head()

    def vertical_density(self) -> float:
        """Keys attended through `vertical_keys`, in tiles per causal tile (an upper bound; 0 when
        off): the work is density + extra density + this of dense causal attention."""
        if not self.vertical_keys:
            return 0.0
        keys = self.blocks.vertical_keys_per_head(self.segment_size, self.vertical_keys).float()
        return float((keys / (self.blocks.causal_tiles * self.block_size)).mean())


def pbs_plan(q, k, v, *, block_size: int = 128, segment_size: int = 256, threshold: float = 0.9,
             permute: bool = True, scale: float | None = None, backend: str = "auto",
             estimator: str = "mean", threshold_mass: str = "earlier", window: int | None = None,
             sinks: torch.Tensor | None = None, softcap: float | None = None,
             cache: PbsPrefixCache | None = None, vertical_keys: int = 0) -> PbsPlan:
    """Steps 1 and 2 for q [B, HQ, M, D] (the last M of the N positions), k/v [B, H, N, D]: a
    PbsPlan (never dense; see `pbs_attention` for the short-prompt fallback). Same checks and
    knobs as pbs_attention."""
    s = _settings(locals())
    _validate_cached(q, k, v, sinks, s)
    return _plan(q, k, v, s, sinks=sinks, cache=cache)


def _plan(q, k, v, s: PbsSettings, *, sinks=None, cache=None) -> PbsPlan:
    s = _resolve(s, q, k.shape[2])
    keys = permute_with(q, k, v, s, cache)
    return PbsPlan.of(keys, select_with(q, keys, s), s, sinks)


def pbs_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 128,
    segment_size: int = 256,
    threshold: float = 0.9,
    permute: bool = True,
    min_seq_len: int = 0,
    scale: float | None = None,
    backend: str = "auto",
    return_stats: bool = False,
    estimator: str = "mean",
    threshold_mass: str = "earlier",
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
    cache: PbsPrefixCache | None = None,
    vertical_keys: int = 0,
    graph: bool | str = False,
):
    """Causal Permuted Block-Sparse attention for prefill.

    q: [B, HQ, M, D]; k, v: [B, H, N, D] with HQ a multiple of H; D in {64, 128}; float16 or
    bfloat16 on a GPU (float32 works too, more slowly). Any 1 <= M <= N: the queries are the last
    M of the N key positions (M = N: a whole prompt; M < N: a chunk against its cached prefix,
    causal bottom-right aligned as in FlashAttention; blocks and segments are counted from key
    position 0, so the chunk's rows equal the same rows of a whole-prompt call).

    1. permute: inside each segment of `segment_size` keys, sort keys by the attention they get
       from the last `block_size` queries (off: `permute=False`, plain block-sparse).
    2. select: per query block keep the fewest earlier-segment key blocks whose pooled attention
       mass reaches `threshold`, plus its own segment and the block holding token 0; the
       query blocks holding the last `block_size` positions (the rows that answer) keep all.
    3. attend: flash-attention forward over the kept tiles only.

    `estimator` ("mean" | "top") is how selection estimates a tile's mass; `threshold_mass`
    ("earlier" | "total" | "head") what the threshold is a share of (`pbs_kernels.limits`).
    window: sliding window, keys with q_pos - window < k_pos <= q_pos (Mistral, Gemma's local
    layers); tiles wholly outside are never computed. sinks: [HQ] learned logits, one extra term
    per head in every softmax denominator (gpt-oss). softcap: scores become
    softcap * tanh(scale * q.k / softcap) (Gemma 2). Selection ignores sinks and soft-capping.
    cache: a PbsPrefixCache shared by the chunks of one prompt (reuses completed segments' order).
    vertical_keys: n > 0 also attends, exactly, to the first n slots of every earlier segment whose
    first block a query block did not keep: after permutation those are the segment's keys the
    last query block attends to most, so scattered keys that every query needs (vertical lines)
    are not lost with the tiles that hold them (`pbs_kernels.limits.VERTICAL_KEYS`).

    Prompts with N <= segment_size or N < min_seq_len use dense causal attention. threshold=1.0
    equals dense causal attention. min_seq_len="auto": the first call in a length bucket times
    both paths on its inputs and the faster one is kept for that shape and bucket
    (`pbs_kernels.crossover`). `backend`: "triton" (CUDA, or the CPU interpreter, where bf16
    inputs are computed in fp32 because the interpreter's bf16 matmul is wrong), "torch" (plain
    torch reference) or "auto" (triton on CUDA, torch elsewhere).

    graph: False (eager), True (capture a CUDA graph of the whole call on the first call of its
    shapes, dtype and settings, and replay it on the next ones) or "auto" (capture on the second
    such call, and only for calls small enough that the host dominates: q of at most
    `graphs.AUTO_MAX_Q_BYTES`). A replay costs a few launches of host time instead of ~20 plus
    copies of q, k, v and the output; calls that need the host (return_stats, cache, gradients,
    the torch backend, CPU tensors) run eagerly (`pbs_kernels.graphs`).

    Inference only on the Triton backend: the output carries no gradient and a backward pass
    through it raises; the torch backend is differentiable.

    Returns the output [B, HQ, M, D] in q's dtype, and with `return_stats=True` also a PbsStats.
    """
    s = _settings(locals())
    return _attention(q, k, v, s, sinks=sinks, cache=cache, return_stats=return_stats, graph=graph)


def _call_key(q, k, v, sinks, s: PbsSettings, graph):
    """What a graphed call's checks, key and dense-or-sparse choice depend on besides the
    per-call state (gradients, an open capture, a forgotten crossover choice): shapes, dtypes,
    devices, last strides, the sinks' kind and shape, the settings and the graph mode. None for a
    call the fast path does not take (not graphed, statistics, a cache, not tensors)."""
    if not (graph is True or (type(graph) is str and graph == "auto")):
        return None
    try:
        return _inputs_key(q, k, v, sinks, s) + (graph,)
    except AttributeError:  # not tensors: the checks name the problem
        return None


def _replay_known(call_key, q, k, v, sinks):
    """The fast path of a graphed call whose `_call_key` went through the graph cache before:
    one dict lookup for what the checks, `why_eager` and the key build gave then, the per-call
    state checked again, then `PbsGraphs.run` (a replay). None: take the full path."""
    g = pbs_graphs()
    hit = g.calls.get(call_key)
    if hit is None:
        return None
    key, fn, choice, auto = hit
    if needs_grad(q, k, v) or capturing(q):  # the per-call part of why_eager
        return None
    if choice is not None:  # min_seq_len="auto": the remembered choice must still stand
        from .crossover import _CHOICES

        if _CHOICES.get(choice[0]) != choice[1]:
            return None
    return g.run(key, fn, (q, k, v, sinks), auto=auto)


def _attention(q, k, v, s: PbsSettings, *, sinks=None, cache=None, return_stats=False, graph=False):
    """pbs_attention on built settings."""
    call_key = None
    if not return_stats and cache is None and not _host.LEGACY_HOST:
        call_key = _call_key(q, k, v, sinks, s, graph)
        if call_key is not None:
            out = _replay_known(call_key, q, k, v, sinks)
            if out is not None:
                return out
    _validate_cached(q, k, v, sinks, s)
    check_graph_mode("pbs_attention", graph)
    N = k.shape[2]
    s = _with_scale(s, q)  # the backend stays as asked: a dense call never needs it
    eager_reason = (why_eager(q, k, v, s.backend, return_stats=return_stats, cache=cache, auto=graph == "auto")
                    if graph else "graph=False")
    choice = None  # (crossover key, sparse) under min_seq_len="auto"

    def run(dense: bool, qs, ks, vs, ss, stats: bool, kv_cache, last: bool = False):
        # The dense path runs eagerly even under graph=: it is two launches, GPU-bound, and a
        # replay's input and output copies made it slower (H200, 9/3/64 8K: 0.244 ms replayed
        # against 0.215 eager; BENCHMARKS section 19).
        if eager_reason is None and not dense:
            # Only the sparse path is captured: the key's sixth field (dense) stays, always False.
            key = (q.shape, k.shape, q.dtype, q.device, sinks is not None, False, s)
            fn = lambda *t: _pbs_eager(*t, s, dense=False)  # noqa: E731
            if last and call_key is not None:
                pbs_graphs().remember(call_key, (key, fn, choice, graph == "auto"))
            return pbs_graphs().run(key, fn, (qs, ks, vs, ss), auto=graph == "auto")
        return _pbs_eager(qs, ks, vs, ss, s, dense=dense, return_stats=stats, cache=kv_cache)

    if N <= s.segment_size:
        dense = True
    elif s.min_seq_len == "auto":
        from .crossover import choice_key, sparse_wins

        # the settings as plain values (the choice is also kept in a JSON file); min_seq_len is "auto" here
        key = choice_key(q, k, (sinks is not None, eager_reason is None) + s.values())
        dense = not sparse_wins(key, lambda: run(False, q, k, v, sinks, False, None),
                                lambda: run(True, q, k, v, sinks, False, None), q.device)
        choice = (key, not dense)
    else:
        dense = N < s.min_seq_len
    return run(dense, q, k, v, sinks, return_stats, cache, last=True)


def _pbs_eager(q, k, v, sinks, s: PbsSettings, *, dense: bool, return_stats=False, cache=None):
    """One pbs_attention call as launches (checked inputs, float scale): what a graph records."""
    if dense:
        out = dense_causal_attention(q, k, v, scale=s.scale, window=s.window, sinks=sinks, softcap=s.softcap)
        if not return_stats:
            return out
        return out, PbsStats(1.0, torch.ones(q.shape[1]), dense=True)
    plan = _plan(q, k, v, s, sinks=sinks, cache=cache)
    out = plan.attend(q)
    if plan.backend == "triton" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        out = _ForwardOnly.apply(out, q, k, v)
    if not return_stats:
        return out
    per_head = plan.blocks.density_per_head().cpu()
    extra = float(plan.blocks.extra_density_per_head().mean())
    return out, PbsStats(float(per_head.mean()), per_head, dense=False, blocks=plan.blocks, pos=plan.pos,
                         extra_density=extra, vertical_density=plan.vertical_density())


def _varlen_bounds(name: str, cu: torch.Tensor, total: int, max_len: int) -> list[int]:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2 or cu.dtype.is_floating_point:
        raise ValueError(f"pbs_attention_varlen: {name} must be a 1-D integer tensor [batch + 1]")
    bounds = [int(x) for x in cu.tolist()]
    if bounds[0] != 0 or any(b1 < b0 for b0, b1 in zip(bounds, bounds[1:])):
        raise ValueError(f"pbs_attention_varlen: {name} must start at 0 and never decrease (got {bounds[:6]}...)")
    if bounds[-1] != total:
        raise ValueError(f"pbs_attention_varlen: {name} ends at {bounds[-1]} but the packed tensor has {total} rows")
    longest = max(b1 - b0 for b0, b1 in zip(bounds, bounds[1:]))
    if max_len < longest:
        raise ValueError(f"pbs_attention_varlen: max_seqlen for {name} is {max_len} but a sequence has {longest} tokens")
    return bounds


def _per_sequence_into(out, stats, q, k, v, bq, bk, caches, indices, s: PbsSettings, **call) -> None:
    for i in indices:
        q0, q1, k0, k1 = bq[i], bq[i + 1], bk[i], bk[i + 1]
        if q1 == q0:
            continue
        # [1, heads, n, D] views of the packed rows (the kernels take strides)
        qs, ks, vs = (t[a:b].transpose(0, 1).unsqueeze(0) for t, a, b in ((q, q0, q1), (k, k0, k1), (v, k0, k1)))
        res = _attention(qs, ks, vs, s, cache=None if caches is None else caches[i], **call)
        o, st = res if call.get("return_stats") else (res, None)
        out[q0:q1] = o[0].transpose(0, 1)
        stats[i] = st


def _varlen_per_sequence(q, k, v, bq, bk, caches, s: PbsSettings, **call):
    """The batch one sequence at a time: one pbs_attention call per sequence on views of the
    packed rows (the path for prefix caches, and the baseline the packed path is tested and
    timed against). bq, bk: cu_seqlens as lists; call: sinks, return_stats, graph."""
    out = torch.empty_like(q)
    stats: list = [None] * (len(bq) - 1)
    _per_sequence_into(out, stats, q, k, v, bq, bk, caches, range(len(bq) - 1), s, **call)
    return (out, stats) if call.get("return_stats") else out


def _sequence_stats(blocks: BlockList, pos: torch.Tensor, s, layout) -> PbsStats:
    """One packed sequence's rows of the shared block list, in its own block numbering: the
    PbsStats a pbs_attention call on it alone would report."""
    b = layout.block_size
    kb0, nb = s.offset // b, -(-s.n // b)
    qb0 = (s.n - s.m) // b
    rows = slice(kb0 + qb0, kb0 + nb)
    own = BlockList(idx=(blocks.idx[:, :, rows, :nb] - kb0).contiguous(), n_off=blocks.n_off[:, :, rows].contiguous(),
                    n_total=blocks.n_total[:, :, rows].contiguous(), block_size=b, q_block0=qb0)
    per_head = own.density_per_head().cpu()
    extra = float(own.extra_density_per_head().mean())
    return PbsStats(float(per_head.mean()), per_head, dense=False, blocks=own,
                    pos=pos[:, :, s.offset:s.offset + s.n] - s.offset, extra_density=extra)


def _varlen_packed(out, stats, q, k, v, layout, s: PbsSettings, sinks, return_stats: bool) -> None:
    """The layout's sequences in one virtual sequence (`pbs_kernels.packing`), one launch per
    op through the op packages (each picks Triton or torch by `s.backend`); their rows of `out`
    (like q) and their entries of `stats` are written. s: resolved settings (`_resolve`)."""
    b, S = layout.block_size, layout.segment_size
    if s.window is not None and s.window >= max(x.n for x in layout.seqs):
        s = _with(s, window=None)  # no key is outside it
    qc, kc, vc = _upcast_for_interpreter(s.backend, q, k, v)
    # [1, heads, rows, D] views of the packed rows
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (qc, kc, vc))
    pos = segment_order(q4, k4, block_size=b, segment_size=S, scale=s.scale, backend=s.backend, packed=layout)
    k_p, v_p, key_stats = gather_permuted(k4, v4, pos, block_size=b, backend=s.backend, block_stats=True,
                                          packed=layout)
    blocks = select_blocks(q4, k_p, pos, s, key_stats=key_stats, packed=layout)
    o = out if qc.dtype == out.dtype else torch.empty_like(qc)  # fp32 under the interpreter
    attend(q4, k_p, v_p, pos, blocks, scale=s.scale, backend=s.backend, window=s.window, sinks=sinks,
           softcap=s.softcap, packed=layout, out=o.transpose(0, 1).unsqueeze(0))
    if o is not out:
        rows = layout.q_rows(q.device)
        out[rows] = o[rows].to(out.dtype)
    if return_stats:
        for x in layout.seqs:
            stats[x.index] = (PbsStats(1.0, torch.ones(q.shape[1]), dense=True) if x.dense
                              else _sequence_stats(blocks, pos, x, layout))


def _one_dominates(bk: list[int]) -> bool:
    """True when one sequence holds at least half of the batch's keys: then one pbs_attention per
    sequence is faster than packing, whose block tables are quadratic in the packed length. On an
    H200 (scripts/gpu_varlen.py, BENCHMARKS section 9) 4K+16K+32K+64K took 12.4 ms per sequence
    and 13.5 ms packed, while 16 x 4K took 24.6 ms per sequence and 4.2 ms packed."""
    lengths = [b1 - b0 for b0, b1 in zip(bk, bk[1:])]
    return len(lengths) > 1 and 2 * max(lengths) >= sum(lengths)


def pbs_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    block_size: int = 128,
    segment_size: int = 256,
    threshold: float = 0.9,
    permute: bool = True,
    min_seq_len: int = 0,
    scale: float | None = None,
    backend: str = "auto",
    return_stats: bool = False,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
    caches: list[PbsPrefixCache] | None = None,
    estimator: str = "mean",
    threshold_mass: str = "earlier",
    vertical_keys: int = 0,
    packed: bool | None = None,
    graph: bool | str = False,
):
    """PBS attention over packed independent sequences, in flash-attn's varlen convention.

    q: [total_q, HQ, D]; k, v: [total_k, H, D]; sequence i holds q rows cu_seqlens_q[i] ..
    cu_seqlens_q[i + 1] - 1 and key rows cu_seqlens_k[i] .. cu_seqlens_k[i + 1] - 1 (int32 or
    int64 [batch + 1], starting at 0). Its queries are the last M_i of its N_i keys (M_i <= N_i;
    equal lengths: a whole prompt; fewer queries: a chunk against its cached prefix), causal
    bottom-right aligned. max_seqlen_q / max_seqlen_k bound the lengths (checked). Sequences with
    N_i <= segment_size or N_i < min_seq_len are dense (every causal tile, no permutation) in the
    same launches; the other knobs are pbs_attention's and apply to every sequence. Each
    sequence gets exactly what pbs_attention on it alone would give (same permutation, same
    selection), up to floating-point summation order (on a GPU the TF32 pooled scores of a
    larger GEMM may break a near-tie of the top-p cut differently).

    What it launches: the sequences are packed segment-aligned into one virtual sequence
    (`pbs_kernels.packing`; each padded to a multiple of segment_size), then one launch per op
    for the whole batch: two score passes, the segment sort, the gather (which pools the key
    blocks), query pooling + one GEMM + one selection launch per row-width class, one attend
    launch that writes the packed output. It reads cu_seqlens on the host (one device sync; the
    host tables are cached per cu_seqlens, so the layers of one forward pass build them once).
    Memory beyond one long prompt's: K/V in virtual order (the padding included), and the pooled
    block scores and the block list over the whole virtual sequence, 4 HQ (n_virtual /
    block_size)^2 bytes each (the scores once per representative; the "top" estimator has 3).

    Batches whose quadratic tables would pass `packing.PACKED_TABLE_BYTES` are cut into
    several packed groups (one launch per op per group). One pbs_attention call per sequence
    instead: with `caches` (one PbsPrefixCache per sequence), with `vertical_keys` (in a packed
    row the earlier segments may be another sequence's), with threshold_mass "head" (its cut is
    per sequence and head), and by default (`packed=None`) when one
    sequence holds at least half of the keys (`_one_dominates`: faster there), and with
    min_seq_len="auto" (measured per sequence shape). `packed=True` /
    `False` forces the choice where both are possible.

    graph: pbs_attention's, for the one-call-per-sequence path (each sequence's shape is its own
    capture). The packed path runs eagerly: its tables come from cu_seqlens read on the host.

    Returns the output [total_q, HQ, D] in q's dtype, and with `return_stats=True` also a list
    of PbsStats, one per sequence (None for a sequence with no query).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"pbs_attention_varlen: {name} must be a packed 3-D tensor [total, heads, D]")
    if k.shape != v.shape:
        raise ValueError(f"pbs_attention_varlen: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    bq = _varlen_bounds("cu_seqlens_q", cu_seqlens_q, q.shape[0], int(max_seqlen_q))
    bk = _varlen_bounds("cu_seqlens_k", cu_seqlens_k, k.shape[0], int(max_seqlen_k))
    if len(bq) != len(bk):
        raise ValueError(f"pbs_attention_varlen: cu_seqlens_q has {len(bq) - 1} sequences, cu_seqlens_k {len(bk) - 1}")
    n_seq = len(bq) - 1
    for i in range(n_seq):
        if bq[i + 1] - bq[i] > bk[i + 1] - bk[i]:
            raise ValueError(f"pbs_attention_varlen: sequence {i} has {bq[i + 1] - bq[i]} queries but "
                             f"{bk[i + 1] - bk[i]} keys; queries must be the last M of the N keys (M <= N)")
    if caches is not None and len(caches) != n_seq:
        raise ValueError(f"pbs_attention_varlen: {len(caches)} caches for {n_seq} sequences; pass one per sequence")
    s = _settings(locals())
    check_graph_mode("pbs_attention_varlen", graph)
    call = dict(sinks=sinks, return_stats=return_stats, graph=graph)
    if (caches is not None or q.shape[0] == 0 or s.min_seq_len == "auto" or s.vertical_keys
            or s.threshold_mass == "head" or packed is False or (packed is None and _one_dominates(bk))):
        return _varlen_per_sequence(q, k, v, bq, bk, caches, s, **call)
    # The per-sequence checks, once, on the packed tensors themselves.
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"pbs_attention: q {tuple(q.shape)} and k {tuple(k.shape)} differ in head dim")
    _check_heads_and_types(q, k, v, sinks, "pbs_attention")
    s = _resolve(s, q)
    out = torch.empty_like(q)
    stats: list = [None] * n_seq
    for i0, i1 in packed_groups(bq, bk, block_size=s.block_size, segment_size=s.segment_size, heads=q.shape[1],
                                reps=3 if s.estimator == "top" else 1):
        layout = packed_layout(bq, bk, first=i0, last=i1, block_size=s.block_size, segment_size=s.segment_size,
                               min_seq_len=s.min_seq_len, permute=s.permute, heads=q.shape[1], device=q.device)
        if not layout.seqs:
            continue
        if layout.num_blocks > MAX_ROW:  # one sequence of over a million tokens: pbs_attention's own path
            _per_sequence_into(out, stats, q, k, v, bq, bk, None, range(i0, i1), s, **call)
            continue
        _varlen_packed(out, stats, q, k, v, layout, s, sinks, return_stats)
    if s.backend == "triton" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        out = _ForwardOnly.apply(out, q, k, v)
    return (out, stats) if return_stats else out
