"""Prompts, prompt pairs and target metrics; the built-in tasks (IOI, capitals); JSONL files.

``pairs`` holds the data types, tokenization, metrics and the file format; ``builtin`` generates
pairs from templates, keeping only those the model gets right.
"""

from __future__ import annotations

from adag.tasks.builtin import TASKS, capitals, ioi, make_task, max_pairs
from adag.tasks.pairs import (
    Metric,
    PromptPair,
    TokenizedPair,
    UserFile,
    answer_prob,
    load_pairs,
    logit_diff,
    make_metric,
    save_pairs,
    tokenize_pair,
    tokenize_pairs,
)

__all__ = [
    "TASKS",
    "Metric",
    "PromptPair",
    "TokenizedPair",
    "UserFile",
    "answer_prob",
    "capitals",
    "ioi",
    "load_pairs",
    "logit_diff",
    "make_metric",
    "make_task",
    "max_pairs",
    "save_pairs",
    "tokenize_pair",
    "tokenize_pairs",
]
