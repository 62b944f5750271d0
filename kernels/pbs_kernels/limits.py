"""Allowed values of PBS's knobs, in one torch-free place.

The CLI (option checks), the profile loader and the runtime all import these, so `pbs --help` and
`pbs profile validate` need no torch, and the three can never disagree.
"""
from __future__ import annotations

BLOCK_SIZES = (16, 32, 64, 128)  # 16/32 only make sense for tiny CPU models
# Head dims the kernels serve: 80 and 96 (Phi-3, some 2-4B models) are padded to 128 inside the
# kernels (masked loads), 256 (Gemma 2 / 3) runs with narrower key tiles (ops/attend/fwd.py).
HEAD_DIMS = (64, 80, 96, 128, 256)
BACKENDS = ("auto", "triton", "torch")
# How selection estimates a tile's attention mass (ops/select/naive.py defines each):
#   "mean": pooled query . pooled key (a lone strong key among b is diluted b-fold);
#   "top":  pooled query against each block's top keys by the permutation's score, plus the mean
#           of the block's other keys, combined as a log-sum-exp (sees one strong key per block).
ESTIMATORS = ("mean", "top")
# What the threshold is a share of: "earlier" = the estimated mass of earlier segments only;
# "total" = the estimated mass of the whole causal row, own segment included (a local head whose
# own segment holds most of the mass then keeps few earlier tiles); "head" = the earlier mass of
# all of a head's query blocks together: tiles are taken by falling estimated share of their
# row's earlier mass across the whole head until the mean share kept reaches the threshold, so
# rows whose mass is concentrated keep few tiles and rows whose mass is spread out do not take a
# tile for every crumb (ops/select/naive.py, `head_keep`).
THRESHOLD_MASS = ("earlier", "total", "head")
# Extra exact keys per earlier segment ("vertical" keys): a query block also attends to the top
# `vertical_keys` slots of every earlier segment whose first block it did not keep. After
# permutation those slots hold the keys the last query block attends to most, i.e. the
# scattered keys every query needs (the vertical lines of long-context attention). 0 = off.
# Any 0 <= n <= block_size (the slots must lie in the segment's first block); 0 = off. Cost:
# n / segment_size of dense attention's keys at most (2/256 = 0.8%). `pbs tune` searches these:
VERTICAL_KEYS = (0, 2, 8)
assert max(VERTICAL_KEYS) <= min(BLOCK_SIZES)
