"""Every prompt adag sends to an LLM, in one place, versioned by :data:`PROMPT_VERSION`.

The few-shot examples are data (``examples.json`` beside this module, hand-written and
illustrative). The prompts are short on purpose: the offline default explainer and simulator is
SmolLM2-135M-Instruct (8k context, CPU), so a record shows at most :data:`RECORD_TOKENS` tokens
(output side: :data:`RECORD_TARGETS` targets), an explainer prompt at most
:data:`EXPLAINER_CHARS` characters of records, and a simulated record at most
:data:`SIMULATOR_TOKENS` tokens; an explainer prompt stays well under 1,500 SmolLM2 tokens.

Answers are parsed here too: an explanation or a label is the first non-blank line of the reply,
with a leading bullet, a ``Label:``-style prefix, surrounding quotes and ``<< >>`` markers removed;
it is **malformed** when nothing is left or what is left has no letter (:func:`parse_text`).

Changing any template or example must bump :data:`PROMPT_VERSION`: it is part of the describe
stage's resume key, and the LLM cache is keyed by the full messages anyway.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any

import numpy as np

from adag.describe.records import SCALE, display

PROMPT_VERSION = "1"
RECORD_TOKENS = 32
"""tokens of one input record the explainer sees (a window around its peak)"""
RECORD_TARGETS = 8
"""targets of one output record the explainer sees (the largest |effect| first)"""
EXPLAINER_CHARS = 1800
"""characters of record text in one explainer prompt (records beyond are dropped)"""
SIMULATOR_TOKENS = 128
"""tokens of one input record the simulator predicts (its last ones)"""
EXPLANATION_CHARS = 200
"""an explanation longer than this is cut at a word boundary"""
EXPLAINER_MAX_TOKENS = 48
"""reply tokens an explainer call may generate (one short phrase)"""
LABEL_MAX_TOKENS = 12
"""reply tokens a label call may generate"""

Messages = list[dict[str, str]]


@functools.cache
def examples() -> dict[str, Any]:
    """The few-shot examples (``examples.json``)."""
    text = resources.files("adag.describe").joinpath("examples.json").read_text("utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


# -- records as text -----------------------------------------------------------------------------


def input_record_text(tokens: Sequence[str], highlight: Sequence[bool] | np.ndarray) -> str:
    """The record's tokens joined, each highlighted span wrapped in ``<< >>``, one line."""
    out: list[str] = []
    on = False
    for tok, h in zip(tokens, highlight, strict=True):
        if h and not on:
            out.append("<<")
        elif on and not h:
            out.append(">>")
        on = bool(h)
        out.append(display(tok))
    if on:
        out.append(">>")
    return "".join(out)


def _signed(v: float) -> str:
    i = int(v)
    return f"+{i}" if i > 0 else str(i)


def output_record_text(tokens: Sequence[str], values: Sequence[float] | np.ndarray) -> str:
    """At most :data:`RECORD_TARGETS` targets with their integer effects, largest ``|effect|``
    first (ties in target order): ``" Paris" +10, " London" -4``."""
    vals = np.asarray(values, dtype=np.float64)
    order = sorted(range(len(tokens)), key=lambda i: (-abs(vals[i]), i))[:RECORD_TARGETS]
    return ", ".join(f'"{display(tokens[i])}" {_signed(vals[i])}' for i in order)


def _numbered(lines: Sequence[str]) -> str:
    return "\n".join(f"{i + 1}. {line}" for i, line in enumerate(lines))


# -- explainer -----------------------------------------------------------------------------------

_EXPLAIN_INPUT_SYSTEM = (
    "You explain what makes a group of neurons in a language model fire. You see text "
    "excerpts; the tokens where the group fires most are marked <<like this>>. Answer with one "
    "short phrase (at most 12 words) saying what the marked tokens have in common. No preamble."
)
_EXPLAIN_OUTPUT_SYSTEM = (
    "You explain what a group of neurons in a language model does to its next-token "
    "predictions. For each prompt you see candidate next tokens with the group's effect, from "
    "-10 (strongly suppresses) to +10 (strongly promotes). Answer with one short phrase (at most "
    "12 words) saying which tokens it promotes and which it suppresses. No preamble."
)
_EXPLAIN_INPUT_ASK = "Excerpts:\n{records}\nWhat do the marked tokens have in common?"
_EXPLAIN_OUTPUT_ASK = "Prompts' next tokens with effects:\n{records}\nWhat does the group do?"


