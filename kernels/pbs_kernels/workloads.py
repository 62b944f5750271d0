"""Seeded synthetic Q/K/V with the structure of real long-context attention.

Random Gaussian Q/K/V attend almost uniformly, which makes every sparse method look either
useless (nothing to skip) or perfect (nothing lost). Real prefill attention is mostly a few
patterns, mixed differently per head; `make_workload` builds each of them out of dot products,
so they are what a kernel sees, not a mask laid on top:

* sink:   token 0 (and a few after it) carries a large shared component that every query
          matches; like real sinks, its value vector is small.
* local:  q and k both carry a smooth positional code p(n) (random Fourier features of the
          position), so q(n)·k(m) follows a kernel of n - m: nearby keys score high. Each KV head
          has its own window width.
* needle: four regions per KV head (3-8% of the context each) hold scattered "important"
          keys, 45-50% of the keys there, which share a direction with every query after some
          later point (the question part of a prompt). The last queries see them too, so
          permuting keys gathers them into the first block of each segment: the case PBS is
          built for. They are dense within regions on purpose: selection scores mean-pooled
          key blocks, which cannot see a lone key among 128, so a few hundred isolated needles
          would only measure that blind spot.
* slash:  keys carry the code of a shifted position, k(m) ~ p'(m + delta), so q(n)·k(m) peaks
          at fixed offsets n - m = delta: the diagonal lines of 'slash' heads, which permutation
          scatters.

Every KV head's keys carry all four; each query head weights them (its `HeadSpec`), so a
group of query heads sharing keys still differs, as in grouped-query models. Strengths are
logits (q·k·scale at an exact match, in nats) on top of Gaussian noise in every coordinate
(std 0.6 in q and k at D=128, scaled by (D/128)^(1/4) so the logit noise does not depend on D;
1 in v, whose rows also share a per-head mean). Below D=128 the positional codes map their
Fourier features into the head's free dims exactly (fewer features, as RoPE has D/2 frequency
pairs), so far positions correlate about as much as at D=128 (`_n_freq`).

Cost is O(N·D) per head (plus O(N·F·D) for the codes, F = 48 frequencies), generated on the
target device, so 128K tokens x 32 heads takes milliseconds on a GPU. The same seed gives the
same structure on every device (it is drawn on the CPU); the noise comes from a generator on the
target device, so it is reproducible per device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["HEAD_KINDS", "HeadSpec", "KVHeadSpec", "WORKLOADS", "WorkloadInfo", "make_vertical_slash",
           "make_workload", "workload_info"]

HEAD_KINDS = ("sink", "local", "needle", "slash", "mixed")
# Share of query heads of each kind (rounded per layer; every kind appears from 6 query heads up).
_KIND_SHARE = {"sink": 0.15, "local": 0.3, "needle": 0.25, "slash": 0.1, "mixed": 0.2}

_N_FREQ = 48  # Fourier features per code: far-apart positions correlate ~1/sqrt(2F) ~ 0.1
_N_SINK = 4  # tokens with the sink component (token 0 strongest)
_N_NEEDLE_GROUPS = 4  # needle regions per KV head
_NOISE = 0.6  # std of the per-coordinate noise in q and k at D=128 (logit noise ~1 with the components)


def _noise_std(D: int) -> float:
    """Per-coordinate noise of q and k at head dim D: 0.6 (D / 128)^(1/4), so that the logit
    noise of a component against the other side's noise (k_size * std * scale and
    q_size * std * scale, both ~ std / D^(1/4)) is the same at every D, as the patterns' logits
    are. With a fixed 0.6 a D=64 head had 19% more logit noise than a D=128 one, more diffuse
    attention and a higher PBS error at the same threshold: 9 / 3 heads at 8K, fp32, threshold
    0.9: 5.59% at D=64 against 3.57% at D=128; 4.98% with this noise (issue 22,
    BENCHMARKS.md). D=128 is unchanged (the factor is exactly 1)."""
    return _NOISE * (D / 128) ** 0.25
_V_MEAN = 0.5  # std of the per-head mean of v: real values share a common component
_SINK_V = 0.1  # the sink's value is small, as in trained models


@dataclass(frozen=True)
class HeadSpec:
    """Logits (nats at an exact match) of each pattern for one query head."""

    kind: str
    sink: float
    local: float
    needle: float
    slash: float


@dataclass(frozen=True)
class KVHeadSpec:
    """Positions and shapes of the patterns in one KV head's keys (in tokens)."""

    window: float  # local kernel width
    slash_width: float
    slash_offsets: tuple[int, ...]
    # (start, end, active_from): needle keys lie in [start, end); queries >= active_from seek them.
    needle_regions: tuple[tuple[int, int, int], ...]
    needle_fraction: float


