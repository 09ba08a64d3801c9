"""Descriptions: records, highlights, rescaling, scoring, the judge and describe() end to end.

The end-to-end tests drive :func:`adag.describe.describe` with :class:`ScriptedLLM`, an
in-process implementation of adag's own LLM protocol (``adag.describe.llm.LLM``) whose answers
depend only on the request, so concurrency cannot change them.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from adag.clusters import PROFILE_COLUMNS, Clusters
from adag.describe import Descriptions, describe, judge, prompts, records, scoring
from adag.describe.judge import ajudge, parse_answer, rate, wilson
from adag.describe.llm import LLMError
from adag.describe.records import Record
from adag.errors import AdagError

# -- records -------------------------------------------------------------------------------------


def test_display_keeps_one_token_per_line():
    assert records.display("a\nb") == "a↵b"
    assert records.display("\r\n") == "↵"
    assert records.display("\tx") == "⇥x"
    assert records.display("a\x00b") == "a\\x00b"
    assert records.display(" Paris") == " Paris"


def test_count_spans():
    T, F = True, False
    assert records.count_spans([np.array([T, T, F, T]), np.array([F, F]), np.array([T])]) == 3
    assert records.count_spans([np.array([F, T, T, T])]) == 1
    # consecutive across two records are two spans
    assert records.count_spans([np.array([T]), np.array([T])]) == 2
    assert records.count_spans([np.array([], dtype=bool)]) == 0


def _interleaved() -> np.ndarray:
    # 1, 0, 2, 0, ..., 100, 0: every positive value is its own span
    v = np.zeros(200)
    v[::2] = np.arange(1, 101)
    return v


@pytest.mark.parametrize(
    ("min_highlights", "threshold", "spans"),
    [
        # P = 1..100; numpy's linear percentile q sits at 1 + 99·q/100
        (1, 99.901, 1),  # 99.9th: only 100
        (2, 98.02, 2),  # 99.5th (99.505) and 99th (99.01) give one span; 98th: 99, 100
        (3, 95.05, 5),  # 95th: 96..100
        (6, 90.1, 10),
        (11, 80.2, 20),
        (21, 50.5, 50),  # the walk ends: the 50th percentile fallback
        (60, 50.5, 50),  # the fallback even though it has fewer spans than asked
    ],
)
def test_quantile_walk(min_highlights, threshold, spans):
    v = _interleaved()
    t = records.highlight_threshold([v], min_highlights)
    assert t == pytest.approx(threshold)
    masks = records.highlights([v], min_highlights)
    assert records.count_spans(masks) == spans
    assert np.all(v[masks[0]] >= t) and not np.any(v[~masks[0]] >= t)


def test_quantile_walk_over_several_records_and_signs():
    a, b = np.array([0.0, 1.0, 2.0, 10.0]), np.array([-3.0, 5.0, 5.0])
    # P = 1, 2, 5, 5, 10: the 99.9th percentile 9.98 marks 10 only
    assert [m.tolist() for m in records.highlights([a, b])] == [
        [False, False, False, True],
        [False, False, False],
    ]
    # two spans need the 50th percentile (5): 10 in a, the run 5, 5 in b
    assert records.highlight_threshold([a, b], 2) == 5.0
    assert [m.tolist() for m in records.highlights([a, b], 2)] == [
        [False, False, False, True],
        [False, True, True],
    ]
    # the sign-flipped records: only -3 becomes positive
    flipped = [records.flip(Record("p", ("x",) * len(v), v)).values for v in (a, b)]
    assert [m.tolist() for m in records.highlights(flipped)] == [
        [False, False, False, False],
        [True, False, False],
    ]
    # nothing positive: nothing highlighted
    assert records.highlight_threshold([np.array([0.0, -1.0])]) == math.inf
    assert not records.highlights([np.array([0.0, -1.0])])[0].any()


def test_rescale_to_integers():
    recs = [
        Record("a", tuple("abcde"), np.array([2.0, -1.0, 0.25, -0.25, 0.1])),
        Record("b", ("x", "y"), np.array([0.3, -0.1])),
    ]
    out = records.rescale(recs)
    # m = 2: 10·v/2 = 10, -5, 1.25, -1.25, 0.5 | 1.5, -0.5; halves away from zero
    assert out[0].values.tolist() == [10, -5, 1, -1, 1]
    assert out[1].values.tolist() == [2, -1]
    zeros = records.rescale([Record("z", ("x", "y"), np.zeros(2))])
    assert zeros[0].values.tolist() == [0, 0]
    assert records.round_half_away(np.array([2.5, -2.5, 0.49, -0.5])).tolist() == [3, -3, 0, -1]


def test_window_and_select():
    rec = Record("p", tuple(str(i) for i in range(100)), np.eye(100)[70])
    w = records.window(rec, 32)
    assert len(w.tokens) == 32 and w.tokens.index("70") == 24  # 3/4 of the window before the peak
    assert records.window(Record("q", ("a",), np.ones(1)), 32).tokens == ("a",)
    recs = [Record(str(i), ("t",), np.array([float(i)])) for i in range(40)]
    peak = [float(i) for i in range(40)]
    for seed in range(20):
        chosen = records.select(recs, peak, np.random.default_rng(seed))
        # 10..20 of the top 20 (39..20), largest first, then 3 random others in index order
        top, rest = chosen[:-3], chosen[-3:]
        assert 10 <= len(top) <= 20 and min(top) >= 20 and top == sorted(top, reverse=True)
        assert rest == sorted(rest) and not set(rest) & set(top)
        assert chosen == records.select(recs, peak, np.random.default_rng(seed))
    few = records.select(recs[:4], peak[:4], np.random.default_rng(0))
    assert few == [3, 2, 1, 0]  # all of a small pool, nothing left to draw at random


def test_cluster_records_from_the_profile_table():
    rows = [
        # cluster, prompt, side, position, target, token, value
        ("C1", "p1", "input", 1, -1, " b", 0.5),
        ("C1", "p1", "input", 0, -1, "a", 0.25),
        ("C0", "p1", "output", -1, 9, " Z", 0.1),
        ("C0", "p1", "output", -1, 3, " Y", float("nan")),
        ("C0", "p0", "input", 0, -1, "x", 1.0),
    ]
    table = pa.table(
        {
            "cluster": [r[0] for r in rows],
            "prompt_id": [r[1] for r in rows],
            "side": [r[2] for r in rows],
            "position": [r[3] for r in rows],
            "target_id": [r[4] for r in rows],
            "token": [r[5] for r in rows],
            "value": [r[6] for r in rows],
            "n_units": [1] * len(rows),
        }
    )
    got = records.cluster_records(table)
    assert sorted(got) == [("C0", "input"), ("C0", "output"), ("C1", "input")]
    (r,) = got[("C1", "input")]
    assert (r.prompt_id, r.tokens, r.values.tolist()) == ("p1", ("a", " b"), [0.25, 0.5])
    (o,) = got[("C0", "output")]  # table order; NaN reads as 0
    assert (o.tokens, o.values.tolist()) == ((" Z", " Y"), [0.1, 0.0])
    assert [r.prompt_id for r in records.cluster_records(table, prompt_ids=["p0"])[("C0", "input")]]
    assert ("C1", "input") not in records.cluster_records(table, prompt_ids=["p0"])
    with pytest.raises(AdagError, match="lacks the columns"):
        records.cluster_records(table.drop(["token"]))


def test_top_tokens_text():
    recs = [
        Record("a", ("The", " France", " is"), np.array([0.1, 2.0, -1.0])),
        Record("b", ("The", " Italy", " is"), np.array([0.1, 1.0, 0.5])),
    ]
    assert records.top_tokens_text(recs, "input") == (
        'fires on the tokens "France", "Italy", "is", "The"'
    )
    outs = [Record("a", (" Paris", " London", " the"), np.array([10.0, -4.0, 0.0]))]
    assert records.top_tokens_text(outs, "output") == 'promotes "Paris"; suppresses "London"'
    assert records.top_tokens_text([Record("z", ("x",), np.zeros(1))], "input") == (
        "fires on no token"
    )


# -- prompts -------------------------------------------------------------------------------------


def test_prompt_texts_and_parsing():
    assert prompts.input_record_text(["The", " capital", " of", " France"], [0, 1, 0, 1]) == (
        "The<< capital>> of<< France>>"
    )
    assert prompts.input_record_text(["a", "\n", "b"], [1, 1, 0]) == "<<a↵>>b"
    assert prompts.output_record_text([" the", " Paris", " London"], [0, 10, -4]) == (
        '" Paris" +10, " London" -4, " the" 0'
    )
    assert prompts.parse_explanation('\n  1. Explanation: "country names."\nmore') == (
        "country names",
        None,
    )
    assert prompts.parse_explanation("   \n ") == (None, "empty answer")
    assert prompts.parse_explanation("!!! ???")[0] is None
    assert prompts.parse_label("Label: Country to capital city names.") == (
        "Country to capital",
        None,
    )
    assert prompts.simulator_candidates("input") == [str(i) for i in range(11)]
    assert prompts.simulator_candidates("output")[0] == "-10"
    sim = prompts.simulator_messages("input", "country names", ["The", " France"])
    assert sim[-1]["content"].endswith("a value from 0 to 10.")
    assert "The\n France" in sim[-1]["content"]
    assert prompts.examples()["label"]["label"]


# -- scoring -------------------------------------------------------------------------------------


def test_expected_value():
    assert scoring.expected_value({"0": 0.5, "10": 0.5}) == 5.0
    assert scoring.expected_value({"-10": 0.25, "2": 0.75}) == pytest.approx(-1.0)
    assert scoring.expected_value({"7": 1.0}) == 7.0
    assert scoring.expected_value(None) is None
    assert scoring.expected_value({"1": 0.0}) is None


def test_scores_perfect_constant_and_negated():
    true = [np.array([0.1, 0.9, 0.0]), np.array([0.5, 0.2])]
    exact = [v.tolist() for v in true]
    assert scoring.score(exact, true) == (pytest.approx(1.0), None)
    # any increasing affine map of the truth is as good
    assert scoring.score([[3 * x + 1 for x in v] for v in exact], true)[0] == pytest.approx(1.0)
    r, why = scoring.score([[4.0] * 3, [4.0] * 2], true)
    assert r is None and "constant" in why
    negated = [[-x for x in v] for v in exact]
    assert scoring.score(negated, true)[0] == pytest.approx(-1.0)
    # a negative explanation describes the flipped record: simulating it perfectly scores +1
    assert scoring.score(negated, true, sign="negative")[0] == pytest.approx(1.0)
    r, why = scoring.score(exact, [np.ones(3), np.ones(2)])
    assert r is None and "true values are constant" in why
    # unreadable (None) positions are left out
    assert scoring.pearson([1.0, None, 3.0], [1.0, 100.0, 2.0]) == (pytest.approx(1.0), None)
    assert scoring.pearson([1.0, None], [1.0, 2.0])[0] is None


# -- a scripted LLM (a test double of adag's own protocol) ---------------------------------------


class _Usage:
    def __init__(self) -> None:
        self.calls = 0

    def as_dict(self) -> dict[str, int]:
        return {"calls": self.calls}


class ScriptedLLM:
    """Answers from the request alone.

    explainer: the highlighted tokens (input side) or the +/- targets (output side), as
    "the tokens X, Y" / "promotes X; suppresses Y"; except: records with " weird" get no words
    (always); records with " odd" get no words on the first try of each sample; " boom" raises
    LLMError; sample 1 of records with " capital" gets "garble" (which the simulator cannot read).
    simulator: 10 (input) for a token named in the explanation, else 0; output: +10 / -10 for a
    promoted / suppressed token. "constant" explanations give 5 everywhere.
    label: the first two words of the input explanation.
    """

    distributions = True

    def __init__(self, name: str = "scripted") -> None:
        self.name = name
        self.usage = _Usage()
        self.log: list[tuple[str, float, int]] = []

    async def complete(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        temperature: float = 0.0,
        max_tokens: int | None = None,
        sample: int = 0,
    ) -> str:
        self.usage.calls += 1
        await asyncio.sleep(0)
        system, user = messages[0]["content"], messages[-1]["content"]
        self.log.append((user[:30], temperature, sample))
        if "label" in system:
            words = re.findall(r"[A-Za-z]+", user.split("\n")[0].split(":", 1)[1])
            return f"Label: {' '.join(words[-2:])}."
        if "Rubric" in user:
            response = user.split("Response: ", 1)[1]
            if "mumble" in response:
                return "hmm"
            if "flaky" in response and sample == 0:
                return "maybe"
            return "Yes, it is." if "good" in response else "No."
        body = user.split("\n", 1)[1]
        if " weird" in body:
            return "  ...  "
        if " odd" in body and sample < 2:  # n_samples = 2 in the tests: a retry is sample >= 2
            return "???"
        if " boom" in body:
            raise LLMError("server said 400")
        if "fire" in system:  # input side
            marked = sorted({m.strip() for m in re.findall(r"<<(.*?)>>", body)})
            if " capital" in body and sample == 1:
                return "garble"
            if marked and set(marked) <= set(COUNTRIES):
                return "Country names."
            return f"the tokens {', '.join(marked)}"
        up, down = set(), set()
        for tok, v in re.findall(r'"([^"]*)" ([+-]?\d+)', body):
            (up if int(v) > 0 else down if int(v) < 0 else set()).add(tok.strip())
        ups = "capital cities" if up and up <= set(CAPITALS) else ", ".join(sorted(up))
        return f"promotes {ups}; suppresses {', '.join(sorted(down))}"

    async def score_lines(
        self,
        messages: Sequence[Mapping[str, str]],
        lines: Sequence[str],
        candidates: Sequence[str],
        *,
        sample: int = 0,
    ) -> list[dict[str, float] | None]:
        self.usage.calls += 1
        await asyncio.sleep(0)
        explanation = messages[-1]["content"].split("\n", 1)[0].removeprefix("Explanation: ")
        self.log.append(("sim:" + explanation[:30], 0.0, sample))
        if "garble" in explanation:
            return [None] * len(lines)
        out: list[dict[str, float] | None] = []
        if "constant" in explanation:
            return [{"5": 1.0} for _ in lines]
        if candidates[0] == "0":
            named = set(re.findall(r"\w+", explanation))
            if "Country" in named:
                named |= set(COUNTRIES)
            for line in lines:
                v = "10" if line.strip() in named else "0"
                out.append({c: float(c == v) for c in candidates})  # a one-hot distribution
            return out
        up_text, _, down_text = explanation.partition(";")
        up, down = set(re.findall(r"\w+", up_text)), set(re.findall(r"\w+", down_text))
        if "capital cities" in up_text:
            up |= set(CAPITALS)
        for line in lines:
            word = line.strip()
            v = "10" if word in up else "-10" if word in down else "0"
            out.append({v: 1.0})
        return out

    async def aclose(self) -> None:
        pass


# -- a small synthetic clustering ----------------------------------------------------------------

COUNTRIES = ["France", "Italy", "Spain", "Japan", "Peru", "Chile"]
CAPITALS = ["Paris", "Rome", "Madrid", "Tokyo", "Lima", "Santiago"]


def _fixture() -> tuple[Clusters, pa.Table]:
    """Five clusters over six prompts "The capital of X is":

    C0 reads the country (and a little negative from "The"), promotes the capital, suppresses
    " London"; C1 reads " capital" and suppresses the capital (inhibitory); C2 reads " weird"
    (its explainer never answers); C3 occurs in one prompt only, its output explainer answers
    only on retries (" odd"); C4 occurs in no prompt."""
    clusters = Clusters(
        units=[(0, 0, 1), (0, 1, 1), (1, 0, 1), (1, 1, -1), (2, 0, 1), (3, 0, 1)],
        labels=np.array([0, 0, 1, 2, 3, 4]),
        method="multiview",
        n_clusters=5,
        seed=0,
    )
    cols: dict[str, list[Any]] = {c: [] for c in PROFILE_COLUMNS}

    def add(cluster: str, pid: str, side: str, toks: list[str], vals: list[float]) -> None:
        for i, (t, v) in enumerate(zip(toks, vals, strict=True)):
            cols["cluster"].append(cluster)
            cols["prompt_id"].append(pid)
            cols["side"].append(side)
            cols["position"].append(i if side == "input" else -1)
            cols["target_id"].append(-1 if side == "input" else 100 + i)
            cols["token"].append(t)
            cols["value"].append(v)
            cols["n_units"].append(1)

    for i, (country, capital) in enumerate(zip(COUNTRIES, CAPITALS, strict=True)):
        pid = f"p{i}"
        toks = ["The", " capital", " of", f" {country}", " is"]
        targets = [f" {capital}", " London", " the"]
        w = 1.0 + 0.1 * i
        add("C0", pid, "input", toks, [-0.2 * w, 0.05, 0.0, w, 0.1])
        add("C0", pid, "output", targets, [0.8 * w, -0.3, 0.0])
        add("C1", pid, "input", toks, [0.0, w, 0.1, 0.0, 0.05 * i])
        add("C1", pid, "output", targets, [-0.5 * w, 0.0, 0.1])
        if i < 4:
            add("C2", pid, "input", ["A", " weird", " one"], [0.0, w, 0.1 * i])
            add("C2", pid, "output", [" x", " y"], [0.1 * w, -0.2])
        if i == 0:
            add("C3", pid, "input", ["An", " odd", " one"], [0.1, 1.0, 0.3])
            add("C3", pid, "output", [" odd", " even"], [0.4, -0.2])
    table = pa.table(
        {
            "cluster": pa.array(cols["cluster"], pa.string()),
            "prompt_id": pa.array(cols["prompt_id"], pa.string()),
            "side": pa.array(cols["side"], pa.string()).dictionary_encode(),
            "position": pa.array(cols["position"], pa.int64()),
            "target_id": pa.array(cols["target_id"], pa.int64()),
            "token": pa.array(cols["token"], pa.string()),
            "value": pa.array(cols["value"], pa.float64()),
            "n_units": pa.array(cols["n_units"], pa.int64()),
        }
    )
    return clusters, table


def _describe(llm: ScriptedLLM | None = None, **kw: Any) -> tuple[Descriptions, list[str]]:
    clusters, table = _fixture()
    done: list[str] = []
    kw.setdefault("n_samples", 2)
    kw.setdefault("min_highlights", 3)
    d = describe(clusters, table, llm=llm or ScriptedLLM(), progress=done.append, **kw)
    return d, done


def _row(d: Descriptions, cluster: str, side: str) -> dict[str, Any]:
    (row,) = [r for r in d.rows if r["cluster"] == cluster and r["side"] == side]
    return row


def test_describe_end_to_end(tmp_path):
    llm = ScriptedLLM()
    d, done = _describe(llm)
    keys = [(f"C{i}", s) for i in range(5) for s in ("input", "output")]
    assert [(r["cluster"], r["side"]) for r in d.rows] == keys
    assert sorted(done) == sorted(f"{c} {s}" for c, s in keys)  # once per (cluster, side)
    # every cluster ends with a description or a recorded failure
    for r in d.rows:
        assert (r["status"] == "ok") == (r["score"] is not None) == (r["failure"] is None)
        assert (r["status"] == "ok") == (r["explanation"] is not None)
        assert r["prompt_version"] == prompts.PROMPT_VERSION
        assert r["explainer"] == r["simulator"] == "scripted"
        for c in r["candidates"]:
            assert (c["score"] is None) == (c["failure"] is not None)

    c0 = _row(d, "C0", "input")
    assert (c0["explanation"], c0["sign"], c0["label"]) == (
        "Country names",
        "positive",
        c0["label"],
    )
    assert c0["score"] == pytest.approx(0.97232, abs=1e-5)
    # n_samples candidates per sign, all recorded; the best kept
    assert [(c["sign"], c["sample"]) for c in c0["candidates"]] == [
        ("positive", 0),
        ("positive", 1),
        ("negative", 0),
        ("negative", 1),
    ]
    assert [c["explanation"] for c in c0["candidates"]] == [
        "Country names",
        "garble",  # the simulator cannot read its replies: a null score with the reason
        "the tokens The",  # the negative explanation: "The" is C0's most negative token
        "garble",
    ]
    assert "malformed simulation after 3 tries" in c0["candidates"][1]["failure"]
    assert 0 < c0["candidates"][2]["score"] < c0["score"]
    assert c0["n_records"] == 6 and c0["n_heldout"] == 2 and len(c0["heldout"]) == 2
    assert c0["top_records"][0] == {
        "prompt_id": "p5",
        "tokens": ["The", " capital", " of", " Chile", " is"],
        "values": pytest.approx([-0.3, 0.05, 0.0, 1.5, 0.1]),
        "highlight": [False, False, False, True, False],
    }
    c0_out = _row(d, "C0", "output")
    assert c0_out["heldout"] == c0["heldout"]  # the same held-out prompts on both sides
    assert c0_out["sign"] is None and len(c0_out["candidates"]) == 2
    assert c0_out["explanation"] == "promotes capital cities; suppresses London"
    assert c0_out["top_records"][0]["values"] == [10, -2, 0]  # 0.8·1.5 is the max |value|
    assert c0_out["top_records"][0]["highlight"] == [True, True, False]
    assert c0["label"] == c0_out["label"] == "Country names" and d.label("C0") == "Country names"
    assert c0["inhibitory"] is False and _row(d, "C1", "output")["inhibitory"] is True

    c1 = _row(d, "C1", "input")
    assert (c1["explanation"], c1["sign"]) == ("the tokens capital", "positive")
    assert c1["note"] == "no negative input values: no negative explanations"
    assert len(c1["candidates"]) == 2

    # an explainer that never answers with words: retried, then a failure with its reason
    c2 = _row(d, "C2", "input")
    assert c2["status"] == "failed"
    assert c2["failure"] == (
        "no candidate could be scored (malformed explanation after 3 tries: no words in the "
        "answer '...')"
    )
    assert all(c["explanation"] is None for c in c2["candidates"])
    assert c2["label"] == "suppresses y"  # labelled from its output side alone
    c2_calls = [x for x in llm.log if x[0].startswith("Excerpts:\n1. A<< weird>>")]
    # samples 0 and 1, each asked three times, with the sample indices s, s + 2, s + 4
    assert sorted(s for _, _, s in c2_calls) == [0, 1, 2, 3, 4, 5]
    assert {t for _, t, s in c2_calls if s == 0} == {0.0}  # sample 0 is greedy
    assert {t for _, t, s in c2_calls if s > 0} == {1.0}

    # C3 occurs in one prompt: explained and scored on it; its output explainer needed a retry
    c3 = _row(d, "C3", "output")
    assert c3["n_records"] == 1 and c3["n_heldout"] == 1
    assert c3["note"] == "one record: explained and scored on the same prompt"
    assert c3["status"] == "ok" and c3["explanation"] == "promotes odd; suppresses even"
    assert c3["score"] == 1.0
    c4 = _row(d, "C4", "input")
    assert c4["status"] == "failed" and c4["failure"] == "C4 occurs in no prompt"
    assert c4["baselines"] is None and c4["top_records"] == [] and c4["label"] is None
    assert c4["label_failure"] == "no description to label"

    # the shuffled baseline: another cluster's best explanation of the same side; the clusters
    # with one lend it to each other (a derangement), a cluster without one borrows one too
    for side in ("input", "output"):
        explained = [c for c in ("C0", "C1", "C2", "C3") if _row(d, c, side)["status"] == "ok"]
        lent = []
        for c in ("C0", "C1", "C2", "C3"):
            r = _row(d, c, side)
            sh = r["baselines"]["shuffled"]
            donor = _row(d, sh["from"], side)
            assert sh["from"] != c and donor["status"] == "ok"
            assert (sh["explanation"], sh["sign"]) == (donor["explanation"], donor["sign"])
            assert (sh["score"] is None) == (sh["failure"] is not None)
            if c in explained:
                lent.append(sh["from"])
            tt = r["baselines"]["top_tokens"]
            assert tt["explanation"] and (tt["score"] is None) == (tt["failure"] is not None)
        assert sorted(lent) == explained
    assert _row(d, "C0", "input")["baselines"]["top_tokens"]["explanation"] == (
        'fires on the tokens "Chile", "Peru", "Italy", "France", "is"'
    )
    assert _row(d, "C3", "input")["baselines"]["top_tokens"]["failure"] == (
        "the simulation is constant (every token 10)"
    )

    # save / load / table / label
    path = d.save(tmp_path / "descriptions.jsonl")
    assert Descriptions.load(path).rows == d.rows
    t = d.table()
    assert t.column_names == [
        "cluster",
        "side",
        "label",
        "inhibitory",
        "status",
        "score",
        "shuffled_score",
        "top_tokens_score",
    ]
    assert t.num_rows == 10 and t["score"].null_count == 3
    assert t["score"][0].as_py() == c0["score"]
    assert d.label("C4") is None and d.label("C9") is None
    for line in path.read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in the file"))


def test_describe_is_deterministic():
    a, _ = _describe()
    b, _ = _describe()
    assert json.dumps(a.rows) == json.dumps(b.rows)
    c, _ = _describe(seed=1)
    assert json.dumps(a.rows) != json.dumps(c.rows)


def test_describe_records_call_failures_and_constant_simulators():
    class Constant(ScriptedLLM):
        async def complete(self, messages, *, temperature=0.0, max_tokens=None, sample=0):
            if "label" in messages[0]["content"]:
                raise LLMError("rate limited for good")
            return "constant guess"

    d, _ = _describe(Constant(), names=["C1", "C0"], sides=["input"])
    assert [(r["cluster"], r["side"]) for r in d.rows] == [("C1", "input"), ("C0", "input")]
    for r in d.rows:
        assert r["status"] == "failed" and r["score"] is None
        assert r["failure"] == (
            "no candidate could be scored (the simulation is constant (every token 5))"
        )
        assert all(
            c["failure"] == "the simulation is constant (every token 5)" for c in r["candidates"]
        )
        assert r["label"] is None and r["label_failure"] == "no description to label"
        assert r["baselines"]["shuffled"] is None  # no cluster has an explanation to lend
        assert r["baselines"]["top_tokens"]["score"] is not None

    class NoLabel(ScriptedLLM):
        async def complete(self, messages, *, temperature=0.0, max_tokens=None, sample=0):
            if "label" in messages[0]["content"]:
                raise LLMError("rate limited for good")
            return await super().complete(messages, temperature=temperature, sample=sample)

    d, _ = _describe(NoLabel(), names=["C0"], sides=["output"])
    (r,) = d.rows
    assert r["status"] == "ok" and r["label"] is None
    assert r["label_failure"] == "label call failed: rate limited for good"
    assert r["baselines"]["shuffled"] is None  # one cluster described: no other to borrow from

    class Boom(ScriptedLLM):
        async def score_lines(self, messages, lines, candidates, *, sample=0):
            raise LLMError("connection refused")

    d, _ = _describe(Boom(), names=["C0"], sides=["output"])
    (r,) = d.rows
    assert r["status"] == "failed" and "simulator call failed: connection refused" in r["failure"]
    assert r["baselines"]["top_tokens"]["failure"] == "simulator call failed: connection refused"

    class Explode(ScriptedLLM):
        async def complete(self, messages, *, temperature=0.0, max_tokens=None, sample=0):
            raise LLMError("HTTP 400: bad request")

    d, _ = _describe(Explode(), names=["C0"], sides=["input"], n_samples=1)
    (r,) = d.rows
    assert [c["failure"] for c in r["candidates"]] == [
        "explainer call failed: HTTP 400: bad request"
    ] * 2


def test_describe_checks_its_arguments():
    clusters, table = _fixture()
    llm = ScriptedLLM()
    for kw, msg in [
        ({"n_samples": 0}, "n_samples"),
        ({"heldout": 1.0}, "heldout"),
        ({"sides": ["inputs"]}, "sides"),
        ({"names": ["C9"]}, "no cluster 'C9'"),
        ({"min_highlights": 0}, "min_highlights"),
    ]:
        with pytest.raises(AdagError, match=msg):
            describe(clusters, table, llm=llm, **kw)

    async def inside() -> None:
        with pytest.raises(AdagError, match="adescribe"):
            describe(clusters, table, llm=llm)

    asyncio.run(inside())


def test_descriptions_load_errors(tmp_path):
    with pytest.raises(AdagError, match="does not exist"):
        Descriptions.load(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"cluster": "C0", "side": "input"}\n{oops\n')
    with pytest.raises(AdagError, match="line 2 is not JSON"):
        Descriptions.load(bad)


# -- the judge -----------------------------------------------------------------------------------


def test_parse_answer():
    assert parse_answer("Yes.", "yes/no") == (True, None)
    assert parse_answer("no, it is not", "yes/no") == (False, None)
    assert parse_answer("Nope", "yes/no")[0] is None
    assert parse_answer("I'd say 8/10", "0-10") == (8, None)
    assert parse_answer("10", "0-10") == (10, None)
    assert parse_answer("-3 or 42 or 7.5", "0-10")[0] is None
    assert parse_answer("score: 42, then 3", "0-10") == (3, None)


def test_judge_retries_and_records_failures():
    llm = ScriptedLLM()
    out = judge(
        ["a good answer", "a bad answer", "mumble", "flaky but good"], "Is it good?", llm=llm
    )
    assert [o["answer"] for o in out] == [True, False, None, True]
    assert out[2]["failure"].startswith("malformed answer after 3 tries") and out[2]["raw"] == "hmm"
    assert [o["failure"] for o in (out[0], out[1], out[3])] == [None, None, None]
    assert rate(out) == (2, 3, pytest.approx(2 / 3), *[pytest.approx(x) for x in wilson(2, 3)])
    # the Wilson 95% interval of 2/3, by hand
    assert wilson(2, 3) == (pytest.approx(0.2077, abs=1e-4), pytest.approx(0.9385, abs=1e-4))
    assert rate([3, 7, None, 10]) == (2, 3, pytest.approx(2 / 3), *wilson(2, 3))
    k, n, r, lo, hi = rate([])
    assert (k, n) == (0, 0) and math.isnan(r) and math.isnan(lo) and math.isnan(hi)

    class Down(ScriptedLLM):
        async def complete(self, messages, *, temperature=0.0, max_tokens=None, sample=0):
            raise LLMError("HTTP 401: bad key")

    (o,) = asyncio.run(ajudge(["x"], "ok?", llm=Down(), scale="0-10", prompts=["p"]))
    assert o["answer"] is None and o["failure"] == "HTTP 401: bad key"
    with pytest.raises(AdagError, match="scale"):
        judge(["x"], "ok?", llm=llm, scale="1-5")
