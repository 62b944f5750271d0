"""Domain errors of the eval workflow, in the PbsError family (workflows/errors.py).

They carry the facts as fields and a message that names no command-line flag; the `pbs`
command words each class for the command line in commands/_messages.py.
"""

from __future__ import annotations

from typing import Sequence

from ..errors import UsageError


class UnknownTaskError(UsageError):
    def __init__(self, task: str | None, allowed: Sequence[str]) -> None:
        self.task = task
        self.allowed = tuple(allowed)
        what = "no task given" if task is None else f"unknown task {task!r}"
        super().__init__(f"{what}; choose from {', '.join(self.allowed)}")


class DepthError(UsageError):
    def __init__(self, depth: float | None) -> None:
        self.depth = depth
        what = "no depth given" if depth is None else f"depth {depth:g} is outside [0, 1]"
        super().__init__(f"{what}; depths are fractions of the haystack (0 its start, 1 right before the question)")


class LengthBeyondPositions(UsageError):
    """A prompt plus its answer longer than the model's position embeddings."""

    def __init__(self, seq_len: int, answer_tokens: int, limit: int, model: str) -> None:
        self.seq_len, self.answer_tokens, self.limit, self.model = seq_len, answer_tokens, limit, model
        super().__init__(f"a {seq_len}-token prompt plus {answer_tokens} answer tokens exceeds {model}'s "
                         f"{limit} positions; use prompts of at most {limit} tokens (at the limit they are "
                         "shortened to leave room for the answer)")


class LengthTooShortForTask(UsageError):
    def __init__(self, seq_len: int, task: str, minimum: int) -> None:
        self.seq_len, self.task, self.minimum = seq_len, task, minimum
        super().__init__(f"{seq_len} tokens are too few for task {task} (it needs at least {minimum}); "
                         "use longer prompts")


class TaskNeedsEnglish(UsageError):
    """A natural-text task asked of a model that reads only the demo record grammar."""

    def __init__(self, task: str) -> None:
        self.task = task
        super().__init__(f"task {task} is natural English text and this model reads only the demo record grammar; "
                         "use niah_single or niah_multikey")


class ProfileMismatchError(UsageError):
    """A profile made for another model: layers the model lacks, or another model's name."""

    def __init__(self, profile_model: str | None, model: str, *, layer: int | None = None,
                 num_layers: int | None = None) -> None:
        self.profile_model, self.model, self.layer, self.num_layers = profile_model, model, layer, num_layers
        if layer is not None:
            text = (f"the profile sets layer {layer} but {model} has {num_layers} layers; it was made for "
                    f"another model ({profile_model or 'unknown'})")
        else:
            text = f"the profile was made for {profile_model}, not {model}; tune one for this model"
        super().__init__(text)


class HaystackError(UsageError):
    def __init__(self, source: str, detail: str) -> None:
        self.source, self.detail = source, detail
        super().__init__(f"haystack {source}: {detail}")
