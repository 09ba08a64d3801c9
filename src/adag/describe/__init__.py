"""Descriptions of clusters: ADAG's explainer–simulator on both sides (Arora et al. 2026, §3.3;
the scoring of Bills et al. 2023).

Every cluster gets an **input** description (what makes it fire) and an **output** description
(what it promotes or suppresses), each scored by how well a simulator predicts the real profile
from the text alone, two baselines scored the same way, and a 1–3 word label.

- Input side. Each prompt where the cluster occurs is a record: its tokens and the cluster's
  summed input profile over them (:mod:`~adag.describe.records`). The records are split into
  training and held-out ones (per cluster, :func:`numpy.random.default_rng` seeded by
  ``(seed, cluster index)``; at least one held-out record when there are two or more; a single
  record is explained and scored on itself, which the row says). For each sign (positive, and
  negative = the sign-flipped records, skipped when no value has that sign) and each of
  ``n_samples`` samples, the explainer sees a random 10–20 of the top training records (by peak
  value) plus a few random ones, with tokens highlighted by the quantile walk
  (:func:`~adag.describe.records.highlight_threshold`), and answers with a phrase. The simulator
  then predicts 0..10 for every token of every held-out record (:meth:`LLM.score_lines`, one
  call per record; the expected value of its distribution, or the parsed integer); the score is
  Pearson's r over all those tokens (:mod:`~adag.describe.scoring`), negated for a negative
  explanation. The best-scoring candidate is kept; all are recorded.
- Output side. Each prompt's target tokens with the cluster's output profile rescaled to integers
  −10..10 by the cluster's max ``|value|``; one explanation sign (the integers carry it); the
  simulator predicts the integers of the held-out prompts (the same prompts as the input side).
- Baselines, scored on the same held-out records by the same simulator: ``shuffled`` (another
  cluster's best explanation of the same side: a seeded derangement of the clusters that have
  one, and a random one of them for each cluster that has none; none when no other cluster has
  one) and ``top_tokens`` (:func:`~adag.describe.records.top_tokens_text`, no
  LLM).
- Labels: 1–3 words from both best descriptions (one call per cluster). A cluster is
  ``inhibitory`` when the sum of its output profile over all prompts and targets is negative.

Sampling: sample 0 is asked greedily (temperature 0: the explainer's single best guess); the other
samples and every retry at ``temperature`` (default: the explainer's configured temperature).
Malformed answers are asked again with a new sample index (at most :data:`RETRIES` times), then
recorded as a failure with the reason (:func:`~adag.describe.prompts.parse_text` says what is
malformed; a simulator reply is malformed when more than half of its lines cannot be read —
fewer unreadable lines are left out of the score and counted in ``unreadable``). A call that fails
for good (``LLMError``) is a recorded failure too; nothing here raises for a bad answer, and no
failure becomes a zero. With deterministic answers (a cache, greedy decoding) the result is
deterministic for a fixed seed.

Where things live:

- ``llm``       the LLM protocol and clients (local, OpenAI-compatible, Anthropic), ``make_llm``
- ``cache``     the on-disk SQLite cache of LLM answers
- ``records``   activation records from the cluster-profile table, highlights, rescaling, display
- ``scoring``   expected values and Pearson's r
- ``prompts``   every prompt template (``PROMPT_VERSION``) and answer parsing; ``examples.json``
- ``judge``     the rubric judge for free-form behaviour and success rates
- this module   :func:`describe` / :func:`adescribe` and :class:`Descriptions`
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adag.describe.judge import ajudge, judge
from adag.describe.records import (
    SIDES,
    Record,
    cluster_records,
    flip,
    highlights,
    rescale,
    select,
    tail,
    top_tokens_text,
    window,
)
from adag.errors import AdagError
from adag.io import shown, write_text

if TYPE_CHECKING:
    import pyarrow as pa

    from adag.clusters import Clusters
    from adag.describe.llm import LLM
    from adag.graphs.graph import Graph

SIGNS = ("positive", "negative")
RETRIES = 2
"""times a malformed explanation, simulation or label is asked again"""
TOP_RECORDS = 5
"""records kept in a row for the report (largest peak first)"""
_SIDE_CODE = {"input": 0, "output": 1}
_SIGN_CODE = {"positive": 0, "negative": 1, None: 2}
_DERANGEMENT = 7_919  # a fixed stream id for the shuffled baseline's draw


# -- results -------------------------------------------------------------------------------------


@dataclass(eq=False)
class Descriptions:
    """The descriptions of a run: ``rows``, one dict per (cluster, side), in cluster then side
    order; each row is one line of ``descriptions.jsonl``:

    ==================  ===========================================================================
    key                 meaning
    ==================  ===========================================================================
    ``cluster``         the cluster's name (``"C0"``)
    ``side``            ``input`` | ``output``
    ``status``          ``ok`` (an explanation was scored) | ``failed``
    ``failure``         None, or why there is no scored explanation
    ``label``           the cluster's 1–3 word label (the same on both rows), or None
    ``label_failure``   None, or why there is no label
    ``inhibitory``      the cluster's output profile sums to a negative number
    ``explanation``     the best explanation (None when failed)
    ``sign``            its sign: ``positive`` | ``negative`` (input side); None on the output side
    ``score``           its score (Pearson r on the held-out records), None when failed
    ``candidates``      every candidate: ``explanation``, ``sign``, ``sample``, ``score``,
                        ``failure``, ``unreadable`` (held-out tokens the simulator left unread)
    ``baselines``       ``shuffled`` (``explanation``, ``sign``, ``from``, ``score``,
                        ``failure``, ``unreadable``; None when no other cluster has an
                        explanation of this side) and ``top_tokens`` (``explanation``,
                        ``score``, ``failure``, ``unreadable``); None when the side has no
                        records
    ``n_records``       prompts where the cluster occurs
    ``n_heldout``       of them held out for scoring; ``heldout``: their prompt ids
    ``note``            None, or what is unusual (a single record, a sign without values)
    ``top_records``     up to 5 records, largest peak first: ``prompt_id``, ``tokens``, ``values``
                        (input: the profile; output: the integers −10..10), ``highlight``
    ``explainer``       the explainer's name; ``simulator``: the simulator's
    ``prompt_version``  :data:`adag.describe.prompts.PROMPT_VERSION`
    ==================  ===========================================================================
    """

    rows: list[dict[str, Any]] = field(default_factory=list)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the rows as JSON lines, atomically."""
        lines = [json.dumps(r, ensure_ascii=False, allow_nan=False) for r in self.rows]
        return write_text(path, "".join(line + "\n" for line in lines))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Descriptions:
        """Read what :meth:`save` wrote; a one-line :class:`AdagError` for a missing or
        malformed file."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise AdagError(f"{shown(p)} does not exist; describe the clusters first") from None
        except (OSError, UnicodeDecodeError) as e:
            raise AdagError(f"cannot read {shown(p)} ({e})") from None
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise AdagError(f"{shown(p)} line {i} is not JSON ({e}); describe again") from None
            if not isinstance(row, dict) or "cluster" not in row or "side" not in row:
                raise AdagError(f"{shown(p)} line {i} is not a description row; describe again")
            rows.append(row)
        return cls(rows)

    def label(self, name: str) -> str | None:
        """The label of cluster ``name`` (None when it has none or is not described)."""
        for r in self.rows:
            if r.get("cluster") == name and r.get("label"):
                return str(r["label"])
        return None

    def table(self) -> pa.Table:
        """One row per (cluster, side): ``cluster``, ``side``, ``label``, ``inhibitory``,
        ``status``, ``score``, ``shuffled_score``, ``top_tokens_score`` (nulls where missing)."""
        import pyarrow as pa

        def base(r: dict[str, Any], kind: str) -> float | None:
            b = (r.get("baselines") or {}).get(kind) or {}
            return b.get("score")

        return pa.table(
            {
                "cluster": pa.array([r.get("cluster") for r in self.rows], pa.string()),
                "side": pa.array([r.get("side") for r in self.rows], pa.string()),
                "label": pa.array([r.get("label") for r in self.rows], pa.string()),
                "inhibitory": pa.array([r.get("inhibitory") for r in self.rows], pa.bool_()),
                "status": pa.array([r.get("status") for r in self.rows], pa.string()),
                "score": pa.array([r.get("score") for r in self.rows], pa.float64()),
                "shuffled_score": pa.array([base(r, "shuffled") for r in self.rows], pa.float64()),
                "top_tokens_score": pa.array(
                    [base(r, "top_tokens") for r in self.rows], pa.float64()
                ),
            }
        )

    def __len__(self) -> int:
        return len(self.rows)


# -- the algorithm -------------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    """One (cluster, side) being described."""

    cluster: str
    index: int
    side: str
    records: list[Record]
    """all of the side's records in prompt order (output side: integers −10..10)"""
    train: list[Record]
    test: list[Record]
    notes: list[str] = field(default_factory=list)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    failure: str | None = None
    baselines: dict[str, Any] | None = None