@dataclass
class WorkloadInfo:
    """What `make_workload` built: per query head and per KV head, plus the needle keys."""

    seq_len: int
    heads: list[HeadSpec]
    kv_heads: list[KVHeadSpec]
    needle_mask: torch.Tensor | None = field(default=None, repr=False)  # [B, H, N] bool, needle keys

    def heads_of_kind(self, kind: str) -> list[int]:
        return [i for i, h in enumerate(self.heads) if h.kind == kind]


def _kinds(heads: int, gen: torch.Generator) -> list[str]:
    counts = {k: int(round(s * heads)) for k, s in _KIND_SHARE.items()}
    # Fix rounding so the counts add up; the commonest kind absorbs the difference.
    counts["local"] += heads - sum(counts.values())
    if counts["local"] < 0:
        counts = {"local": heads}
    kinds = [k for k, c in counts.items() for _ in range(c)][:heads]
    order = torch.randperm(heads, generator=gen).tolist()
    return [kinds[i] for i in order]


def _u(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _head_spec(kind: str, gen: torch.Generator) -> HeadSpec:
    # Chosen so that, at 8K-128K tokens and threshold 0.9, PBS keeps roughly 5-30% of the
    # tiles with an output error of a few percent (checked by tests/test_bench.py on small N
    # and by `pbs bench` on the GPU): most mass on sink, recent and needle keys, a diffuse rest.
    j = lambda: _u(gen, -1.0, 1.0)  # noqa: E731 - per-head jitter
    if kind == "sink":
        return HeadSpec(kind, sink=20.0 + j(), local=12.5 + j(), needle=0.0, slash=0.0)
    if kind == "local":
        return HeadSpec(kind, sink=11.0 + j(), local=13.0 + j(), needle=0.0, slash=0.0)
    if kind == "needle":
        return HeadSpec(kind, sink=9.0 + j(), local=7.5 + j(), needle=5.0 + j(), slash=0.0)
    if kind == "slash":
        return HeadSpec(kind, sink=10.0 + j(), local=11.5 + j(), needle=0.0, slash=8.5 + j())
    # mixed: a bit of everything, weaker each.
    return HeadSpec(kind, sink=10.0 + j(), local=10.5 + j(), needle=4.0 + j(), slash=6.0 + j())


def _kv_spec(N: int, gen: torch.Generator) -> KVHeadSpec:
    window = math.exp(_u(gen, math.log(384.0), math.log(2048.0)))
    slash_width = _u(gen, 2.0, 6.0)
    # One line close by (mostly inside the diagonal segment), one far back.
    near = int(math.exp(_u(gen, math.log(8.0), math.log(192.0))))
    far = int(math.exp(_u(gen, math.log(256.0), math.log(max(512.0, N / 4)))))
    offsets = (near, far)
    regions = []
    for _ in range(_N_NEEDLE_GROUPS):
        length = max(min(1024, N // 8), int(N * _u(gen, 0.03, 0.08)))
        start = int(_u(gen, 0.01, 0.55) * N)
        end = min(N, start + length)
        active = min(N - 1, end + int(_u(gen, 0.0, 0.3) * N))
        regions.append((start, end, active))
    return KVHeadSpec(window, slash_width, offsets, tuple(regions), needle_fraction=_u(gen, 0.45, 0.5))


def workload_info(seq_len: int, heads: int = 32, kv_heads: int = 8, seed: int = 0) -> WorkloadInfo:
    """The structure `make_workload` uses for these sizes and seed (cheap, CPU only)."""
    if heads % kv_heads:
        raise ValueError(f"make_workload: heads {heads} must be a multiple of kv_heads {kv_heads}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    kinds = _kinds(heads, gen)
    specs = [_head_spec(k, gen) for k in kinds]
    kv = [_kv_spec(seq_len, gen) for _ in range(kv_heads)]
    return WorkloadInfo(seq_len, specs, kv)


def _code(pos: torch.Tensor, omega: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """Unit-norm smooth code of positions: [N] -> [N, D].

    Random Fourier features: code(n)·code(m) ~ mean_f cos(omega_f (n - m)), a kernel of the
    distance only. Angles in float64: n * omega reaches 1e6 rad at 1M tokens, where float32
    would lose the phase. `mix` [2F, D] has rows orthogonal to the sink and needle directions,
    so the codes never leak into those patterns.
    """
    ang = torch.remainder(pos.double()[:, None] * omega.double()[None, :], 2 * math.pi).float()
    feats = torch.cat([torch.cos(ang), torch.sin(ang)], dim=1)  # [N, 2F]
    code = feats @ mix  # [N, D]
    return code / code.norm(dim=1, keepdim=True).clamp_min(1e-6)


def _n_freq(D: int, n_dirs: int) -> int:
    """Fourier features of a code at head dim D with `n_dirs` directions projected out.

    D >= 128: 48, mixed into D dims by a random (not isometric) map, as every figure measured so
    far had it. Below 128 that map's cross-talk grows: far-apart positions (2K+ apart, 8K tokens,
    20 random heads) correlate with std 0.150 at D 64 against 0.125 at D 128 (0.097 for the
    exact kernel), so a D 64 head had wider background logits (std 2.94 against 2.53 at 8K),
    dropped more mass past pooled selection and lost more per unit dropped (BENCHMARKS.md
    section 17). Below 128 a code takes as many features as fit into the free dims exactly, as
    RoPE puts its D/2 frequency pairs in orthogonal planes (32 at SmolLM2's D 64): 29 at D 64,
    whose far correlation is then about D 128's (0.112 against 0.125 at 8K)."""
    return _N_FREQ if D >= 128 else max(1, min(_N_FREQ, (D - n_dirs) // 2))


def _code_mix(dirs: torch.Tensor, D: int, gen: torch.Generator) -> torch.Tensor:
    """[2F, D] feature-to-space map with `dirs` ([k, D] orthonormal) projected out: random at
    D >= 128, with orthonormal rows (an isometry, so the code keeps its kernel) below."""
    F = _n_freq(D, dirs.shape[0])
    mix = torch.randn(2 * F, D, generator=gen) / math.sqrt(F * D)
    mix = mix - (mix @ dirs.T) @ dirs
    if D < 128:
        basis, _ = torch.linalg.qr(mix.T)  # [D, 2F]: orthonormal, in the span of mix's rows
        mix = basis.T / math.sqrt(F)
    return mix


def _frequencies(width: float, gen: torch.Generator, F: int = _N_FREQ) -> torch.Tensor:
    # Cauchy frequencies give the Laplace kernel exp(-|n - m| / width): a sharp peak with a
    # long tail, like the recency bias of trained models.
    u = torch.rand(F, generator=gen, dtype=torch.float64)
    return torch.tan(math.pi * (u - 0.5)) / width


def _unit_directions(count: int, D: int, gen: torch.Generator) -> torch.Tensor:
    """`count` orthonormal directions in R^D (count <= D): [count, D]."""
    m = torch.randn(D, count, generator=gen)
    qm, _ = torch.linalg.qr(m)
    return qm.T.contiguous()


def make_workload(
    seq_len: int,
    heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    *,
    return_info: bool = False,
):
    """Synthetic prefill attention inputs with sink, local, needle and slash structure.

    Returns q [batch, heads, seq_len, head_dim] and k, v [batch, kv_heads, seq_len, head_dim] in
    `dtype` on `device` (and a `WorkloadInfo` with `return_info=True`). Deterministic per seed
    on a given device. See the module docstring for what each pattern is.
    """
    N, HQ, H, D = int(seq_len), int(heads), int(kv_heads), int(head_dim)
    if N < 1 or HQ < 1 or H < 1 or D < 8 or batch < 1:
        raise ValueError(f"make_workload: bad sizes seq_len={N} heads={HQ} kv_heads={H} head_dim={D} batch={batch}")
    info = workload_info(N, HQ, H, seed)
    G = HQ // H
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(int(seed) + 7919)  # structure tensors
    noise = torch.Generator(device=device).manual_seed(int(seed) + 104729)  # bulk noise

    # Component magnitudes: a q part of size a and a k part of size b along one unit direction
    # give the logit a * b * scale. Keys get a fixed size, queries carry the head's logit.
    scale = 1.0 / math.sqrt(D)
    # Keys' components have norm 3 * D^(1/4) (~10 at D=128, the norm of unit-variance noise);
    # their products with the noise then stay near one nat, like the spread of real logits.
    k_size = 3.0 * D ** 0.25

    def q_size(logit: float) -> float:
        return logit / (k_size * scale)

    q = torch.empty(batch, HQ, N, D, dtype=dtype, device=device)
    k = torch.empty(batch, H, N, D, dtype=dtype, device=device)
    v = torch.empty(batch, H, N, D, dtype=dtype, device=device)
    needle_mask = torch.zeros(batch, H, N, dtype=torch.bool, device=device)
    pos = torch.arange(N, device=device)
    n_sink = min(_N_SINK, N)
    # The sink: token 0 strongest, the next few weaker, like BOS plus the first words.
    sink_w = torch.tensor([1.0, 0.55, 0.45, 0.4][:n_sink], device=device)

    for h in range(H):
        spec = info.kv_heads[h]
        dirs_cpu = _unit_directions(1 + _N_NEEDLE_GROUPS, D, gen)  # sink, needle groups
        dirs = dirs_cpu.to(device)
        mix_loc = _code_mix(dirs_cpu, D, gen).to(device)
        mix_sl = _code_mix(dirs_cpu, D, gen).to(device)
        F = _n_freq(D, dirs_cpu.shape[0])
        om_loc = _frequencies(spec.window, gen, F).to(device)
        om_sl = _frequencies(spec.slash_width, gen, F).to(device)
        v_mean = (torch.randn(D, generator=gen) * _V_MEAN).to(device)
        needle_scale = torch.rand(_N_NEEDLE_GROUPS, generator=gen) * 0.6 + 0.7

        loc = _code(pos, om_loc, mix_loc)  # [N, D], shared by q and k
        sl_q = _code(pos, om_sl, mix_sl)
        sl_k = sum(_code(pos + d, om_sl, mix_sl) for d in spec.slash_offsets) / math.sqrt(len(spec.slash_offsets))

        for b in range(batch):
            kb = _noise_std(D) * torch.randn(N, D, generator=noise, device=device)
            kb += k_size * loc
            kb += k_size * sl_k
            kb[:n_sink] += k_size * 2.0 * sink_w[:, None] * dirs[0]
            # Needle keys: a random fraction of each region, with varying strength.
            for r, (start, end, _) in enumerate(spec.needle_regions):
                sel = torch.rand(end - start, generator=noise, device=device) < spec.needle_fraction
                # Regions may overlap; a key in two groups would match twice as strongly.
                sel &= ~needle_mask[b, h, start:end]
                strength = k_size * float(needle_scale[r]) * (1.0 + 0.05 * torch.randn(end - start, generator=noise, device=device))
                kb[start:end] += (sel * strength)[:, None] * dirs[1 + r]
                needle_mask[b, h, start:end] |= sel
            k[b, h] = kb.to(dtype)

            vb = torch.randn(N, D, generator=noise, device=device) + v_mean
            vb[:n_sink] *= _SINK_V
            v[b, h] = vb.to(dtype)

            for g in range(G):
                hq = h * G + g
                hs = info.heads[hq]
                qb = _noise_std(D) * torch.randn(N, D, generator=noise, device=device)
                # Sink logit is set for the strongest sink key (weight 2.0 above).
                if hs.sink:
                    qb += q_size(hs.sink / 2.0) * dirs[0]
                if hs.local:
                    qb += q_size(hs.local) * loc
                if hs.slash:
                    qb += q_size(hs.slash) * sl_q
                if hs.needle:
                    for r, (_, _, active) in enumerate(spec.needle_regions):
                        qb[active:] += q_size(hs.needle) * dirs[1 + r]
                q[b, hq] = qb.to(dtype)

    if not return_info:
        return q, k, v
    info.needle_mask = needle_mask
    return q, k, v, info


_VERTICAL_EVERY = 2048  # one vertical key per this many tokens and KV head (64 at 128K)


def make_vertical_slash(
    seq_len: int,
    heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    *,
    vertical_every: int = _VERTICAL_EVERY,
):
    """The vertical-slash pattern of long-context LLMs: a few scattered keys that every later
    query needs, on top of a sink, a recency window and two slash lines.

    Per KV head, one key per `vertical_every` tokens (at least 4) sits at a uniformly random
    position and carries a shared "vertical" direction that every query matches, with a logit of
    7-9 nats (per key). They are spread over all blocks, one or none per block, so a block's
    mean key hides them (diluted 1/b): the blind spot of mean-pooled selection. The query heads
    of a group weigh the patterns differently (vertical 7-9, local 10-13, slash 0-8 nats).

    Same shapes, dtype and determinism as `make_workload`; returns q, k, v.
    """
    N, HQ, H, D = int(seq_len), int(heads), int(kv_heads), int(head_dim)
    if N < 1 or HQ < 1 or H < 1 or D < 8 or batch < 1 or HQ % H:
        raise ValueError(f"make_vertical_slash: bad sizes seq_len={N} heads={HQ} kv_heads={H} head_dim={D}")
    G = HQ // H
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(int(seed) + 31337)
    noise = torch.Generator(device=device).manual_seed(int(seed) + 271828)
    scale = 1.0 / math.sqrt(D)
    k_size = 3.0 * D ** 0.25

    def q_size(logit: float) -> float:
        return logit / (k_size * scale)

    q = torch.empty(batch, HQ, N, D, dtype=dtype, device=device)
    k = torch.empty(batch, H, N, D, dtype=dtype, device=device)
    v = torch.empty(batch, H, N, D, dtype=dtype, device=device)
    pos = torch.arange(N, device=device)
    n_vert = max(4, N // vertical_every)
    for h in range(H):
        dirs_cpu = _unit_directions(2, D, gen)  # sink, vertical
        dirs = dirs_cpu.to(device)
        mix_loc = _code_mix(dirs_cpu, D, gen).to(device)
        mix_sl = _code_mix(dirs_cpu, D, gen).to(device)
        F = _n_freq(D, dirs_cpu.shape[0])
        om_loc = _frequencies(math.exp(_u(gen, math.log(256.0), math.log(1024.0))), gen, F).to(device)
        om_sl = _frequencies(_u(gen, 2.0, 6.0), gen, F).to(device)
        offsets = (int(math.exp(_u(gen, math.log(8.0), math.log(192.0)))),
                   int(math.exp(_u(gen, math.log(256.0), math.log(max(512.0, N / 4))))))
        vert_pos = (1 + torch.randperm(max(1, N - 1), generator=gen)[: min(n_vert, max(1, N - 1))]).to(device)
        # per-key strength in nats at the head's unit vertical logit: 7-9 spread
        vert_w = (torch.rand(vert_pos.numel(), generator=gen) * 2.0 + 7.0).to(device) / 8.0
        v_mean = (torch.randn(D, generator=gen) * _V_MEAN).to(device)
        specs = [(_u(gen, 7.0, 9.0), _u(gen, 10.0, 13.0), _u(gen, 0.0, 8.0), _u(gen, 9.0, 12.0)) for _ in range(G)]

        loc = _code(pos, om_loc, mix_loc)
        sl_q = _code(pos, om_sl, mix_sl)
        sl_k = sum(_code(pos + d, om_sl, mix_sl) for d in offsets) / math.sqrt(len(offsets))
        for b in range(batch):
            kb = _noise_std(D) * torch.randn(N, D, generator=noise, device=device)
            kb += k_size * loc
            kb += k_size * sl_k
            kb[0] += k_size * 2.0 * dirs[0]
            kb[vert_pos] += (k_size * vert_w)[:, None] * dirs[1]
            k[b, h] = kb.to(dtype)
            vb = torch.randn(N, D, generator=noise, device=device) + v_mean
            vb[0] *= _SINK_V
            v[b, h] = vb.to(dtype)
            for g, (vert, local, slash, sink) in enumerate(specs):
                qb = _noise_std(D) * torch.randn(N, D, generator=noise, device=device)
                qb += q_size(sink / 2.0) * dirs[0]
                qb += q_size(local) * loc
                qb += q_size(slash) * sl_q
                qb += q_size(vert) * dirs[1]
                q[b, h * G + g] = qb.to(dtype)
    return q, k, v


# Synthetic workloads by name (what `pbs bench --workload` offers besides captured layers).
WORKLOADS = {"synthetic": make_workload, "vertical": make_vertical_slash}
