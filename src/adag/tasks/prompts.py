"""Prompt datasets for tracing: JSONL (``{"prompt": ..., "seed": "Answer:", "label": ...}``, only
``prompt`` required) or plain text with one prompt a line (DESIGN.md, "Files users write")."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from adag.errors import AdagError
from adag.tasks.pairs import read_user_text


@dataclass(frozen=True)
class PromptSpec:
    """One prompt to trace: the text, an optional seed response (opened as the assistant turn
    with ``chat``, appended otherwise) and an optional label."""

    prompt: str
    seed: str | None = None
    label: str | None = None


def load_prompts(path: str | Path) -> list[PromptSpec]:
    """Read prompts from a JSONL file (when its first non-blank line starts with ``{``) or a text
    file with one prompt a line; blank lines are skipped. Errors name the file and line."""
    text = read_user_text(path, "prompt file", "a JSONL or text file")
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise AdagError(
            f'no prompts in {path}; write one prompt a line, or JSONL {{"prompt": ...}}'
        )
    if not lines[0][1].lstrip().startswith("{"):
        return [PromptSpec(line) for _, line in lines]
    out = []
    for n, line in lines:
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise AdagError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
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
        out.append(PromptSpec(obj["prompt"], obj.get("seed"), obj.get("label")))
    return out


__all__ = ["PromptSpec", "load_prompts"]