def _n_heldout(n: int, heldout: float) -> int:
    # round half up, at least one, and at least one record left to train on
    return min(n - 1, max(1, int(np.floor(heldout * n + 0.5))))


def _derangement(n: int, rng: np.random.Generator) -> list[int]:
    """A uniformly random permutation of ``range(n)`` without fixed points (n >= 2)."""
    while True:
        p = rng.permutation(n)
        if not np.any(p == np.arange(n)):
            return [int(x) for x in p]


def _donors(
    names: list[str], explained: set[str], rng: np.random.Generator
) -> dict[str, str | None]:
    """Whose explanation each cluster's shuffled baseline borrows: a derangement of the clusters
    with an explanation (each lends exactly one), and for each cluster without one a random
    cluster with one; None when no other cluster has an explanation."""
    have = [n for n in names if n in explained]
    out: dict[str, str | None] = dict.fromkeys(names)
    if len(have) >= 2:
        perm = _derangement(len(have), rng)
        out.update({name: have[perm[i]] for i, name in enumerate(have)})
    for name in names:
        if name not in explained and have:
            out[name] = have[int(rng.integers(len(have)))]
    return out


class _Describer:
    def __init__(
        self,
        *,
        llm: LLM,
        simulator: LLM,
        n_samples: int,
        min_highlights: int,
        temperature: float,
        seed: int,
    ) -> None:
        from adag.describe.llm import LLMError

        self.llm = llm
        self.sim = simulator
        self.n_samples = n_samples
        self.min_highlights = min_highlights
        self.temperature = temperature
        self.seed = seed
        self.LLMError = LLMError

    # -- the explainer -------------------------------------------------------------------------

    def explainer_prompt(self, job: _Job, sign: str | None, s: int) -> list[dict[str, str]]:
        from adag.describe import prompts as P

        rng = np.random.default_rng(
            (self.seed, job.index, _SIDE_CODE[job.side], _SIGN_CODE[sign], s)
        )
        train = [flip(r) for r in job.train] if sign == "negative" else job.train
        if job.side == "input":
            peak = [float(r.values.max()) for r in train]
        else:
            peak = [float(np.abs(r.values).max()) for r in train]
        shown_records = [train[i] for i in select(train, peak, rng)]
        if job.side == "input":
            shown_records = [window(r, P.RECORD_TOKENS) for r in shown_records]
            texts = [P.input_record_text(r.tokens, np.zeros(len(r.tokens))) for r in shown_records]
        else:
            texts = [P.output_record_text(r.tokens, r.values) for r in shown_records]
        # keep the prompt short: drop the last records beyond the character budget
        keep = P.within_budget(texts)
        shown_records = shown_records[:keep]
        if job.side == "input":
            masks = highlights([r.values for r in shown_records], self.min_highlights)
            texts = [
                P.input_record_text(r.tokens, m) for r, m in zip(shown_records, masks, strict=True)
            ]
        return P.explainer_messages(job.side, texts[:keep])

    async def explain(
        self, messages: list[dict[str, str]], s: int
    ) -> tuple[str | None, str | None]:
        """An explanation (or None and the reason). Call ``a`` of sample ``s`` uses the sample
        index ``s + a·n_samples``, so a retry never repeats another candidate's request."""
        from adag.describe.prompts import EXPLAINER_MAX_TOKENS, parse_explanation

        why: str | None = None
        for attempt in range(RETRIES + 1):
            index = s + attempt * self.n_samples
            try:
                text = await self.llm.complete(
                    messages,
                    temperature=0.0 if index == 0 else self.temperature,
                    max_tokens=EXPLAINER_MAX_TOKENS,
                    sample=index,
                )
            except self.LLMError as e:
                return None, f"explainer call failed: {e}"
            explanation, why = parse_explanation(text)
            if explanation is not None:
                return explanation, None
        return None, f"malformed explanation after {RETRIES + 1} tries: {why}"

    # -- the simulator -------------------------------------------------------------------------

    async def simulate(
        self, side: str, explanation: str, record: Record
    ) -> tuple[list[float | None] | None, np.ndarray, str | None]:
        """The simulated values of one record (None where a line was unreadable), the true values
        they are compared with, and a failure reason (then no values)."""
        from adag.describe.prompts import (
            SIMULATOR_TOKENS,
            simulator_candidates,
            simulator_messages,
        )
        from adag.describe.records import display
        from adag.describe.scoring import expected_value

        rec = tail(record, SIMULATOR_TOKENS) if side == "input" else record
        lines = [display(t) for t in rec.tokens]
        messages = simulator_messages(side, explanation, lines)
        candidates = simulator_candidates(side)
        why = ""
        for attempt in range(RETRIES + 1):
            try:
                dists = await self.sim.score_lines(messages, lines, candidates, sample=attempt)
            except self.LLMError as e:
                return None, rec.values, f"simulator call failed: {e}"
            if len(dists) != len(lines):
                why = f"{len(dists)} values for {len(lines)} tokens"
                continue
            values = [expected_value(d) for d in dists]
            bad = sum(v is None for v in values)
            if 2 * bad <= len(lines):
                return values, rec.values, None
            why = f"{bad} of {len(lines)} lines unreadable"
        return None, rec.values, f"malformed simulation after {RETRIES + 1} tries ({why})"

    async def score(self, job: _Job, explanation: str, sign: str | None) -> dict[str, Any]:
        """``score``, ``failure`` and ``unreadable`` of ``explanation`` on the held-out records."""
        from adag.describe.scoring import score

        sims = await asyncio.gather(*(self.simulate(job.side, explanation, r) for r in job.test))
        for values, _, failure in sims:
            if failure is not None or values is None:
                return {"score": None, "failure": failure, "unreadable": 0}
        predicted = [v for v, _, _ in sims if v is not None]
        r, why = score(predicted, [t for _, t, _ in sims], sign=sign)
        unreadable = sum(x is None for v in predicted for x in v)
        return {"score": r, "failure": why, "unreadable": unreadable}

    # -- one (cluster, side) ------------------------------------------------------------------

    async def candidate(self, job: _Job, sign: str | None, s: int) -> dict[str, Any]:
        out: dict[str, Any] = {"explanation": None, "sign": sign, "sample": s}
        text, failure = await self.explain(self.explainer_prompt(job, sign, s), s)
        if text is None:
            return {**out, "score": None, "failure": failure, "unreadable": 0}
        out["explanation"] = text
        return {**out, **(await self.score(job, text, sign))}

    async def describe(self, job: _Job) -> None:
        if job.failure is not None:
            return
        signs: list[str | None] = []
        if job.side == "input":
            for sign in SIGNS:
                has = any(
                    np.any((r.values if sign == "positive" else -r.values) > 0) for r in job.train
                )
                if has:
                    signs.append(sign)
                else:
                    job.notes.append(f"no {sign} input values: no {sign} explanations")
        else:
            signs.append(None)
        if not signs:
            job.failure = "every input value is zero: nothing to explain"
            return
        job.candidates = list(
            await asyncio.gather(
                *(self.candidate(job, sign, s) for sign in signs for s in range(self.n_samples))
            )
        )
        scored = [c for c in job.candidates if c["score"] is not None]
        if scored:
            job.best = max(scored, key=lambda c: c["score"])  # ties: the first
        else:
            first = next((c["failure"] for c in job.candidates if c["failure"]), "no reason")
            job.failure = f"no candidate could be scored ({first})"

    async def baselines(self, job: _Job, donor: _Job | None) -> None:
        if not job.test:
            return
        top = top_tokens_text(job.train, job.side)
        sign = "positive" if job.side == "input" else None
        result: dict[str, Any] = {
            "top_tokens": {"explanation": top, **(await self.score(job, top, sign))},
            "shuffled": None,
        }
        if donor is not None and donor.best is not None:
            text, sign = donor.best["explanation"], donor.best["sign"]
            result["shuffled"] = {
                "explanation": text,
                "sign": sign,
                "from": donor.cluster,
                **(await self.score(job, text, sign)),
            }
        job.baselines = result

    async def label(self, explanations: dict[str, str]) -> tuple[str | None, str | None]:
        from adag.describe.prompts import LABEL_MAX_TOKENS, label_messages, parse_label

        if not explanations:
            return None, "no description to label"
        messages = label_messages(explanations.get("input"), explanations.get("output"))
        why: str | None = None
        for attempt in range(RETRIES + 1):
            try:
                text = await self.llm.complete(
                    messages,
                    temperature=0.0 if attempt == 0 else self.temperature,
                    max_tokens=LABEL_MAX_TOKENS,
                    sample=attempt,
                )
            except self.LLMError as e:
                return None, f"label call failed: {e}"
            label, why = parse_label(text)
            if label is not None:
                return label, None
        return None, f"malformed label after {RETRIES + 1} tries: {why}"


