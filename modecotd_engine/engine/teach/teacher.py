"""What a teacher is: the ``Teacher`` protocol shared by the HTTP and the local teacher, its sampling
settings, its answers, and the errors of a teach run."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class TeachError(RuntimeError):
    """A teach run cannot go on: bad input, or a teacher failure that retrying will not fix.

    ``summary`` holds the partial summary (a ``run.TeachSummary``, already written to disk) when the run
    had started.
    """

    def __init__(self, message: str, summary: Any = None) -> None:
        super().__init__(message)
        self.summary = summary


class TeacherError(TeachError):
    """The teacher refused the run (HTTP 401/403/404, a missing model): no question can succeed."""


class TeacherUnavailable(TeacherError):
    """The teacher endpoint stopped answering (connection refused or reset after every retry)."""


@dataclass(frozen=True)
class SampleConfig:
    """How to sample: ``samples`` per question at ``temperature`` (0 = greedy), at most ``max_new_tokens``."""

    samples: int = 1
    temperature: float = 0.0
    max_new_tokens: int = 256
    seed: int | None = 0


@dataclass
class Completion:
    """The teacher's answer to one question: its samples, or why there are none."""

    index: int
    texts: list[str] | None
    error: str | None = None


class Teacher(Protocol):
    """Anything that writes ``config.samples`` completions per prompt.

    ``complete`` yields one ``Completion`` per job, in any order, as they finish. A per-question failure
    is a Completion with ``error``; a failure no question can survive raises ``TeacherError``.
    """

    description: str

    def complete(self, jobs: Sequence[tuple[int, str]], config: SampleConfig) -> Iterator[Completion]: ...

    def stats(self) -> dict[str, Any]: ...
