"""`pbs eval`: long-context retrieval tasks scored dense and with a PBS profile.

tasks.py generates the prompts (RULER-style, with the model's own tokenizer), run.py runs and
scores them, report.py writes JSON, Markdown and the needle heatmap. Nothing here prints.
"""

from .errors import DepthError, HaystackError, LengthBeyondPositions, LengthTooShortForTask, ProfileMismatchError, UnknownTaskError
from .run import DEFAULT_DEPTHS, METHODS, CellResult, EvalResult, SampleResult, run_eval, score, wilson_interval
from .tasks import DEPTH_TASKS, TASKS, Haystack, Sample, detect_grammar, make_sample, make_samples

__all__ = [
    "DEFAULT_DEPTHS", "DEPTH_TASKS", "METHODS", "TASKS",
    "CellResult", "DepthError", "EvalResult", "Haystack", "HaystackError", "LengthBeyondPositions", "LengthTooShortForTask",
    "ProfileMismatchError", "Sample", "SampleResult", "UnknownTaskError",
    "detect_grammar", "make_sample", "make_samples", "run_eval", "score", "wilson_interval",
]