def _top_records(job: _Job, min_highlights: int) -> list[dict[str, Any]]:
    """Up to :data:`TOP_RECORDS` records for the report, largest peak first (ties: prompt
    order). Input side: the peak and highlights of the best explanation's sign."""
    negative = job.best is not None and job.best["sign"] == "negative"
    if job.side == "input":
        vals = [-r.values if negative else r.values for r in job.records]
        peak = [float(v.max()) for v in vals]
    else:
        vals = [r.values for r in job.records]
        peak = [float(np.abs(v).max()) for v in vals]
    order = sorted(range(len(vals)), key=lambda i: (-peak[i], i))[:TOP_RECORDS]
    if job.side == "input":
        masks = highlights([vals[i] for i in order], min_highlights)
    else:
        masks = [vals[i] != 0 for i in order]
    out = []
    for i, m in zip(order, masks, strict=True):
        r = job.records[i]
        values = r.values.tolist() if job.side == "input" else [int(v) for v in r.values]
        out.append(
            {
                "prompt_id": r.prompt_id,
                "tokens": list(r.tokens),
                "values": values,
                "highlight": [bool(x) for x in m],
            }
        )
    return out


def _profile_table(
    clusters: Clusters, graphs: Any, prompt_ids: Sequence[str] | None
) -> tuple[Any, Sequence[str] | None]:
    """The cluster-profile table, and the prompt ids still to select in it."""
    if hasattr(graphs, "column_names") and "cluster" in graphs.column_names:
        return graphs, prompt_ids
    return clusters.profile(graphs, prompt_ids), None


