"""Prompt pairs, their tokenization, the target metrics and the JSONL format.

A *prompt pair* is the unit of activation patching and AtP (Kramár et al., 2024): a clean prompt on
which the model shows the behaviour, a noise prompt of the same token length on which it does not,
and the answer token (plus, for the default metric, a foil token). The metric is a scalar function
of the clean-length logits at the last position — by default ``logit[answer] - logit[foil]``, as in
the IOI work that AtP* evaluates on. Metrics stay differentiable so AtP can take their gradient.

The file format (DESIGN.md, "Files users write") is JSONL, one object a line::

    {"clean": "...", "noise": "...", "answer": " Mary", "foil": " John"}

``answer`` and ``foil`` are single tokens of the model's tokenizer, with their leading space. A
text file (``.txt``, or ``format="text"``) holds the same fields tab-separated, one pair a line.

A JSONL line may name the clean prompt's slots (*roles*) by token position, counting from 0 in the
model's tokenization of the clean prompt (a BOS token, if the tokenizer adds one, is position 0)::

    {"clean": "...", "noise": "...", "answer": " Mary", "foil": " John",
     "roles": {"IO": 2, "S1": 4, "S2": 10, "END": 14}}

Role names match :data:`adag.nodes.ROLE_PATTERN`; each role is at its own position. When pairs of
different lengths are aggregated, a node at a named slot is reported under its role
(``head:23:@IO:3:z``) and other positions count from the end (``head:23:-1:3:z``), see
:func:`adag.patching.scores.merge_pairs`. The built-in tasks name their slots themselves.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
from torch import Tensor

from adag.errors import AdagError
from adag.io import write_text
from adag.nodes import ROLE_PATTERN, is_role

if TYPE_CHECKING:
    from adag.models.model import Model

FIELDS = ("clean", "noise", "answer", "foil")
"""The string fields of a pair (``roles``, a JSON object, comes after them)."""
REQUIRED = ("clean", "noise", "answer")


def _short(text: str, limit: int = 60) -> str:
    """``repr`` of ``text``, cut to ``limit`` characters: names a pair in a one-line message."""
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 4] + "...'"


@dataclass(frozen=True)
class PromptPair:
    """A clean prompt, a noise prompt of the same token length, and the tokens the metric reads."""

    clean: str
    """The prompt on which the model shows the behaviour."""
    noise: str
    """The corrupted prompt (same token length as ``clean``) whose activations are patched in."""
    answer: str
    """The correct next token after ``clean``: one token with its leading space, e.g. ``" Mary"``."""
    foil: str | None = None
    """The competing token, e.g. ``" John"``; required by the logit-difference metric."""
    roles: Mapping[str, int] | None = field(default=None, hash=False)
    """The clean prompt's named slots: role -> token position in the model's tokenization of
    the clean prompt (e.g. ``{"IO": 2, "S1": 4, "S2": 10, "END": 14}``); checked against the
    prompt's length when the pair is tokenized. None: no named slots."""

    def __post_init__(self) -> None:
        for name in REQUIRED:
            value = getattr(self, name)
            if not isinstance(value, str):
                raise AdagError(f"PromptPair.{name} must be a string, got {type(value).__name__}")
        if self.foil is not None and not isinstance(self.foil, str):
            raise AdagError(
                f"PromptPair.foil must be a string or None, got {type(self.foil).__name__}"
            )
        if self.roles is not None:
            where = f"pair {_short(self.clean)}"
            object.__setattr__(self, "roles", check_roles(self.roles, where))


