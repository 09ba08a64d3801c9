"""Prompt datasets for tracing at dataset scale (ADAG, Arora et al. 2026, §4): lists of
:class:`~adag.tasks.prompts.PromptSpec` with the expected answer as ``label``, checked against the
model when asked for, and written as prompts JSONL (:func:`~adag.tasks.prompts.write_prompts`).

- ``capitals``: "The capital of France is" → " Paris", over a list of 137 countries (SmolLM2-135M
  answers 60 of them).
- ``capitals_2hop``: ADAG's two-hop form, "What is the capital of the state containing Chicago?"
  → " Springfield", for US cities that are not themselves a state capital (so copying the city
  never answers). These prompts are meant for the chat template (``adag trace --chat``): they
  carry the seed ``"Answer:"``, which opens the assistant turn, and are checked that way. Small
  models repeat the city instead (SmolLM2-135M answers none).
- ``math``: "What is 23 + 45?" with seed ``"Answer:"`` (raw form ``"What is 23 + 45? Answer:"``),
  1 <= X, Y <= 99; the target is the answer's first token.
- ``antonyms``: 'The opposite of "hot" is "' → "cold", in English, French, Spanish and German,
  each with three in-language examples before the question (zero-shot, SmolLM2-135M copies the
  word in every language but English).
- ``ioi``: the clean prompts of the built-in IOI task (:func:`adag.tasks.builtin.ioi_candidates`)
  with the indirect object as label (" Mary").

``label`` is the expected continuation exactly as it follows the assembled prompt (prompt, then
the seed), so its first token is the traced target: " Paris" after "is", "cold" after an opening
quote. Where the tokenizer splits the leading space of the answer off as a token of its own
(SmolLM2 writes " 68" as " ", "6", "8"), that first token would be a bare space, the same for
every prompt; the space then moves into the seed (``"Answer: "``, label ``"68"``) so that the
traced position predicts the answer's first real token.

With ``check``, a prompt is kept only when the model's top next token after the assembled prompt
(:func:`adag.graphs.trace.assemble_prompt`, with the chat template for ``capitals_2hop``) is the
label's first token. Candidates are tried in an order shuffled by ``seed``; the first ``n`` kept
are returned, so a smaller ``n`` gives a prefix of a larger one.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from adag.errors import AdagError
from adag.tasks.builtin import CAPITALS, ioi_candidates, ioi_names, max_pairs
from adag.tasks.prompts import PromptSpec, write_prompts

if TYPE_CHECKING:
    from adag.models.model import Model

log = logging.getLogger(__name__)

DATASETS = ("capitals", "capitals_2hop", "math", "antonyms", "ioi")

CHAT_DATASETS = frozenset({"capitals_2hop"})
"""Datasets whose prompts are meant for the chat template (``trace --chat``); they are checked
with it."""

DEFAULT_N = {"math": 100, "ioi": 100}
"""``n`` when none is given for the datasets generated from thousands of combinations; the
others return every prompt they keep."""

_BATCH = 32
"""Prompts per forward pass while checking."""

# -- capitals --------------------------------------------------------------------------------------

# The 39 countries of the built-in capitals task, then more. A multi-token capital is fine: the
# target is its first token.
COUNTRIES = (
    *CAPITALS,
    ("the United Kingdom", "London"),
    ("the United States", "Washington"),
    ("India", "New Delhi"),
    ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("Indonesia", "Jakarta"),
    ("Malaysia", "Kuala Lumpur"),
    ("Singapore", "Singapore"),
    ("Mexico", "Mexico City"),
    ("Argentina", "Buenos Aires"),
    ("Brazil", "Brasília"),
    ("Colombia", "Bogotá"),
    ("Venezuela", "Caracas"),
    ("Ecuador", "Quito"),
    ("Bolivia", "La Paz"),
    ("Uruguay", "Montevideo"),
    ("Paraguay", "Asunción"),
    ("Turkey", "Ankara"),
    ("Saudi Arabia", "Riyadh"),
    ("Israel", "Jerusalem"),
    ("Jordan", "Amman"),
    ("Lebanon", "Beirut"),
    ("Qatar", "Doha"),
    ("Kuwait", "Kuwait City"),
    ("Oman", "Muscat"),
    ("Yemen", "Sanaa"),
    ("Nigeria", "Abuja"),
    ("Ghana", "Accra"),
    ("Ethiopia", "Addis Ababa"),
    ("Morocco", "Rabat"),
    ("Algeria", "Algiers"),
    ("Libya", "Tripoli"),
    ("Sudan", "Khartoum"),
    ("Senegal", "Dakar"),
    ("Uganda", "Kampala"),
    ("Tanzania", "Dodoma"),
    ("Zimbabwe", "Harare"),
    ("Zambia", "Lusaka"),
    ("Angola", "Luanda"),
    ("South Africa", "Pretoria"),
    ("Romania", "Bucharest"),
    ("Ukraine", "Kyiv"),
    ("Belarus", "Minsk"),
    ("Serbia", "Belgrade"),
    ("Croatia", "Zagreb"),
    ("Slovenia", "Ljubljana"),
    ("Slovakia", "Bratislava"),
    ("Lithuania", "Vilnius"),
    ("Latvia", "Riga"),
    ("Estonia", "Tallinn"),
    ("Iceland", "Reykjavik"),
    ("Albania", "Tirana"),
    ("Georgia", "Tbilisi"),
    ("Armenia", "Yerevan"),
    ("Azerbaijan", "Baku"),
    ("Kazakhstan", "Astana"),
    ("Uzbekistan", "Tashkent"),
    ("Mongolia", "Ulaanbaatar"),
    ("Nepal", "Kathmandu"),
    ("Sri Lanka", "Colombo"),
    ("Myanmar", "Naypyidaw"),
    ("Cambodia", "Phnom Penh"),
    ("Laos", "Vientiane"),
    ("North Korea", "Pyongyang"),
    ("Taiwan", "Taipei"),
    ("New Zealand", "Wellington"),
    ("Jamaica", "Kingston"),
    ("Haiti", "Port-au-Prince"),
    ("Panama", "Panama City"),
    ("Costa Rica", "San José"),
    ("Nicaragua", "Managua"),
    ("Honduras", "Tegucigalpa"),
    ("Guatemala", "Guatemala City"),
    ("Luxembourg", "Luxembourg"),
    ("Monaco", "Monaco"),
    ("Malta", "Valletta"),
    ("Cyprus", "Nicosia"),
    ("Moldova", "Chișinău"),
    ("Madagascar", "Antananarivo"),
    ("Rwanda", "Kigali"),
    ("Somalia", "Mogadishu"),
    ("Mali", "Bamako"),
    ("Niger", "Niamey"),
    ("Cameroon", "Yaoundé"),
    ("the Dominican Republic", "Santo Domingo"),
    ("Bahrain", "Manama"),
    ("the United Arab Emirates", "Abu Dhabi"),
    ("Kyrgyzstan", "Bishkek"),
    ("Tajikistan", "Dushanbe"),
    ("Bosnia and Herzegovina", "Sarajevo"),
    ("North Macedonia", "Skopje"),
    ("Montenegro", "Podgorica"),
    ("Namibia", "Windhoek"),
    ("Botswana", "Gaborone"),
    ("Mozambique", "Maputo"),
    ("Fiji", "Suva"),
)

# US cities that are not a state capital (a capital city would be answered by copying it), each
# with the capital of its state. A city's state is named where the city's name is ambiguous.
CITIES = (
    ("Chicago", "Springfield"),
    ("Los Angeles", "Sacramento"),
    ("San Francisco", "Sacramento"),
    ("San Diego", "Sacramento"),
    ("Fresno", "Sacramento"),
    ("Oakland", "Sacramento"),
    ("Houston", "Austin"),
    ("Dallas", "Austin"),
    ("San Antonio", "Austin"),
    ("El Paso", "Austin"),
    ("Fort Worth", "Austin"),
    ("Miami", "Tallahassee"),
    ("Orlando", "Tallahassee"),
    ("Tampa", "Tallahassee"),
    ("Jacksonville", "Tallahassee"),
    ("New York City", "Albany"),
    ("Buffalo", "Albany"),
    ("Syracuse", "Albany"),
    ("Philadelphia", "Harrisburg"),
    ("Pittsburgh", "Harrisburg"),
    ("Scranton", "Harrisburg"),
    ("Seattle", "Olympia"),
    ("Spokane", "Olympia"),
    ("Tacoma", "Olympia"),
    ("Portland, Oregon", "Salem"),
    ("Eugene", "Salem"),
    ("Las Vegas", "Carson City"),
    ("Reno", "Carson City"),
    ("Detroit", "Lansing"),
    ("Ann Arbor", "Lansing"),
    ("Cleveland", "Columbus"),
    ("Cincinnati", "Columbus"),
    ("Toledo", "Columbus"),
    ("New Orleans", "Baton Rouge"),
    ("Shreveport", "Baton Rouge"),
    ("Baltimore", "Annapolis"),
    ("St. Louis", "Jefferson City"),
    ("Milwaukee", "Madison"),
    ("Green Bay", "Madison"),
    ("Minneapolis", "St. Paul"),
    ("Duluth", "St. Paul"),
    ("Louisville", "Frankfort"),
    ("Memphis", "Nashville"),
    ("Knoxville", "Nashville"),
    ("Birmingham, Alabama", "Montgomery"),
    ("Huntsville, Alabama", "Montgomery"),
    ("Newark", "Trenton"),
    ("Charlotte", "Raleigh"),
    ("Savannah", "Atlanta"),
    ("Anchorage", "Juneau"),
    ("Burlington, Vermont", "Montpelier"),
    ("Omaha", "Lincoln"),
    ("Wichita", "Topeka"),
    ("Tucson", "Phoenix"),
    ("Albuquerque", "Santa Fe"),
    ("Fargo", "Bismarck"),
    ("Sioux Falls", "Pierre"),
    ("Billings", "Helena"),
    ("Manchester, New Hampshire", "Concord"),
    ("Portland, Maine", "Augusta"),
    ("Wilmington, Delaware", "Dover"),
    ("Charleston, South Carolina", "Columbia"),
    ("Virginia Beach", "Richmond"),
    ("Bridgeport", "Hartford"),
    ("Tulsa", "Oklahoma City"),
    ("Provo", "Salt Lake City"),
    ("Fort Wayne", "Indianapolis"),
    ("Worcester", "Boston"),
    ("Colorado Springs", "Denver"),
    ("Cedar Rapids", "Des Moines"),
)

TWO_HOP_TEMPLATE = "What is the capital of the state containing {}?"
SEED = "Answer:"
"""The seed response of ``capitals_2hop`` and ``math`` (ADAG's)."""

# -- antonyms --------------------------------------------------------------------------------------

# Per language: the template's words, three worked examples, then the questions (none of them
# in the examples).
_Pairs = tuple[tuple[str, str], ...]
ANTONYMS: dict[str, tuple[tuple[str, str], _Pairs, _Pairs]] = {
    "English": (
        ("The opposite of", "is"),
        (("big", "small"), ("up", "down"), ("good", "bad")),
        (
            ("hot", "cold"),
            ("fast", "slow"),
            ("happy", "sad"),
            ("old", "new"),
            ("rich", "poor"),
            ("light", "dark"),
            ("open", "closed"),
            ("high", "low"),
            ("strong", "weak"),
            ("early", "late"),
            ("full", "empty"),
            ("hard", "soft"),
            ("long", "short"),
            ("left", "right"),
            ("wet", "dry"),
            ("thick", "thin"),
            ("true", "false"),
            ("love", "hate"),
            ("win", "lose"),
            ("black", "white"),
            ("day", "night"),
            ("in", "out"),
            ("yes", "no"),
            ("clean", "dirty"),
            ("heavy", "light"),
            ("cheap", "expensive"),
            ("young", "old"),
            ("begin", "end"),
            ("inside", "outside"),
            ("buy", "sell"),
            ("push", "pull"),
            ("always", "never"),
            ("before", "after"),
            ("friend", "enemy"),
            ("near", "far"),
            ("question", "answer"),
        ),
    ),
    "French": (
        ("Le contraire de", "est"),
        (("grand", "petit"), ("haut", "bas"), ("bon", "mauvais")),
        (
            ("chaud", "froid"),
            ("rapide", "lent"),
            ("heureux", "triste"),
            ("riche", "pauvre"),
            ("jour", "nuit"),
            ("noir", "blanc"),
            ("vrai", "faux"),
            ("fort", "faible"),
            ("plein", "vide"),
            ("long", "court"),
            ("jeune", "vieux"),
            ("ouvert", "fermé"),
            ("gauche", "droite"),
            ("facile", "difficile"),
            ("propre", "sale"),
            ("lourd", "léger"),
            ("beau", "laid"),
            ("gagner", "perdre"),
            ("acheter", "vendre"),
            ("toujours", "jamais"),
            ("avant", "après"),
            ("oui", "non"),
            ("entrer", "sortir"),
            ("aimer", "détester"),
            ("début", "fin"),
        ),
    ),
    "Spanish": (
        ("Lo contrario de", "es"),
        (("grande", "pequeño"), ("alto", "bajo"), ("bueno", "malo")),
        (
            ("caliente", "frío"),
            ("rápido", "lento"),
            ("feliz", "triste"),
            ("rico", "pobre"),
            ("día", "noche"),
            ("negro", "blanco"),
            ("verdadero", "falso"),
            ("fuerte", "débil"),
            ("lleno", "vacío"),
            ("largo", "corto"),
            ("joven", "viejo"),
            ("abierto", "cerrado"),
            ("izquierda", "derecha"),
            ("fácil", "difícil"),
            ("limpio", "sucio"),
            ("pesado", "ligero"),
            ("ganar", "perder"),
            ("comprar", "vender"),
            ("siempre", "nunca"),
            ("antes", "después"),
            ("sí", "no"),
            ("amor", "odio"),
            ("entrada", "salida"),
            ("mucho", "poco"),
            ("primero", "último"),
        ),
    ),
    "German": (
        ("Das Gegenteil von", "ist"),
        (("groß", "klein"), ("oben", "unten"), ("gut", "schlecht")),
        (
            ("heiß", "kalt"),
            ("schnell", "langsam"),
            ("glücklich", "traurig"),
            ("reich", "arm"),
            ("Tag", "Nacht"),
            ("schwarz", "weiß"),
            ("wahr", "falsch"),
            ("stark", "schwach"),
            ("voll", "leer"),
            ("lang", "kurz"),
            ("jung", "alt"),
            ("offen", "geschlossen"),
            ("links", "rechts"),
            ("leicht", "schwer"),
            ("sauber", "schmutzig"),
            ("hell", "dunkel"),
            ("gewinnen", "verlieren"),
            ("kaufen", "verkaufen"),
            ("immer", "nie"),
            ("vor", "nach"),
            ("ja", "nein"),
            ("Liebe", "Hass"),
            ("Anfang", "Ende"),
            ("viel", "wenig"),
            ("früh", "spät"),
            ("neu", "alt"),
        ),
    ),
}


def antonym_prompt(language: str, word: str) -> str:
    """'The opposite of "big" is "small". ... The opposite of "hot" is "' (in ``language``): the
    answer follows the opening quote, without a space."""
    (head, verb), examples, _ = ANTONYMS[language]
    shots = " ".join(f'{head} "{a}" {verb} "{b}".' for a, b in examples)
    return f'{shots} {head} "{word}" {verb} "'


# -- candidates ------------------------------------------------------------------------------------


def _candidates(name: str, model: Model, seed: int) -> tuple[int, Iterator[PromptSpec]]:
    """How many candidates dataset ``name`` has for ``model``'s tokenizer, and the candidates in
    the order ``seed`` gives (lazily: math and IOI have thousands)."""
    rng = random.Random(seed)
    specs: list[PromptSpec]
    if name == "capitals":
        specs = [PromptSpec(f"The capital of {c} is", label=" " + cap) for c, cap in COUNTRIES]
    elif name == "capitals_2hop":
        specs = [PromptSpec(TWO_HOP_TEMPLATE.format(city), SEED, " " + cap) for city, cap in CITIES]
    elif name == "antonyms":
        specs = [
            PromptSpec(antonym_prompt(lang, w), label=a)
            for lang, (_, _, words) in ANTONYMS.items()
            for w, a in words
        ]
    elif name == "math":
        sums = [(x, y) for x in range(1, 100) for y in range(1, 100)]
        rng.shuffle(sums)
        return len(sums), (PromptSpec(f"What is {x} + {y}?", SEED, f" {x + y}") for x, y in sums)
    else:  # ioi
        pairs = ioi_candidates(ioi_names(model), seed)
        return max_pairs("ioi", model), (PromptSpec(p.clean, label=p.answer) for p in pairs)
    rng.shuffle(specs)
    return len(specs), iter(specs)


@dataclass(frozen=True)
class _Assembled:
    spec: PromptSpec
    ids: list[int]
    """The assembled prompt's token ids (what the model reads)."""
    target: int
    """The label's first token id in context."""


def _assemble(model: Model, spec: PromptSpec, chat: bool) -> _Assembled | None:
    """``spec`` with its assembled ids and the id of the label's first token after them; a
    leading whitespace token of the label moves into the seed (see module doc). None when the
    label does not start at a token boundary (the tokenizer merges it with the prompt's end)."""
    # graphs.trace holds the one prompt assembly the tracer uses; imported here, at call time,
    # because tasks/ sits above graphs/ in the layers.
    from adag.tasks.prompts import assemble_prompt

    label = spec.label or ""
    text, ids = assemble_prompt(model, spec.prompt, chat=chat, seed=spec.seed)
    full = _encode(model, text + label, chat)
    if full[: len(ids)] != ids or len(full) == len(ids):
        return None
    piece = model.tok().decode([full[len(ids)]])
    rest = label[len(piece) :]
    if piece and not piece.strip() and label.startswith(piece) and rest.strip():
        if spec.seed is not None:
            moved = replace(spec, seed=spec.seed + piece, label=rest)
        else:
            moved = replace(spec, prompt=spec.prompt + piece, label=rest)
        return _assemble(model, moved, chat)
    return _Assembled(spec, ids, full[len(ids)])


def _encode(model: Model, text: str, chat: bool) -> list[int]:
    """Token ids of ``text`` as :func:`adag.graphs.trace.assemble_prompt` makes them (the chat
    template holds its own special tokens)."""
    return list(model.tok()(text, add_special_tokens=not chat)["input_ids"])


def _top1(model: Model, rows: Sequence[list[int]]) -> list[int]:
    """The model's top next token after each row of ids.

    Rows of different lengths share a forward pass, right-padded: attention is causal, so no
    real position sees the padding, and each row's logits are read at its own last position.
    Rows are sorted by length so that little is padded; a pass holds at most :data:`_BATCH`
    rows and about 2**26 logits."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    most = max(1, 2**26 // model.d_vocab)  # tokens a pass may unembed
    out = [0] * len(rows)
    with torch.no_grad():
        s = 0
        while s < len(order):
            e = s + 1
            while e < len(order) and e - s < _BATCH and (e + 1 - s) * len(rows[order[e]]) <= most:
                e += 1
            chunk = order[s:e]
            width = len(rows[chunk[-1]])
            tokens = torch.zeros(len(chunk), width, dtype=torch.long)  # (B, T), right-padded
            for r, i in enumerate(chunk):
                tokens[r, : len(rows[i])] = torch.tensor(rows[i])
            last = torch.tensor([len(rows[i]) - 1 for i in chunk])
            logits = model(tokens.to(model.device))  # (B, T, d_vocab)
            top = logits[torch.arange(len(chunk)), last.to(logits.device)].argmax(-1).tolist()
            for i, t in zip(chunk, top, strict=True):
                out[i] = int(t)
            s = e
    return out


# -- the front door --------------------------------------------------------------------------------


class Dataset(list[PromptSpec]):
    """The prompts :func:`make_dataset` made (a plain list of :class:`PromptSpec`), with how they
    were made."""

    def __init__(
        self, specs: Sequence[PromptSpec], *, name: str, tried: int, checked: bool
    ) -> None:
        super().__init__(specs)
        self.name = name
        self.tried = tried
        """How many candidates were assembled (and, when ``checked``, run through the model)."""
        self.checked = checked
        """Whether only prompts the model answers right were kept."""
        self.chat = name in CHAT_DATASETS
        """Whether the prompts are meant for the chat template (``trace --chat``)."""


def max_prompts(name: str, model: Model) -> int:
    """How many candidate prompts dataset ``name`` has with ``model``'s tokenizer (an upper bound
    on what :func:`make_dataset` returns; no forward pass)."""
    _check_name(name)
    return _candidates(name, model, 0)[0]


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise AdagError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def make_dataset(
    name: str, model: Model, n: int | None = None, *, seed: int = 0, check: bool = True
) -> Dataset:
    """Up to ``n`` prompts of dataset ``name`` (one of :data:`DATASETS`, see the module doc) with
    the expected answer as ``label``.

    ``n=None``: every prompt of the datasets made from a list (capitals, capitals_2hop,
    antonyms), :data:`DEFAULT_N` of the generated ones (math, ioi). ``check``: keep only the
    prompts whose top next token is the label's first token; at most ``20 * n + 100``
    candidates are tried. An ``n`` above :func:`max_prompts` is refused before any forward pass;
    a model that gets none right is a one-line error, one that gets fewer than ``n`` right
    returns those with a warning. ``capitals_2hop`` is checked with the chat template and is
    meant for ``trace --chat``."""
    _check_name(name)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise AdagError(f"dataset {name} needs n >= 1 prompts, got {n!r}")
    model.tok()  # a model without a tokenizer fails here, in one line
    total, candidates = _candidates(name, model, seed)
    if n is not None and n > total:
        raise AdagError(
            f"dataset {name} can make at most {total} prompts with the tokenizer of "
            f"{model.name!r}, not {n}; ask for fewer"
        )
    want = n if n is not None else min(total, DEFAULT_N.get(name, total))
    chat = name in CHAT_DATASETS
    budget = min(total, 20 * want + 100) if check else total
    kept: list[PromptSpec] = []
    tried = 0
    while len(kept) < want and tried < budget:
        missing = want - len(kept)
        # a checked round tries twice what is missing (SmolLM2 answers a third to all of them)
        taken = _take(candidates, min(budget - tried, max(8, 2 * missing) if check else missing))
        if not taken:
            break
        tried += len(taken)
        batch = [a for a in (_assemble(model, spec, chat) for spec in taken) if a is not None]
        if check:
            top = _top1(model, [a.ids for a in batch])
            batch = [a for a, t in zip(batch, top, strict=True) if t == a.target]
        kept += [a.spec for a in batch]
    kept = kept[:want]
    if not kept:
        raise AdagError(
            f"dataset {name}: the model {model.name!r} answered none of {tried} candidate "
            f"prompts right; use a stronger model, or keep them unchecked (--no-check)"
        )
    if n is not None and len(kept) < n:
        log.warning(
            "dataset %s made only %d of the %d prompts asked for: the model %r got its other "
            "candidates wrong",
            name,
            len(kept),
            n,
            model.name,
        )
    return Dataset(kept, name=name, tried=tried, checked=check)


def _take(it: Iterator[PromptSpec], k: int) -> list[PromptSpec]:
    out = []
    for spec in it:
        out.append(spec)
        if len(out) == k:
            break
    return out


__all__ = [
    "CHAT_DATASETS",
    "DATASETS",
    "DEFAULT_N",
    "Dataset",
    "antonym_prompt",
    "make_dataset",
    "max_prompts",
    "write_prompts",
]
