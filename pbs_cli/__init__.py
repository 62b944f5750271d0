"""pbs: the command-line toolkit (analyze, tune, bench, profile) around `pbs_kernels`.

Kept import-light on purpose: torch and friends load inside command bodies only.
"""
