"""Teacher rationales: a large model writes chain-of-thought for a task's questions; keep the right ones.

For every question the teacher is prompted zero-shot ("Q: {question}\\nA: Let's think step by step.",
or a template) for K samples at a temperature. A sample is kept when its final answer
(``answers.extract_answer``) matches the gold answer (``answers.answers_match``); samples with the same
normalized rationale are kept once. Each kept sample becomes one training record::

    {"input": "Infer the correct answer for the question.\\n\\nQ: <question>\\nA:",
     "output": "<rationale>\\n\\n-->\\n\\n<gold answer> END"}

Teachers:
    * ``LocalTeacher``: a Hugging Face causal LM directory (loaded by ``student.load_student``), batched
      ``generate`` with left padding; sampling at ``temperature`` (seeded), greedy at temperature 0.
    * ``HTTPTeacher``: an OpenAI-compatible endpoint (``/v1/chat/completions``, or ``/v1/completions``),
      standard library HTTP with bounded concurrency, a per-request timeout and retries with exponential
      backoff and jitter (honouring ``Retry-After``) on 429, 5xx, malformed JSON, timeouts and
      connection errors. 401/403/404 stop the run at once.

Output is append-only JSONL, flushed and fsync'ed once per question, beside two sidecars: ``<out>.done``
(one JSON line per finished question: its index and counts, after a header that pins the questions
file) and ``<out>.summary.json``. ``resume=True`` skips every question listed in ``<out>.done`` or whose
input already appears in the output, so an interrupted run continues without duplicating records.

The package's modules, one job each:

* :mod:`.questions`: reading a task's questions, the prompts, the rationale of a sample;
* :mod:`.teacher`: the ``Teacher`` protocol, its sampling settings, answers and errors;
* :mod:`.http_teacher` and :mod:`.local_teacher`: the two teachers;
* :mod:`.run`: ``make_teacher`` and the resumable run, ``teach``.
"""

from .http_teacher import HTTPTeacher
from .local_teacher import LocalTeacher
from .questions import (
    DEFAULT_TEMPLATE,
    INPUT_TEMPLATE,
    Question,
    QuestionSet,
    check_template,
    clean_rationale,
    load_questions,
    load_template,
    split_prompt,
    training_input,
)
from .run import (
    DEFAULT_SAMPLE_TEMPERATURE,
    MAX_LISTED_FAILURES,
    PROGRESS_FORMAT,
    PROGRESS_VERSION,
    TeachSummary,
    make_teacher,
    progress_path,
    summary_path,
    teach,
)
from .teacher import Completion, SampleConfig, Teacher, TeachError, TeacherError, TeacherUnavailable

__all__ = [
    "Completion",
    "DEFAULT_SAMPLE_TEMPERATURE",
    "DEFAULT_TEMPLATE",
    "HTTPTeacher",
    "INPUT_TEMPLATE",
    "LocalTeacher",
    "MAX_LISTED_FAILURES",
    "PROGRESS_FORMAT",
    "PROGRESS_VERSION",
    "Question",
    "QuestionSet",
    "SampleConfig",
    "TeachError",
    "TeachSummary",
    "Teacher",
    "TeacherError",
    "TeacherUnavailable",
    "check_template",
    "clean_rationale",
    "load_questions",
    "load_template",
    "make_teacher",
    "progress_path",
    "split_prompt",
    "summary_path",
    "teach",
    "training_input",
]