def _check(
    clusters: Clusters,
    names: Sequence[str] | None,
    sides: Sequence[str],
    n_samples: int,
    min_highlights: int,
    heldout: float,
    seed: int,
) -> tuple[list[str], list[str]]:
    def whole(v: Any) -> bool:
        return isinstance(v, int | np.integer) and not isinstance(v, bool)

    if not whole(n_samples) or n_samples < 1:
        raise AdagError(f"n_samples must be a whole number of at least 1, got {n_samples!r}")
    if not whole(min_highlights) or min_highlights < 1:
        raise AdagError(
            f"min_highlights must be a whole number of at least 1, got {min_highlights!r}"
        )
    if isinstance(heldout, bool) or not isinstance(heldout, int | float) or not 0 < heldout < 1:
        raise AdagError(f"heldout must be a fraction between 0 and 1, got {heldout!r}")
    if not whole(seed) or seed < 0:
        raise AdagError(f"seed must be a whole number of at least 0, got {seed!r}")
    if isinstance(sides, str):
        sides = [sides]
    bad = [s for s in sides if s not in SIDES]
    if bad or not sides or len(set(sides)) != len(sides):
        raise AdagError(f"sides must be some of {', '.join(SIDES)}, each once; got {list(sides)}")
    wanted = clusters.names if names is None else [str(n) for n in names]
    unknown = [n for n in wanted if n not in clusters.names]
    if unknown:
        raise AdagError(f"no cluster {unknown[0]!r}; clusters are C0..C{clusters.n_clusters - 1}")
    if len(set(wanted)) != len(wanted):
        raise AdagError("names lists a cluster twice; name each once")
    if not wanted:
        raise AdagError("names is empty; name at least one cluster")
    return wanted, [s for s in SIDES if s in sides]


