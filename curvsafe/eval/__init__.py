"""Evaluation: batched greedy generation, refusal judges, harmful rate and task accuracy, per-seed targets."""

from .generate import greedy_generate
from .judge import REFUSAL_KEYWORDS, JudgeError, KeywordJudge, judge_responses, load_judge
from .metrics import evaluate_model, harmful_rate, refusal_rate, task_accuracy
from .targets import Targets

__all__ = ["greedy_generate", "REFUSAL_KEYWORDS", "JudgeError", "KeywordJudge", "judge_responses", "load_judge",
           "evaluate_model", "harmful_rate", "refusal_rate", "task_accuracy", "Targets"]