def check_roles(roles: object, where: str, n_pos: int | None = None) -> dict[str, int]:
    """``roles`` as a plain dict, or a one-line :class:`AdagError` starting with ``where`` and
    saying the fix: a mapping of role names (:data:`adag.nodes.ROLE_PATTERN`) to distinct
    non-negative int token positions, below ``n_pos`` (the clean prompt's token length) when
    given."""
    fix = 'give "roles" as token positions in the clean prompt, e.g. {"IO": 2, "END": 14}'
    if not isinstance(roles, Mapping):
        raise AdagError(f"{where}: roles must be an object of role -> token position; {fix}")
    out: dict[str, int] = {}
    seen: dict[int, str] = {}
    for name, p in roles.items():
        if not is_role(name):
            raise AdagError(
                f"{where}: bad role name {name!r}; a role is a letter then letters, digits, _ "
                f"or + ({ROLE_PATTERN}), e.g. IO, S1+1, END"
            )
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise AdagError(
                f"{where}: role {name!r} is at {p!r}, not a token position; {fix} (from 0)"
            )
        if n_pos is not None and p >= n_pos:
            raise AdagError(
                f"{where}: role {name!r} is at token {p}, but the clean prompt is {n_pos} tokens "
                f"(positions 0..{n_pos - 1}); {fix}, counting from 0 in the model's tokenization"
            )
        if p in seen:
            raise AdagError(
                f"{where}: roles {seen[p]!r} and {name!r} are both at token {p}; give each role "
                "its own position"
            )
        seen[p] = name
        out[name] = p
    return out


# eq=False: the fields are tensors, whose ``==`` is elementwise; identity equality is the honest one.
@dataclass(frozen=True, eq=False)
class TokenizedPair:
    """A :class:`PromptPair` in token ids, ready for a model."""

    pair: PromptPair
    clean: Tensor
    """Clean token ids, LongTensor ``1 pos``."""
    noise: Tensor
    """Noise token ids, LongTensor ``1 pos`` (same ``pos`` as ``clean``)."""
    answer_id: int
    foil_id: int | None
    roles: Mapping[str, int] | None = None
    """The clean prompt's named slots, role -> token position (checked against ``n_pos`` by
    :func:`tokenize_pair`); None: none. Used to align pairs of different lengths
    (:func:`adag.patching.scores.merge_pairs`)."""

    @property
    def n_pos(self) -> int:
        return int(self.clean.shape[1])


def _token_ids(model: Model, text: str) -> list[int]:
    """Ids of ``text`` as a continuation (no special tokens)."""
    tok = model.tokenizer
    if tok is None:
        raise AdagError(f"model {model.name!r} has no tokenizer; prompt pairs need one")
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _single_token(model: Model, text: str, field: str, where: str) -> int:
    ids = _token_ids(model, text)
    if len(ids) != 1:
        tok = model.tokenizer
        pieces = [tok.decode([i]) for i in ids]
        raise AdagError(
            f"{where}: {field} {text!r} is {len(ids)} tokens {pieces} for this tokenizer, not one; "
            f"use a single token with its leading space (e.g. {pieces[0] if pieces else ' Mary'!r})"
        )
    return ids[0]


def _same_answer_and_foil(pair: PromptPair, where: str) -> AdagError:
    """A pair whose foil is its answer would say nothing: logit(answer) - logit(foil) is 0."""
    return AdagError(
        f"{where}: answer {pair.answer!r} and foil {pair.foil!r} are the same token, so "
        f"logit(answer) - logit(foil) is 0 for every node; make the foil the competing token "
        f"(e.g. the noise prompt's answer)"
    )


def _tokenize(model: Model, pair: PromptPair, where: str) -> TokenizedPair:
    for which in ("clean", "noise"):
        if not getattr(pair, which):
            raise AdagError(f"{where}: the {which} prompt is empty; give a non-empty prompt")
    clean = model.to_tokens(pair.clean)
    noise = model.to_tokens(pair.noise)
    if clean.shape[1] != noise.shape[1]:
        raise AdagError(
            f"{where}: clean is {clean.shape[1]} tokens but noise is {noise.shape[1]}; "
            f"patching needs equal lengths, so reword the noise prompt (e.g. swap in single-token names)"
        )
    answer_id = _single_token(model, pair.answer, "answer", where)
    foil_id = None if pair.foil is None else _single_token(model, pair.foil, "foil", where)
    if foil_id == answer_id:
        raise _same_answer_and_foil(pair, where)
    roles = None if pair.roles is None else check_roles(pair.roles, where, clean.shape[1])
    return TokenizedPair(pair, clean, noise, answer_id, foil_id, roles)