def within_budget(texts: Sequence[str]) -> int:
    """How many of ``texts`` (in order) fit in :data:`EXPLAINER_CHARS` characters; at least
    one."""
    total = 0
    for i, t in enumerate(texts):
        total += len(t)
        if i and total > EXPLAINER_CHARS:
            return i
    return len(texts)


def explainer_messages(side: str, records: Sequence[str]) -> Messages:
    """The explainer's chat: the instructions, one worked example, then ``records`` (texts of
    :func:`input_record_text` or :func:`output_record_text`)."""
    ex = examples()["explainer_input" if side == "input" else "explainer_output"]
    system = _EXPLAIN_INPUT_SYSTEM if side == "input" else _EXPLAIN_OUTPUT_SYSTEM
    ask = _EXPLAIN_INPUT_ASK if side == "input" else _EXPLAIN_OUTPUT_ASK
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": ask.format(records=_numbered(ex["records"]))},
        {"role": "assistant", "content": ex["explanation"]},
        {"role": "user", "content": ask.format(records=_numbered(records))},
    ]


# -- simulator -----------------------------------------------------------------------------------

_SIM_INPUT_SYSTEM = (
    "You predict, from an explanation of a group of neurons in a language model, how strongly "
    "the group fires on each token of a text: 0 = not at all, 10 = as strongly as it ever does. "
    "Most tokens are 0."
)
_SIM_OUTPUT_SYSTEM = (
    "You predict, from an explanation of a group of neurons in a language model, its effect on "
    "candidate next tokens: -10 = strongly suppresses, 0 = no effect, 10 = strongly promotes."
)
_SIM_INPUT_ASK = (
    "Explanation: {explanation}\nTokens, one per line:\n{lines}\n"
    "For each token write the token, a tab, and a value from 0 to 10."
)
_SIM_OUTPUT_ASK = (
    "Explanation: {explanation}\nCandidate next tokens, one per line:\n{lines}\n"
    "For each token write the token, a tab, and a value from -10 to 10."
)


def simulator_candidates(side: str) -> list[str]:
    """The value strings the simulator chooses from: "0".."10" (input), "-10".."10" (output)."""
    lo = 0 if side == "input" else -SCALE
    return [str(i) for i in range(lo, SCALE + 1)]


def simulator_messages(side: str, explanation: str, lines: Sequence[str]) -> Messages:
    """The simulator's chat up to its reply, whose lines are ``f"{lines[i]}\\t{value}"`` (what
    ``LLM.score_lines`` scores); ``lines`` are displayed tokens (:func:`~.records.display`)."""
    ex = examples()["simulator_input" if side == "input" else "simulator_output"]
    ask = _SIM_INPUT_ASK if side == "input" else _SIM_OUTPUT_ASK
    ex_lines = [display(t) for t in ex["tokens"]]
    ex_reply = "".join(f"{t}\t{v}\n" for t, v in zip(ex_lines, ex["values"], strict=True))
    return [
        {"role": "system", "content": _SIM_INPUT_SYSTEM if side == "input" else _SIM_OUTPUT_SYSTEM},
        {
            "role": "user",
            "content": ask.format(explanation=ex["explanation"], lines="\n".join(ex_lines)),
        },
        {"role": "assistant", "content": ex_reply},
        {"role": "user", "content": ask.format(explanation=explanation, lines="\n".join(lines))},
    ]


# -- label ---------------------------------------------------------------------------------------

_LABEL_SYSTEM = "You name groups of neurons in a language model with a label of 1 to 3 words."
_LABEL_INPUT = "What makes the group fire: {}"
_LABEL_OUTPUT = "What the group does to the next token: {}"
_LABEL_ASK = "Answer with the label only."


