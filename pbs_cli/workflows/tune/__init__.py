"""`pbs tune`'s workflow: calibrate, search per layer (Optuna), allocate, validate.

workflow.py   run_tune (the steps, in order) and validate_profile
study.py      Optuna storage, one resumable study per layer, the search space, seeds
layer.py      one layer's captured Q/K/V and what a PBS setting does to them
alloc.py      one setting per layer within the speedup budget (multiple-choice knapsack)
cost.py       cost relative to dense: measured kernel time, or the density cost model
"""

from .workflow import LayerResult, TuneResult, TuneSettings, run_tune, validate_profile

__all__ = ["LayerResult", "TuneResult", "TuneSettings", "run_tune", "validate_profile"]