def tokenize_pair(model: Model, pair: PromptPair) -> TokenizedPair:
    """Tokenize one pair, checking equal clean/noise lengths and single-token answer and foil."""
    return _tokenize(model, pair, f"pair {_short(pair.clean)}")


def tokenize_pairs(model: Model, pairs: Sequence[PromptPair]) -> list[TokenizedPair]:
    """:func:`tokenize_pair` over a list; errors name the pair's index."""
    if not pairs:
        raise AdagError("no prompt pairs given; pass at least one PromptPair")
    return [_tokenize(model, p, f"pair {i} {_short(p.clean)}") for i, p in enumerate(pairs)]


# -- metrics ---------------------------------------------------------------------------------------


class Metric(Protocol):
    """A scalar target per row: ``(logits batch pos d_vocab, pair) -> batch``, read at the last
    position of the clean-length prompt. Must stay differentiable (AtP takes its gradient)."""

    name: str

    def __call__(self, logits: Tensor, pair: TokenizedPair) -> Tensor: ...


def _last(logits: Tensor, name: str) -> Tensor:
    """Last-position logits ``batch d_vocab``; half precisions are upcast to float32 so that
    differences of large logits are not rounded away (float64 stays float64)."""
    if logits.dim() != 3:
        raise AdagError(
            f"metric {name} needs logits of shape (batch, pos, d_vocab), got {tuple(logits.shape)}"
        )
    last = logits[:, -1]
    if last.dtype in (torch.float16, torch.bfloat16):
        last = last.float()
    return last


class _LogitDiff:
    name = "logit_diff"

    def __call__(self, logits: Tensor, pair: TokenizedPair) -> Tensor:
        if pair.foil_id is None:
            raise AdagError(
                f"metric logit_diff needs a foil, but pair {_short(pair.pair.clean)} has none; "
                f"add a foil token or use metric 'prob' (adag patch --metric prob)"
            )
        last = _last(logits, self.name)
        return last[:, pair.answer_id] - last[:, pair.foil_id]

    def __repr__(self) -> str:
        return "logit_diff()"


class _AnswerProb:
    name = "prob"

    def __call__(self, logits: Tensor, pair: TokenizedPair) -> Tensor:
        return _last(logits, self.name).softmax(-1)[:, pair.answer_id]

    def __repr__(self) -> str:
        return "answer_prob()"


class _FnMetric:
    """A user callable ``(logits, pair) -> (batch,)``, with its output shape checked."""

    def __init__(self, fn: Callable[[Tensor, TokenizedPair], Tensor]) -> None:
        self.fn = fn
        self.name: str = getattr(fn, "__name__", None) or type(fn).__name__

    def __call__(self, logits: Tensor, pair: TokenizedPair) -> Tensor:
        out = self.fn(logits, pair)
        if not isinstance(out, Tensor) or tuple(out.shape) != (logits.shape[0],):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise AdagError(
                f"metric {self.name} returned {got}; a metric must return one value per row, "
                f"shape ({logits.shape[0]},)"
            )
        return out

    def __repr__(self) -> str:
        return f"metric({self.name})"


def logit_diff() -> Metric:
    """``logit[answer] - logit[foil]`` at the last position (the default metric)."""
    return _LogitDiff()


def answer_prob() -> Metric:
    """``softmax(logits[:, -1])[answer]``."""
    return _AnswerProb()


METRICS: dict[str, Callable[[], Metric]] = {"logit_diff": logit_diff, "prob": answer_prob}