async def adescribe(
    clusters: Clusters,
    graphs: Sequence[Graph] | Any,
    *,
    llm: LLM,
    simulator: LLM | None = None,
    prompt_ids: Sequence[str] | None = None,
    n_samples: int = 5,
    min_highlights: int = 1,
    heldout: float = 0.3,
    sides: Sequence[str] = SIDES,
    names: Sequence[str] | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    temperature: float | None = None,
) -> Descriptions:
    """Describe clusters (see the module docstring); the async form of :func:`describe`.

    ``graphs``: the graphs the clusters were made from, a profile table of
    :func:`adag.profile`, or the cluster-profile table (:meth:`Clusters.profile`,
    ``RUN_DIR/cluster-profiles.parquet``). ``prompt_ids`` names the graphs' prompts, or selects
    and orders a table's. ``llm``: the explainer (and labeller); ``simulator``: default ``llm``.
    ``n_samples``: explanations per side and sign. ``min_highlights``: spans the quantile walk
    must reach. ``heldout``: the fraction of a cluster's prompts held out for scoring.
    ``names``: the clusters to describe (default all). ``progress(name)`` is called with
    ``"C0 input"`` etc. when a (cluster, side) is done. ``temperature``: of the samples after
    the first and of retries (default: ``llm.config.temperature`` when the client has one, else
    1.0). Calls run concurrently; the client limits how many are in flight.
    """
    wanted, side_list = _check(clusters, names, sides, n_samples, min_highlights, heldout, seed)
    if temperature is None:
        temperature = float(getattr(getattr(llm, "config", None), "temperature", 1.0))
    table, select_ids = _profile_table(clusters, graphs, prompt_ids)
    by_key = cluster_records(table, prompt_ids=select_ids)
    run = _Describer(
        llm=llm,
        simulator=simulator if simulator is not None else llm,
        n_samples=int(n_samples),
        min_highlights=int(min_highlights),
        temperature=temperature,
        seed=int(seed),
    )

    jobs: dict[tuple[str, str], _Job] = {}
    inhibitory: dict[str, bool] = {}
    for name in wanted:
        index = int(name[1:])
        raw = {side: by_key.get((name, side), []) for side in SIDES}
        inhibitory[name] = bool(sum(float(r.values.sum()) for r in raw["output"]) < 0)
        pids = list(dict.fromkeys(r.prompt_id for side in SIDES for r in raw[side]))
        rng = np.random.default_rng((int(seed), index))
        held: set[str] = set()
        if len(pids) >= 2:
            perm = rng.permutation(len(pids))[: _n_heldout(len(pids), heldout)]
            held = {pids[i] for i in perm.tolist()}
        for side in side_list:
            recs = raw[side] if side == "input" else rescale(raw[side])
            job = _Job(name, index, side, recs, [], [])
            if not recs:
                job.failure = f"{name} occurs in no prompt"
            elif len(recs) == 1:
                job.train = job.test = list(recs)
                job.notes.append("one record: explained and scored on the same prompt")
            else:
                job.train = [r for r in recs if r.prompt_id not in held]
                job.test = [r for r in recs if r.prompt_id in held]
                if not job.train or not job.test:  # one side lacks a prompt the other has
                    job.train = job.test = list(recs)
                    job.notes.append("explained and scored on the same prompts")
            jobs[(name, side)] = job

    await asyncio.gather(*(run.describe(job) for job in jobs.values()))

    donors = {
        side: _donors(
            wanted,
            {n for n in wanted if jobs[(n, side)].best is not None},
            np.random.default_rng((int(seed), _DERANGEMENT, _SIDE_CODE[side])),
        )
        for side in side_list
    }

    async def finish(job: _Job) -> None:
        donor = donors[job.side][job.cluster]
        await run.baselines(job, None if donor is None else jobs[(donor, job.side)])
        if progress is not None:
            progress(f"{job.cluster} {job.side}")

    await asyncio.gather(*(finish(job) for job in jobs.values()))

    async def label(name: str) -> tuple[str | None, str | None]:
        best = {
            side: job.best["explanation"]
            for side in side_list
            if (job := jobs[(name, side)]).best is not None
        }
        return await run.label(best)

    labels = dict(zip(wanted, await asyncio.gather(*(label(n) for n in wanted)), strict=True))

    from adag.describe.prompts import PROMPT_VERSION

    rows = []
    for (name, side), job in jobs.items():
        best = job.best
        rows.append(
            {
                "cluster": name,
                "side": side,
                "status": "ok" if best is not None else "failed",
                "failure": job.failure,
                "label": labels[name][0],
                "label_failure": labels[name][1],
                "inhibitory": inhibitory[name],
                "explanation": None if best is None else best["explanation"],
                "sign": None if best is None else best["sign"],
                "score": None if best is None else best["score"],
                "candidates": job.candidates,
                "baselines": job.baselines,
                "n_records": len(job.records),
                "n_heldout": len(job.test),
                "heldout": [r.prompt_id for r in job.test],
                "note": "; ".join(job.notes) or None,
                "top_records": _top_records(job, int(min_highlights)) if job.records else [],
                "explainer": llm.name,
                "simulator": run.sim.name,
                "prompt_version": PROMPT_VERSION,
            }
        )
    return Descriptions(rows)


