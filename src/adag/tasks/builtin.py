"""Built-in prompt-pair tasks, generated from templates and filtered by the model itself.

- ``ioi``: indirect-object identification (Wang et al., 2022), the task AtP* (Kramár et al., 2024)
  evaluates on. "When Mary and John went to the store, John gave a drink to" → " Mary" (the indirect
  object), foil " John" (the subject), in both name orders (ABB and BAB). The noise prompt is the
  standard ABC corruption: the three name slots hold three other distinct names, so no name in it
  points at the answer.
- ``capitals``: "The capital of France is" → " Paris", noise "The capital of Germany is" whose
  capital " Berlin" is the foil.

Only names and capitals that are a single token (with their leading space) in the model's tokenizer
are used, so clean and noise prompts have equal token lengths (checked anyway). A pair is kept only
when the model's top-1 next token after the clean prompt is the answer and logit(answer) >
logit(foil) there; for ``capitals`` the noise prompt's top-1 must also be the foil, so the metric
flips sign between clean and noise. Candidates are drawn in a fixed order from ``seed``; the first
``n`` kept are returned, so a smaller ``n`` gives a prefix of a larger one.

Every pair names its clean prompt's slots (``PromptPair.roles``, token positions in the model's
tokenization of the clean prompt), so that pairs of different lengths can be aggregated by role
(:func:`adag.patching.scores.merge_pairs`):

- ``ioi``: ``IO`` (the indirect object's name), ``S1`` (the subject's first mention), ``S1+1``
  (the token after it), ``S2`` (the subject's second mention), ``END`` (the last token, " to");
- ``capitals``: ``COUNTRY`` (the country name's last token), ``END`` (the last token).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import string
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from adag.errors import AdagError
from adag.tasks.pairs import PromptPair

if TYPE_CHECKING:
    from adag.models.model import Model

log = logging.getLogger(__name__)

_BATCH = 32
"""Prompts per forward pass while filtering."""

# -- IOI -------------------------------------------------------------------------------------------

NAMES = (
    "Mary",
    "John",
    "Tom",
    "James",
    "Anna",
    "Sarah",
    "David",
    "Michael",
    "Emma",
    "Lisa",
    "Paul",
    "Mark",
    "Kate",
    "Peter",
    "Alice",
    "Bob",
    "Susan",
    "Robert",
    "Jane",
    "Daniel",
    "Laura",
    "Chris",
    "Steve",
    "Amy",
    "Rachel",
    "Jack",
    "Henry",
    "Emily",
    "George",
    "Linda",
    "Karen",
    "William",
    "Thomas",
    "Andrew",
    "Lucy",
    "Kevin",
    "Helen",
    "Ben",
)

# {0} {1} are the two names of the first clause, {2} the subject's second mention. Every slot
# follows a space, so a name is the same token there as on its own. Templates on which SmolLM2
# was near chance (e.g. "Friends A and B found a bone ...") were left out.
IOI_TEMPLATES = (
    "When {0} and {1} went to the store, {2} gave a drink to",
    "When {0} and {1} went to the park, {2} handed a ball to",
    "Then, {0} and {1} had a long argument. Afterwards, {2} said to",
    "After {0} and {1} went to the restaurant, {2} gave a ring to",
    "Then, {0} and {1} were working at the office. {2} decided to give a file to",
    "While {0} and {1} were at the house, {2} gave a letter to",
    "When {0} and {1} arrived at the school, {2} gave a book to",
    "Then, {0} and {1} went to the beach. {2} gave a towel to",
)

# -- capitals --------------------------------------------------------------------------------------

CAPITALS = (
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("Russia", "Moscow"),
    ("England", "London"),
    ("Egypt", "Cairo"),
    ("Greece", "Athens"),
    ("Portugal", "Lisbon"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Poland", "Warsaw"),
    ("Hungary", "Budapest"),
    ("Canada", "Ottawa"),
    ("Australia", "Canberra"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Cuba", "Havana"),
    ("Iran", "Tehran"),
    ("Iraq", "Baghdad"),
    ("Belgium", "Brussels"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Chile", "Santiago"),
    ("Syria", "Damascus"),
    ("Switzerland", "Bern"),
    ("the Netherlands", "Amsterdam"),
    ("Scotland", "Edinburgh"),
    ("Wales", "Cardiff"),
    ("Afghanistan", "Kabul"),
    ("South Korea", "Seoul"),
    ("the Philippines", "Manila"),
    ("Bulgaria", "Sofia"),
    ("Tunisia", "Tunis"),
    ("the Czech Republic", "Prague"),
)

# Possessive templates ("France's capital is") were tried and dropped: SmolLM2 gets a third of
# them right.
CAPITAL_TEMPLATES = (
    "The capital of {} is",
    "The capital city of {} is",
    "The capital of {} is called",
    "The capital of {} is the city of",
)


# -- helpers ---------------------------------------------------------------------------------------


def _check(model: Model, n: int, task: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise AdagError(f"task {task} needs n >= 1 pairs, got {n!r}")
    if model.tokenizer is None:
        raise AdagError(f"task {task} needs a model with a tokenizer; {model.name!r} has none")


def _single_tokens(model: Model, words: Sequence[str]) -> dict[str, int]:
    """The words that are one token with a leading space, mapped to that token's id."""
    out = {}
    for w in words:
        ids = model.tokenizer(" " + w, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            out[w] = int(ids[0])
    return out


def _n_tokens(model: Model, text: str) -> int:
    return len(model.tokenizer(text, add_special_tokens=True)["input_ids"])


def _fill(template: str, values: Sequence[str]) -> tuple[str, list[int]]:
    """``template.format(*values)`` and, for each of its replacement fields in order, the
    character index just past the value put there."""
    text, ends, auto = "", [], 0
    for literal, name, _, _ in string.Formatter().parse(template):
        text += literal
        if name is None:
            continue
        if name == "":
            name, auto = str(auto), auto + 1
        text += values[int(name)]
        ends.append(len(text))
    return text, ends


def _roles(model: Model, text: str, ends: Mapping[str, int]) -> dict[str, int] | None:
    """Role -> the position, in the model's tokenization of ``text``, of the token that ends at
    character ``ends[role]`` (the last token of the slot), plus ``END`` (the last token). None,
    with a warning, when a prefix of ``text`` does not tokenize as the start of ``text`` (then
    the slots have no token of their own)."""
    full = model.tokenizer(text, add_special_tokens=True)["input_ids"]
    out = {}
    for role, end in ends.items():
        pre = model.tokenizer(text[:end], add_special_tokens=True)["input_ids"]
        if not pre or list(full[: len(pre)]) != list(pre):
            log.warning(
                "prompt %r: the tokenizer of %r splits it differently after %r, so its "
                "slots are not named (roles None)",
                text,
                model.name,
                text[:end],
            )
            return None
        out[role] = len(pre) - 1
    out["END"] = len(full) - 1
    if len(set(out.values())) != len(out):
        log.warning("prompt %r: two slots share a token, so its slots are not named", text)
        return None
    return out


def _last_logits(model: Model, prompts: Sequence[str]) -> Tensor:
    """Next-token logits ``n_prompt d_vocab`` (float32, on the CPU), batching equal-length
    prompts."""
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(_n_tokens(model, p), []).append(i)
    out = torch.empty(len(prompts), model.d_vocab)
    with torch.no_grad():
        for idx in by_len.values():
            for s in range(0, len(idx), _BATCH):
                chunk = idx[s : s + _BATCH]
                logits = model(model.to_tokens([prompts[i] for i in chunk]))[:, -1]
                out[chunk] = logits.float().cpu()
    return out


def _none_found(task: str, model: Model, tried: int) -> AdagError:
    return AdagError(
        f"task {task}: the model {model.name!r} predicted the answer for none of {tried} "
        f"candidate prompts; use a stronger model or write prompt pairs in a JSONL file"
    )


# -- tasks -----------------------------------------------------------------------------------------


def ioi_names(model: Model) -> dict[str, int]:
    """The IOI names that are one token (with their leading space) for ``model``, with their ids;
    a one-line error when there are fewer than 5."""
    names = _single_tokens(model, NAMES)
    if len(names) < 5:
        raise AdagError(
            f"task ioi needs 5 single-token names, the tokenizer of {model.name!r} has "
            f"{len(names)}; write prompt pairs in a JSONL file instead"
        )
    return names


def ioi_candidates(names: Iterable[str], seed: int = 0) -> Iterator[PromptPair]:
    """Every IOI candidate pair over ``names`` (see :func:`ioi_names`), once each: (template,
    indirect object, subject, name order) in an order shuffled by ``seed``, with the ABC noise
    prompt drawn in candidate order (so candidate k's noise depends on ``seed`` and k only). The
    answer is the indirect object, the foil the subject, both with their leading space.
    :func:`max_pairs` counts them. The pairs carry no roles (those need the tokenizer;
    :func:`ioi` adds them)."""
    for pair, _, _ in _ioi_candidates(names, seed):
        yield pair


def _ioi_candidates(names: Iterable[str], seed: int) -> Iterator[tuple[PromptPair, int, bool]]:
    """:func:`ioi_candidates` with each pair's template index and name order (ABB: True)."""
    names = list(names)
    rng = random.Random(seed)
    space = [
        (t, io, s, abb)
        for t in range(len(IOI_TEMPLATES))
        for io in names
        for s in names
        if io != s
        for abb in (True, False)
    ]
    rng.shuffle(space)
    for t, io, s, abb in space:
        c, d, e = rng.sample([x for x in names if x not in (io, s)], 3)
        tpl = IOI_TEMPLATES[t]
        clean = tpl.format(io, s, s) if abb else tpl.format(s, io, s)
        yield PromptPair(clean, tpl.format(c, d, e), " " + io, " " + s), t, abb


def ioi_roles(model: Model, template: int, io: str, s: str, abb: bool) -> dict[str, int] | None:
    """The roles (module doc) of the clean IOI prompt of template ``IOI_TEMPLATES[template]``
    with indirect object ``io`` and subject ``s`` in order ABB (``abb``, "When IO and S ..., S
    ...") or BAB, as token positions of ``model``'s tokenization."""
    values = (io, s, s) if abb else (s, io, s)
    text, ends = _fill(IOI_TEMPLATES[template], values)
    slots = {"IO": ends[0 if abb else 1], "S1": ends[1 if abb else 0], "S2": ends[2]}
    roles = _roles(model, text, slots)
    if roles is None:
        return None
    out = {"IO": roles["IO"], "S1": roles["S1"], "S1+1": roles["S1"] + 1}
    out |= {"S2": roles["S2"], "END": roles["END"]}
    return out if len(set(out.values())) == len(out) else None


def ioi(model: Model, n: int = 20, *, seed: int = 0) -> list[PromptPair]:
    """Up to ``n`` indirect-object-identification pairs the model gets right (see module doc).

    Candidates come from :func:`ioi_candidates`; at most ``20 * n + 100`` of them are run
    through the model."""
    _check(model, n, "ioi")
    names = ioi_names(model)
    candidates = _ioi_candidates(names, seed)
    budget = min(max_pairs("ioi", model), 20 * n + 100)
    kept: list[PromptPair] = []
    i = 0
    while len(kept) < n and i < budget:
        size = min(_BATCH, budget - i, n - len(kept) + 4)  # acceptance is high: little waste
        cands: list[tuple[PromptPair, int, int, int, bool]] = []  # (pair, answer, foil, t, abb)
        for pair, t, abb in itertools.islice(candidates, size):
            if _n_tokens(model, pair.clean) == _n_tokens(model, pair.noise):
                cands.append((pair, names[pair.answer[1:]], names[str(pair.foil)[1:]], t, abb))
        i += size
        if not cands:
            continue
        last = _last_logits(model, [c[0].clean for c in cands])
        for (pair, a, f, t, abb), row in zip(cands, last, strict=True):
            if int(row.argmax()) == a and row[a] > row[f] and len(kept) < n:
                roles = ioi_roles(model, t, pair.answer[1:], str(pair.foil)[1:], abb)
                kept.append(dataclasses.replace(pair, roles=roles))
    if not kept:
        raise _none_found("ioi", model, i)
    return kept


def capitals(model: Model, n: int = 20, *, seed: int = 0) -> list[PromptPair]:
    """Up to ``n`` country-capital pairs the model gets right on both prompts (see module doc).

    Every (template, country) prompt is scored once; the pairs are then ordered in rounds — each
    clean prompt (in an order shuffled by ``seed``) takes its next noise partner — so the first
    pairs all have different clean prompts."""
    _check(model, n, "capitals")
    cap_id = _single_tokens(model, [cap for _, cap in CAPITALS])
    countries = [(c, cap) for c, cap in CAPITALS if cap in cap_id]
    prompts = [(t, c) for t in range(len(CAPITAL_TEMPLATES)) for c, _ in countries]
    texts = [CAPITAL_TEMPLATES[t].format(c) for t, c in prompts]
    roles: dict[int, dict[str, int] | None] = {}  # prompt index -> its roles, once each
    if not prompts:
        raise _none_found("capitals", model, 0)
    last = _last_logits(model, texts)
    capital_of = dict(countries)
    ids = torch.tensor([cap_id[capital_of[c]] for _, c in prompts])
    known = last.argmax(-1) == ids  # (n_prompt,)
    length = [_n_tokens(model, x) for x in texts]
    index = {key: k for k, key in enumerate(prompts)}

    partners: dict[int, list[int]] = {}
    for k, (t, c) in enumerate(prompts):
        if not known[k]:
            continue
        a = cap_id[capital_of[c]]
        ok = []
        for d, dcap in countries:
            j = index[(t, d)]
            f = cap_id[dcap]
            if (
                d != c
                and f != a
                and known[j]
                and length[j] == length[k]
                and last[k, a] > last[k, f]
            ):
                ok.append(j)
        if ok:
            partners[k] = ok
    if not partners:
        raise _none_found("capitals", model, len(prompts))

    rng = random.Random(seed)
    order = sorted(partners)
    rng.shuffle(order)
    for k in order:
        rng.shuffle(partners[k])
    kept: list[PromptPair] = []
    for r in range(max(len(v) for v in partners.values())):
        for k in order:
            if r < len(partners[k]) and len(kept) < n:
                j = partners[k][r]
                (t, c), d = prompts[k], prompts[j][1]
                if k not in roles:
                    roles[k] = capital_roles(model, t, c)
                kept.append(
                    PromptPair(
                        texts[k], texts[j], " " + capital_of[c], " " + capital_of[d], roles[k]
                    )
                )
    return kept


def capital_roles(model: Model, template: int, country: str) -> dict[str, int] | None:
    """The roles (module doc) of the prompt ``CAPITAL_TEMPLATES[template]`` about ``country``, as
    token positions of ``model``'s tokenization."""
    text, ends = _fill(CAPITAL_TEMPLATES[template], [country])
    return _roles(model, text, {"COUNTRY": ends[0]})


TASKS: dict[str, Callable[..., list[PromptPair]]] = {"ioi": ioi, "capitals": capitals}


def max_pairs(name: str, model: Model) -> int:
    """An upper bound on the pairs task ``name`` can make with ``model``'s tokenizer, from the
    tokenizer alone (no forward pass): ``ioi`` draws each pair from a distinct (template,
    indirect object, subject, name order), ``capitals`` from a distinct (template, country,
    other country)."""
    if name not in TASKS:
        raise AdagError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    _check(model, 1, name)
    if name == "ioi":
        k = len(_single_tokens(model, NAMES))
        return len(IOI_TEMPLATES) * k * (k - 1) * 2
    k = len(_single_tokens(model, [cap for _, cap in CAPITALS]))
    return len(CAPITAL_TEMPLATES) * k * (k - 1)


def make_task(name: str, model: Model, n: int, *, seed: int = 0) -> list[PromptPair]:
    """The built-in task ``name`` (one of :data:`TASKS`) with up to ``n`` pairs.

    ``n`` above :func:`max_pairs` is refused before any forward pass (the task would run through
    every candidate for minutes and still fall short); when the model answers fewer than ``n``
    candidates right, the pairs it made are returned and a warning says how many."""
    if name not in TASKS:
        raise AdagError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    _check(model, n, name)
    most = max_pairs(name, model)
    if n > most:
        raise AdagError(
            f"task {name} can make at most {most} pairs with the tokenizer of {model.name!r}, "
            f"not {n}; ask for fewer, or write prompt pairs in a JSONL file"
        )
    pairs = TASKS[name](model, n, seed=seed)
    if len(pairs) < n:
        log.warning(
            "task %s made only %d of the %d pairs asked for: the model %r got its other "
            "candidates wrong",
            name,
            len(pairs),
            n,
            model.name,
        )
    return pairs