def make_metric(spec: str | Callable[..., Any] | None) -> Metric:
    """A metric from a name (``None`` or ``"logit_diff"``, ``"prob"``), a :class:`Metric` (returned
    as is) or a callable ``(logits, pair) -> (batch,)`` (wrapped, its output shape checked)."""
    if spec is None:
        return logit_diff()
    if isinstance(spec, str):
        if spec not in METRICS:
            raise AdagError(f"unknown metric {spec!r}; choose one of {', '.join(METRICS)}")
        return METRICS[spec]()
    if callable(spec):
        if isinstance(getattr(spec, "name", None), str):
            return spec  # type: ignore[return-value]  # already a Metric
        return _FnMetric(spec)
    raise AdagError(
        f"metric must be a name ({', '.join(METRICS)}) or a callable (logits, pair) -> (batch,), "
        f"got {type(spec).__name__}"
    )


# -- JSONL -----------------------------------------------------------------------------------------


def _pair_from_json(obj: Any, where: str) -> PromptPair:
    if not isinstance(obj, dict):
        raise AdagError(
            f'{where}: expected a JSON object like {{"clean": ..., "noise": ..., "answer": ...}}, '
            f"got {type(obj).__name__}"
        )
    unknown = [k for k in obj if k not in (*FIELDS, "roles")]
    if unknown:
        raise AdagError(
            f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(FIELDS)}, roles"
        )
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        raise AdagError(
            f"{where}: missing field(s) {', '.join(map(repr, missing))}; "
            f"each line needs clean, noise and answer (foil optional)"
        )
    for k in FIELDS:
        v = obj.get(k)
        if k == "foil" and v is None:
            continue
        if not isinstance(v, str):
            raise AdagError(f"{where}: field {k!r} must be a string, got {type(v).__name__}")
    roles = obj.get("roles")
    if roles is not None:
        roles = check_roles(roles, where)
    return PromptPair(obj["clean"], obj["noise"], obj["answer"], obj.get("foil"), roles)


FORMATS = ("auto", "jsonl", "text")
"""How a user file is read: ``auto`` decides by :func:`file_format`'s rule."""

T = TypeVar("T")


class UserFile(list[T]):
    """The rows of a file a user gave (a plain list, in file order), with where they came from
    and the format they were read in (``"jsonl"`` or ``"text"``), so that a caller can say
    which format was used."""

    def __init__(self, rows: Iterable[T], *, path: str, format: str, why: str) -> None:
        super().__init__(rows)
        self.path = path
        self.format = format
        """``"jsonl"`` or ``"text"``."""
        self.why = why
        """How the format was decided, e.g. ``"its name ends in .jsonl"``."""


def read_user_text(path: str | Path, what: str, expected: str) -> str:
    """The UTF-8 text of a file a user gave (a leading BOM dropped), or a one-line error naming
    it: ``what`` says what the file is (``"prompt file"``), ``expected`` what to give instead
    (``"a JSONL file"``).

    Any readable path that is not a directory is read, once: pipes, FIFOs, ``/dev/stdin`` and
    process substitution (``--prompts <(...)``) included, which ``Path.is_file`` would refuse."""
    if not str(path).strip():
        raise AdagError(f"{what} name is empty; give {expected}")
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise AdagError(f"{what} {str(path)!r} does not exist; give {expected}") from None
    except OSError as e:
        raise AdagError(
            f"{what} {str(path)!r} cannot be read ({e.strerror}); give {expected}"
        ) from e
    if stat.S_ISDIR(mode):
        raise AdagError(f"{what} {str(path)!r} is a directory; give {expected}")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise AdagError(
            f"{what} {str(path)!r} cannot be read ({e.strerror}); give {expected}"
        ) from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise AdagError(
            f"{what} {str(path)!r} is not UTF-8 text ({e.reason}); save it as UTF-8"
        ) from e