def describe(
    clusters: Clusters,
    graphs: Sequence[Graph] | Any,
    *,
    llm: LLM,
    simulator: LLM | None = None,
    prompt_ids: Sequence[str] | None = None,
    n_samples: int = 5,
    min_highlights: int = 1,
    heldout: float = 0.3,
    sides: Sequence[str] = SIDES,
    names: Sequence[str] | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    temperature: float | None = None,
) -> Descriptions:
    """Describe each cluster's input and output side with an LLM explainer, score each
    explanation with a simulator on held-out prompts next to two baselines, and label the
    clusters (the module docstring has the algorithm; :class:`Descriptions` the result).

    The synchronous form of :func:`adescribe` (same arguments); from inside an event loop, await
    :func:`adescribe` instead. The caller owns ``llm`` and ``simulator`` (and closes them).
    """
    from adag.describe.judge import _no_running_loop

    _no_running_loop("describe", "adescribe")

    async def go() -> Descriptions:
        try:
            return await adescribe(
                clusters,
                graphs,
                llm=llm,
                simulator=simulator,
                prompt_ids=prompt_ids,
                n_samples=n_samples,
                min_highlights=min_highlights,
                heldout=heldout,
                sides=sides,
                names=names,
                seed=seed,
                progress=progress,
                temperature=temperature,
            )
        finally:  # a client's connections belong to this event loop: close them inside it
            await llm.aclose()
            if simulator is not None:
                await simulator.aclose()

    return asyncio.run(go())


# ``adag.describe`` is both this package and its verb (as ``adag.steer``): once the package is
# imported, the attribute ``adag.describe`` is the module, so the module is callable as
# :func:`describe`.
class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Descriptions:
        return describe(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["Descriptions", "adescribe", "ajudge", "describe", "judge"]
