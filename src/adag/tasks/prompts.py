"""Prompt datasets for tracing: JSONL (``{"prompt": ..., "seed": "Answer:", "label": ...}``, only
``prompt`` required) or plain text with one prompt a line (DESIGN.md, "Files users write").

Which of the two a file is, is decided once, explicitly (:func:`adag.tasks.pairs.file_format`:
by the name, else by the first line), and reported: a JSONL file whose later line is not JSON
is an error naming that line, never a silent fall-back to text."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from adag.errors import AdagError
from adag.tasks.pairs import UserFile, file_format, nonblank_lines, read_user_text


@dataclass(frozen=True)
class PromptSpec:
    """One prompt to trace: the text, an optional seed response (opened as the assistant turn
    with ``chat``, appended otherwise) and an optional label."""

    prompt: str
    seed: str | None = None
    label: str | None = None
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
        unknown = sorted(set(obj) - {"prompt", "seed", "label"})
        if unknown:
            raise AdagError(f"{where}: unknown keys {unknown}; allowed: prompt, seed, label")
        out.append(PromptSpec(obj["prompt"], obj.get("seed"), obj.get("label"), where=where))
    return PromptFile(out, path=str(path), format=fmt, why=why)


__all__ = ["PromptFile", "PromptSpec", "load_prompts"]