def nonblank_lines(text: str) -> list[tuple[int, str]]:
    """The non-blank lines of ``text`` with their 1-based numbers; a BOM starting a line (left
    by concatenating files saved with one) is dropped."""
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.removeprefix("\ufeff")
        if line.strip():
            out.append((n, line))
    return out


def _json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):
        return False


def file_format(path: str | Path, lines: Sequence[tuple[int, str]], format: str) -> tuple[str, str]:
    """``(format, why)``: the format a user file is read in and how that was decided.

    ``format`` ``"jsonl"`` or ``"text"`` is taken as given. ``"auto"`` decides by the name
    (``.jsonl`` or ``.json``: JSONL; ``.txt``: text), else by the content: JSONL when the first
    non-blank line is a JSON object, text otherwise. A file decided as JSONL must be JSONL on
    every line (errors name the line); it is never read as text behind the user's back."""
    if format not in FORMATS:
        raise AdagError(f"unknown file format {format!r}; choose one of {', '.join(FORMATS)}")
    if format != "auto":
        return format, f"--format {format}"
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl", f"its name ends in {suffix}"
    if suffix == ".txt":
        return "text", "its name ends in .txt"
    if lines and _json_object(lines[0][1]):
        return "jsonl", "its first line is a JSON object"
    return "text", "its first line is not a JSON object"


_TSV = "clean<TAB>noise<TAB>answer[<TAB>foil]"


def load_pairs(path: str | Path, *, format: str = "auto") -> UserFile[PromptPair]:
    """Read prompt pairs from a JSONL file, or (``format="text"``, or a ``.txt`` name) one pair a
    line as ``clean<TAB>noise<TAB>answer[<TAB>foil]``; blank lines are skipped. A JSONL line may
    add ``"roles"`` (module doc; the text format has none). ``format``:
    ``"auto"`` (:func:`file_format`), ``"jsonl"`` or ``"text"``; the result's ``.format`` says
    which was used. Errors name the file and line."""
    text = read_user_text(path, "prompt-pair file", "a JSONL or tab-separated text file")
    lines = nonblank_lines(text)
    fmt, why = file_format(path, lines, format)
    pairs = []
    for n, line in lines:
        where = f"{path}:{n}"
        if fmt == "text":
            fields = line.split("\t")
            if len(fields) not in (3, 4):
                raise AdagError(
                    f"{where}: expected {_TSV} (3 or 4 tab-separated fields), got {len(fields)}; "
                    f"read as text because {why} (pass --format jsonl for JSONL)"
                )
            pair = PromptPair(
                fields[0], fields[1], fields[2], fields[3] if len(fields) == 4 else None
            )
        else:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise AdagError(
                    f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                    f"write one JSON object per line (read as JSONL because {why})"
                ) from e
            pair = _pair_from_json(obj, where)
        if pair.foil is not None and pair.foil == pair.answer:
            raise _same_answer_and_foil(pair, where)
        pairs.append(pair)
    if not pairs:
        raise AdagError(
            f'no prompt pairs in {path}; write one JSON object a line: {{"clean": ..., '
            f'"noise": ..., "answer": " Mary", "foil": " John"}}'
        )
    return UserFile(pairs, path=str(path), format=fmt, why=why)


def save_pairs(pairs: Sequence[PromptPair], path: str | Path) -> None:
    """Write ``pairs`` as JSONL atomically (a temp file in the same directory, then a rename);
    ``roles`` are written when a pair has them."""
    if not pairs:
        raise AdagError(f"no prompt pairs to save to {path}; pass at least one PromptPair")
    lines = []
    for pair in pairs:
        obj: dict[str, Any] = {"clean": pair.clean, "noise": pair.noise, "answer": pair.answer}
        if pair.foil is not None:
            obj["foil"] = pair.foil
        if pair.roles is not None:
            obj["roles"] = dict(pair.roles)
        lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
    write_text(path, "".join(lines))