def _label_ask(input_explanation: str | None, output_explanation: str | None) -> str:
    lines = [] if input_explanation is None else [_LABEL_INPUT.format(input_explanation)]
    if output_explanation is not None:
        lines.append(_LABEL_OUTPUT.format(output_explanation))
    return "\n".join([*lines, _LABEL_ASK])


def label_messages(input_explanation: str | None, output_explanation: str | None) -> Messages:
    """The label's chat from the best input and output explanations (a missing one is left
    out)."""
    ex = examples()["label"]
    return [
        {"role": "system", "content": _LABEL_SYSTEM},
        {"role": "user", "content": _label_ask(ex["input"], ex["output"])},
        {"role": "assistant", "content": ex["label"]},
        {"role": "user", "content": _label_ask(input_explanation, output_explanation)},
    ]


# -- judge ---------------------------------------------------------------------------------------

JUDGE_RESPONSE_CHARS = 4000
"""a judged response longer than this is cut (the judge sees its start)"""
_JUDGE_SYSTEM = "You grade a language model's response against a rubric. Be strict and brief."
_JUDGE_ASK = {
    "yes/no": "Answer with yes or no only.",
    "0-10": "Answer with one integer from 0 (not at all) to 10 (completely) only.",
}


def judge_messages(rubric: str, response: str, scale: str, prompt: str | None = None) -> Messages:
    """The judge's chat: the rubric, the prompt (when given), the response, and how to answer."""
    parts = [f"Rubric: {rubric}"]
    if prompt is not None:
        parts.append(f"Prompt: {prompt}")
    parts.append(f"Response: {response[:JUDGE_RESPONSE_CHARS]}")
    parts.append(_JUDGE_ASK[scale])
    return [
        {"role": "system", "content": _JUDGE_SYSTEM},
        {"role": "user", "content": "\n".join(parts)},
    ]


# -- parsing answers -----------------------------------------------------------------------------

_BULLET = re.compile(r"^(?:[-*•]+|\d+[.)])\s*")
_PREFIX = re.compile(r"^(?:explanation|answer|label|the label is)\s*[:\-]\s*", re.IGNORECASE)
_QUOTES = "\"'`“”‘’"


def parse_text(text: str) -> tuple[str | None, str | None]:
    """An explanation or label from a reply: ``(text, None)`` or ``(None, reason)``. The first
    non-blank line, without a leading bullet or number, a ``Label:``-style prefix, ``<< >>``
    markers and surrounding quotes; malformed when that is empty or has no letter."""
    line = ""
    for raw in text.splitlines():
        s = _PREFIX.sub("", _BULLET.sub("", raw.strip()))
        s = s.replace("<<", "").replace(">>", "").strip().strip(_QUOTES).strip()
        if s:
            line = s
            break
    if not line:
        return None, "empty answer"
    if not any(ch.isalpha() for ch in line):
        return None, f"no words in the answer {line[:40]!r}"
    return line, None


def parse_explanation(text: str) -> tuple[str | None, str | None]:
    """:func:`parse_text`, cut to :data:`EXPLANATION_CHARS` at a word boundary, without a
    trailing full stop."""
    s, why = parse_text(text)
    if s is None:
        return None, why
    if len(s) > EXPLANATION_CHARS:
        s = s[:EXPLANATION_CHARS].rsplit(" ", 1)[0]
    return s.rstrip(".").strip() or s, None


def parse_label(text: str) -> tuple[str | None, str | None]:
    """:func:`parse_text`, its first three words, without trailing punctuation."""
    s, why = parse_text(text)
    if s is None:
        return None, why
    words = s.split()[:3]
    label = " ".join(words).rstrip(".,;:!?").strip(_QUOTES).strip()
    if not any(ch.isalpha() for ch in label):
        return None, f"no words in the label {s[:40]!r}"
    return label, None


__all__ = [
    "PROMPT_VERSION",
    "examples",
    "explainer_messages",
    "input_record_text",
    "judge_messages",
    "label_messages",
    "output_record_text",
    "parse_explanation",
    "parse_label",
    "parse_text",
    "simulator_candidates",
    "simulator_messages",
    "within_budget",
]
