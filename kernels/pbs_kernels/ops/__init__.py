"""The three ops of Permuted Block-Sparse attention: permute, select, attend.

Each op folder holds `naive.py` (plain torch: the readable definition and the test oracle), a
Triton implementation, and an `__init__` exporting the public function.
"""
