"""Prompts, prompt pairs and target metrics; the built-in tasks (IOI, capitals) and datasets;
JSONL files.

``pairs`` holds the data types, tokenization, metrics and the file format; ``builtin`` generates
pairs from templates, keeping only those the model gets right; ``prompts`` reads and writes
prompts files; ``datasets`` makes prompt datasets (capitals, math, antonyms, ...) checked against
the model.
"""

from __future__ import annotations

from adag.tasks.builtin import TASKS, capitals, ioi, make_task, max_pairs
from adag.tasks.datasets import DATASETS, Dataset, make_dataset
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
from adag.tasks.prompts import PromptFile, PromptSpec, load_prompts, write_prompts

__all__ = [
    "DATASETS",
    "TASKS",
    "Dataset",
    "Metric",
    "PromptFile",
    "PromptPair",
    "PromptSpec",
    "TokenizedPair",
    "UserFile",
    "answer_prob",
    "capitals",
    "ioi",
    "load_pairs",
    "load_prompts",
    "logit_diff",
    "make_dataset",
    "make_metric",
    "make_task",
    "max_pairs",
    "save_pairs",
    "tokenize_pair",
    "tokenize_pairs",
    "write_prompts",
]
