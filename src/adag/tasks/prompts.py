"""Prompt datasets for tracing: JSONL (``{"prompt": ..., "seed": "Answer:", "label": ...,
"score": 0.7}``, only ``prompt`` required) or plain text with one prompt a line (DESIGN.md,
"Files users write"). ``score`` is a number measured elsewhere for the prompt (e.g. how often a
jailbreak variant succeeds), which behaviour correlation reads.

Which of the two a file is, is decided once, explicitly (:func:`adag.tasks.pairs.file_format`:
by the name, else by the first line), and reported: a JSONL file whose later line is not JSON
is an error naming that line, never a silent fall-back to text."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from adag.errors import AdagError
from adag.io import shown, write_text
from adag.tasks.pairs import UserFile, file_format, nonblank_lines, read_user_text

if TYPE_CHECKING:
    from adag.models.model import Model


@dataclass(frozen=True)
class PromptSpec:
    """One prompt to trace: the text, an optional seed response (opened as the assistant turn
    with ``chat``, appended otherwise), an optional label (the expected answer) and an optional
    score."""

    prompt: str
    seed: str | None = None
    label: str | None = None
    score: float | None = None
    """A behaviour measured for this prompt elsewhere (any number), or None."""
    where: str | None = field(default=None, compare=False)
    """``FILE:LINE`` for a prompt read from a file (for error messages); not part of equality."""


class PromptFile(UserFile[PromptSpec]):
    """The prompts of a file (a list, in file order) with ``.path``, ``.format`` (``"jsonl"``
    or ``"text"``) and ``.why`` (how the format was decided)."""


def load_prompts(path: str | Path, *, format: str = "auto") -> PromptFile:
    """Read prompts from a JSONL file or a text file with one prompt a line; blank lines are
    skipped and a UTF-8 BOM is dropped. ``format``: ``"auto"`` (by the name: ``.jsonl``/``.json``
    or ``.txt``, else JSONL when the first non-blank line is a JSON object), ``"jsonl"`` or
    ``"text"`` (for prompts that start with ``{``). The result's ``.format`` says which was used.
    Errors name the file and line."""
    text = read_user_text(path, "prompt file", "a JSONL or text file")
    lines = nonblank_lines(text)
    if not lines:
        raise AdagError(
            f'no prompts in {path}; write one prompt a line, or JSONL {{"prompt": ...}}'
        )
    fmt, why = file_format(path, lines, format)
    if fmt == "text":
        specs = [PromptSpec(line, where=f"{path}:{n}") for n, line in lines]
        return PromptFile(specs, path=str(path), format=fmt, why=why)
    out = []
    for n, line in lines:
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise AdagError(
                f"{where}: not valid JSON ({e.msg} at column {e.colno}); read as JSONL because "
                f"{why} (pass --format text for one prompt a line)"
            ) from e
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise AdagError(f'{where}: each line needs a "prompt" string, e.g. {{"prompt": "..."}}')
        if not obj["prompt"].strip():
            raise AdagError(f"{where}: the prompt is empty; give a non-empty prompt")
        for key in ("seed", "label"):
            if obj.get(key) is not None and not isinstance(obj[key], str):
                raise AdagError(f'{where}: "{key}" must be a string')
        score = obj.get("score")
        if score is not None and (
            isinstance(score, bool)
            or not isinstance(score, (int, float))
            or not math.isfinite(score)
        ):
            raise AdagError(f'{where}: "score" must be a finite number, got {json.dumps(score)}')
        unknown = sorted(set(obj) - {"prompt", "seed", "label", "score"})
        if unknown:
            raise AdagError(f"{where}: unknown keys {unknown}; allowed: prompt, seed, label, score")
        out.append(
            PromptSpec(
                obj["prompt"],
                obj.get("seed"),
                obj.get("label"),
                None if score is None else float(score),
                where=where,
            )
        )
    return PromptFile(out, path=str(path), format=fmt, why=why)


def write_prompts(specs: Sequence[PromptSpec], path: str | Path) -> Path:
    """Write ``specs`` as prompts JSONL, atomically: ``prompt``, and ``seed``, ``label`` and
    ``score`` where set (what :func:`load_prompts` reads back equal)."""
    if not specs:
        raise AdagError(f"no prompts to write to {shown(path)}; pass at least one PromptSpec")
    lines = []
    for spec in specs:
        obj: dict[str, str | float] = {"prompt": spec.prompt}
        for key in ("seed", "label", "score"):
            value = getattr(spec, key)
            if value is not None:
                obj[key] = value
        lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
    return write_text(path, "".join(lines))


def assemble_prompt(
    model: Model, prompt: str, *, chat: bool = False, seed: str | None = None
) -> tuple[str, list[int]]:
    """The text and token ids traced for ``prompt``: the raw prompt, or the model's chat template
    with ``prompt`` as the user turn and the assistant turn opened; ``seed`` (e.g. ``"Answer:"``)
    is appended either way (after a space for a raw prompt, see :func:`join_seed`), so the traced
    position is its last token. Checked against the
    model's context."""
    if not prompt.strip():
        raise AdagError("prompt is empty; give a non-empty prompt")
    tok = model.tok()
    if chat:
        if not getattr(tok, "chat_template", None):
            raise AdagError(f"model {model.name!r} has no chat template; trace without --chat")
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        text = str(text) + (seed or "")
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
    else:
        text = join_seed(prompt, seed)
        ids = model.to_tokens(text)[0].tolist()
    import torch

    model.check_tokens(torch.tensor([ids]))
    return text, ids


def join_seed(prompt: str, seed: str | None) -> str:
    """``prompt`` followed by the seed response, with one space between them unless the prompt
    ends or the seed starts with whitespace (``"Q?" + "Answer:"`` is ``"Q? Answer:"``)."""
    if not seed:
        return prompt
    if prompt[-1:].isspace() or seed[:1].isspace():
        return prompt + seed
    return f"{prompt} {seed}"


__all__ = [
    "PromptFile",
    "PromptSpec",
    "assemble_prompt",
    "join_seed",
    "load_prompts",
    "write_prompts",
]
