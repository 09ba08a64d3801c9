"""Named slots (roles) of prompt pairs and the aggregation of pairs of different lengths by role:
the built-in tasks' roles on SmolLM2's tokenizer, aligned node ids (``@ROLE``, ``-K``) in
``adag.nodes``, ``merge_pairs`` with pairs, the JSONL round trip and its one-line errors, an
end-to-end mean on a tiny model, and the position names of the ``adag patch`` table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adag.errors import AdagError
from adag.models.model import Model
from adag.nodes import NodeId, align, format, parse, pos_field, position_labels, resolve, to_patch
from adag.patching import atp, exhaustive
from adag.patching.scores import align_ids, merge_pairs
from adag.pipeline.patch import plot_top_nodes, position_names, save_table
from adag.tasks.builtin import (
    CAPITAL_TEMPLATES,
    CAPITALS,
    IOI_TEMPLATES,
    capital_roles,
    capitals,
    ioi,
    ioi_roles,
)
from adag.tasks.pairs import (
    PromptPair,
    TokenizedPair,
    load_pairs,
    save_pairs,
    tokenize_pair,
    tokenize_pairs,
)

from .conftest import VOCAB, tiny_model

A_TOK, B_TOK = 3, 11

# -- the built-in tasks on SmolLM2 -------------------------------------------------------------


def _tokens(model: Model, text: str) -> list[str]:
    return model.to_str_tokens(text)


@pytest.mark.parametrize("abb", [True, False])
def test_ioi_roles_name_the_right_tokens_in_every_template(smollm2: Model, abb: bool) -> None:
    for t, tpl in enumerate(IOI_TEMPLATES):
        roles = ioi_roles(smollm2, t, "Mary", "John", abb)
        assert roles is not None
        text = tpl.format(*(("Mary", "John", "John") if abb else ("John", "Mary", "John")))
        toks = _tokens(smollm2, text)
        assert toks[roles["IO"]] == " Mary"
        assert toks[roles["S1"]] == toks[roles["S2"]] == " John"
        assert roles["S1"] < roles["S2"] and roles["S1+1"] == roles["S1"] + 1
        assert (roles["IO"] < roles["S1"]) == abb
        assert roles["END"] == len(toks) - 1 and toks[-1] == " to"
        if not abb:
            assert toks[roles["S1+1"]] == " and"


def test_ioi_pairs_carry_roles_through_tokenization(smollm2: Model) -> None:
    pairs = ioi(smollm2, 6)
    toks = tokenize_pairs(smollm2, pairs)
    for pair, tp in zip(pairs, toks, strict=True):
        assert pair.roles is not None and tp.roles == pair.roles
        assert set(pair.roles) == {"IO", "S1", "S1+1", "S2", "END"}
        words = _tokens(smollm2, pair.clean)
        assert words[pair.roles["IO"]] == pair.answer
        assert words[pair.roles["S1"]] == words[pair.roles["S2"]] == pair.foil
        assert pair.roles["END"] == tp.n_pos - 1


def test_capitals_roles_name_the_country_and_the_end(smollm2: Model) -> None:
    for t, tpl in enumerate(CAPITAL_TEMPLATES):
        for country in ("France", "the Netherlands", "South Korea"):
            roles = capital_roles(smollm2, t, country)
            assert roles is not None and set(roles) == {"COUNTRY", "END"}
            toks = _tokens(smollm2, tpl.format(country))
            assert toks[roles["COUNTRY"]] == " " + country.split()[-1]
            assert roles["END"] == len(toks) - 1
    pairs = capitals(smollm2, 4)
    country_of = {cap: c for c, cap in CAPITALS}
    for pair in pairs:
        assert pair.roles is not None
        words = _tokens(smollm2, pair.clean)
        assert words[pair.roles["COUNTRY"]] == " " + country_of[pair.answer[1:]].split()[-1]
        assert pair.roles["END"] == len(words) - 1


# -- aligned node ids ---------------------------------------------------------------------------


def test_aligned_ids_round_trip_and_are_rejected_where_one_prompt_is_meant() -> None:
    for node_id, node in [
        ("head:23:@IO:3:z", NodeId("head", 23, None, 3, "z", role="IO")),
        ("head:23:-1:3:z", NodeId("head", 23, -1, 3, "z")),
        ("neuron:2:@S1+1:7", NodeId("neuron", 2, None, 7, role="S1+1")),
        ("attn:0:-12", NodeId("attn", 0, -12)),
        ("embed:@END", NodeId("embed", role="END")),
    ]:
        assert parse(node_id, aligned=True) == node and node.aligned
        assert str(node) == node_id == format(node.kind, *node.fields)
        assert pos_field(node_id) == node_id.split(":")[2 if node.kind != "embed" else 1]
        with pytest.raises(AdagError) as info:
            parse(node_id)
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"bad node id {node_id!r}: expected ")
        assert "aligned across prompt pairs" in msg and "resolve" in msg
        if node.kind != "embed":
            with pytest.raises(AdagError, match="aligned across prompt pairs"):
                to_patch(node_id)
    assert not parse("head:3:5:2:z", aligned=True).aligned
    for bad in ("head:1:-0:2:z", "head:1:-01:2:z", "head:1:@:2:z", "head:1:@1x:2:z", "attn:1:@a b"):
        with pytest.raises(AdagError, match=r"^bad node id .*: expected "):
            parse(bad, aligned=True)
    with pytest.raises(AdagError, match="role"):
        NodeId("head", 1, 3, 2, "z", role="IO")  # a role replaces the position


def test_position_labels_align_and_resolve_are_inverse() -> None:
    roles = {"IO": 1, "END": 4}
    labels = position_labels(5, roles)
    assert labels == ["-5", "@IO", "-3", "-2", "@END"]
    ids = [format("head", 2, p, 1, "z") for p in range(5)] + ["head:2:*:1:z", "logit:7"]
    got = align(ids, labels)
    assert got[:5] == [f"head:2:{x}:1:z" for x in labels] and got[5:] == ids[5:]
    assert [resolve(i, 5, roles) for i in got] == ids
    assert resolve("head:2:3:1:z", 5, roles) == "head:2:3:1:z"
    with pytest.raises(AdagError, match=r"role 'S2'.*its roles: IO, END"):
        resolve("head:2:@S2:1:z", 5, roles)
    with pytest.raises(AdagError, match="named slot @END"):
        resolve("head:2:-1:1:z", 5, roles)
    with pytest.raises(AdagError, match="before the start"):
        resolve("head:2:-6:1:z", 5, roles)
    with pytest.raises(AdagError, match="both at position 1"):
        position_labels(5, {"IO": 1, "S1": 1})
    with pytest.raises(AdagError, match=r"0\.\.4"):
        position_labels(5, {"IO": 5})


# -- merge_pairs --------------------------------------------------------------------------------


def _pair(n_pos: int, roles: dict[str, int] | None, seed: int = 0) -> TokenizedPair:
    gen = torch.Generator().manual_seed(seed)
    c = torch.randint(0, VOCAB, (1, n_pos), generator=gen)
    z = torch.randint(0, VOCAB, (1, n_pos), generator=gen)
    return TokenizedPair(PromptPair("c", "n", "a", "b"), c, z, A_TOK, B_TOK, roles)


def _ids(n_pos: int) -> list[str]:
    return [format("head", 0, p, 0, "z") for p in range(n_pos)] + ["head:0:*:1:z"]


def test_merge_pairs_aligns_pairs_of_different_lengths_by_role_then_from_the_end() -> None:
    a, b = _pair(3, {"IO": 0, "END": 2}), _pair(4, {"IO": 2, "END": 3})
    sa, sb = np.array([1.0, 2.0, 3.0, 4.0]), np.array([10.0, 20.0, 30.0, 40.0, 50.0])
    per_pair = [(_ids(3), sa), (_ids(4), sb)]
    out = merge_pairs("m", per_pair, 1.0, {"c": [sa * 2, sb * 2]}, pairs=[a, b])
    assert align_ids([ids for ids, _ in per_pair], [a, b]) == [
        ["head:0:@IO:0:z", "head:0:-2:0:z", "head:0:@END:0:z", "head:0:*:1:z"],
        ["head:0:-4:0:z", "head:0:-3:0:z", "head:0:@IO:0:z", "head:0:@END:0:z", "head:0:*:1:z"],
    ]
    est = dict(zip(out.nodes, out.estimate, strict=True))
    assert est["head:0:@IO:0:z"] == (1.0 + 30.0) / 2
    assert est["head:0:@END:0:z"] == (3.0 + 40.0) / 2
    assert est["head:0:*:1:z"] == (4.0 + 50.0) / 2
    assert est["head:0:-2:0:z"] == 2.0 / 2  # b names its -2 IO: absent there, 0
    assert est["head:0:-4:0:z"] == 10.0 / 2
    col = dict(zip(out.nodes, out.columns["c"], strict=True))
    assert col["head:0:@IO:0:z"] == (2.0 + 60.0) / 2
    assert not any(":0:0:z" in n or ":0:2:z" in n for n in out.nodes)  # no absolute ids left

    # no roles: every position counts from the end, -1 is each pair's last token
    plain = merge_pairs("m", per_pair, 1.0, pairs=[_pair(3, None), _pair(4, None)])
    est = dict(zip(plain.nodes, plain.estimate, strict=True))
    assert est["head:0:-1:0:z"] == (3.0 + 40.0) / 2 and est["head:0:-4:0:z"] == 10.0 / 2

    # pairs=None: today's absolute ids
    old = merge_pairs("m", per_pair, 1.0)
    assert old.nodes == [*_ids(4)[:3], "head:0:*:1:z", "head:0:3:0:z"]

    with pytest.raises(AdagError, match="ids of 2 pairs but 1 pairs"):
        merge_pairs("m", per_pair, 1.0, pairs=[a])


def test_merge_pairs_keeps_absolute_ids_for_pairs_of_one_length() -> None:
    a, b = _pair(4, {"IO": 0, "END": 3}), _pair(4, {"IO": 2, "END": 3})
    per_pair = [(_ids(4), np.arange(5.0)), (_ids(4), np.arange(5.0) * 3)]
    out = merge_pairs("m", per_pair, 1.0, pairs=[a, b])
    ref = merge_pairs("m", per_pair, 1.0)
    assert out.nodes == ref.nodes == _ids(4)
    np.testing.assert_array_equal(out.per_pair, ref.per_pair)


# -- roles in files and their errors -----------------------------------------------------------


def test_roles_round_trip_through_jsonl(tmp_path) -> None:
    pairs = [
        PromptPair("a b c", "d e f", " g", " h", {"IO": 1, "END": 2}),
        PromptPair("a b", "d e", " g"),
    ]
    path = tmp_path / "pairs.jsonl"
    save_pairs(pairs, path)
    assert '"roles": {"IO": 1, "END": 2}' in path.read_text()
    back = load_pairs(path)
    assert back == pairs and back[0].roles == {"IO": 1, "END": 2} and back[1].roles is None
    assert hash(back[0]) == hash(pairs[0])  # still hashable with a dict of roles


class _WordTokenizer:
    """One token per space-separated word (with its leading space), no BOS."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        words = [(" " if i else "") + w for i, w in enumerate(text.split(" ")) if w]
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in words]}


class _WordModel:
    name = "words"

    def __init__(self) -> None:
        self.tokenizer = _WordTokenizer()

    def to_tokens(self, text: str) -> torch.Tensor:
        return torch.tensor([self.tokenizer(text)["input_ids"]])


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('"roles": [1, 2]', ["roles must be an object", "token positions"]),
        ('"roles": {"IO": "Mary"}', ["role 'IO' is at 'Mary'", "not a token position"]),
        ('"roles": {"IO": -1}', ["role 'IO' is at -1"]),
        ('"roles": {"IO": true}', ["role 'IO' is at True"]),
        ('"roles": {"1O": 1}', ["bad role name '1O'", "e.g. IO, S1+1, END"]),
        ('"roles": {"IO": 1, "S1": 1}', ["'IO' and 'S1' are both at token 1"]),
    ],
)
def test_bad_roles_in_a_file_give_one_line_naming_the_line(tmp_path, line, expected) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"clean": "a b c", "noise": "d e f", "answer": " g", ' + line + "}\n")
    with pytest.raises(AdagError) as info:
        load_pairs(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}:1: ")
    for e in expected:
        assert e in msg


def test_roles_past_the_prompt_are_refused_at_tokenize_time() -> None:
    model = _WordModel()
    ok = tokenize_pair(model, PromptPair("a b c", "d e f", " g", " h", {"IO": 0, "END": 2}))
    assert ok.roles == {"IO": 0, "END": 2}
    bad = PromptPair("a b c", "d e f", " g", " h", {"IO": 0, "END": 3})
    with pytest.raises(AdagError) as info:
        tokenize_pairs(model, [bad])
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("pair 0 'a b c': role 'END' is at token 3")
    assert "clean prompt is 3 tokens (positions 0..2)" in msg and "counting from 0" in msg
    with pytest.raises(AdagError, match=r"^pair 'x y': bad role name 'a b'"):
        PromptPair("x y", "z w", " v", roles={"a b": 0})


# -- end to end on a tiny model ------------------------------------------------------------------


def logit_diff(logits: torch.Tensor, pair: TokenizedPair) -> torch.Tensor:
    return logits[:, -1, A_TOK] - logits[:, -1, B_TOK]


@pytest.mark.parametrize("method", ["atp", "exhaustive"])
def test_aligned_mean_is_the_mean_at_each_pairs_role_position(method: str) -> None:
    model = tiny_model("llama")
    toks = [
        _pair(5, {"IO": 1, "S2": 3, "END": 4}, seed=1),
        _pair(7, {"IO": 4, "S2": 2, "END": 6}, seed=2),
        _pair(7, {"IO": 0, "S2": 5, "END": 6}, seed=3),
    ]
    fn = atp if method == "atp" else exhaustive
    singles = [fn(model, [tp], nodes="heads,neurons", metric=logit_diff) for tp in toks]
    per_pair = [(r.nodes, r.per_pair[0]) for r in singles]
    out = merge_pairs(method, per_pair, 0.0, pairs=toks)
    est = dict(zip(out.nodes, out.estimate, strict=True))
    one = [dict(zip(r.nodes, r.per_pair[0], strict=True)) for r in singles]
    for layer in range(model.n_layers):
        for h in range(model.n_heads):
            for role in ("IO", "S2", "END"):
                want = np.mean(
                    [
                        s[format("head", layer, tp.roles[role], h, "z")]
                        for s, tp in zip(one, toks, strict=True)
                    ]
                )
                assert est[format("head", layer, "@" + role, h, "z")] == pytest.approx(want)
            # -2: a plain position in the 7-token pairs, S2 in the 5-token one (absent: 0)
            want = (one[1][format("head", layer, 5, h, "z")] + 0.0 + 0.0) / 3
            assert est[format("head", layer, -2, h, "z")] == pytest.approx(want)
        # neurons summed over positions keep their ids
        n = format("neuron", layer, None, 0)
        assert est[n] == pytest.approx(np.mean([s[n] for s in one]))
    # merging with pairs=None is today's absolute aggregation
    assert merge_pairs(method, per_pair, 0.0).nodes == [
        n for n in dict.fromkeys(i for ids, _ in per_pair for i in ids)
    ]


def test_position_names_and_the_table_column(tmp_path) -> None:
    model = tiny_model("llama")
    a = _pair(3, {"IO": 0, "END": 2}, seed=1)
    b = _pair(4, {"IO": 2, "END": 3}, seed=2)
    b.clean[0, 3] = a.clean[0, 2]  # the same END token in both
    ids = ["head:0:@IO:0:z", "head:0:@END:0:z", "head:0:-3:0:z", "head:0:*:1:z", "logit:3"]
    names = position_names(model, ids, [a, b])
    io = [int(a.clean[0, 0]), int(b.clean[0, 2])]
    assert names[0] == f"IO #{io[0]}" + (" (varies)" if io[0] != io[1] else "")
    assert names[1] == f"END #{int(a.clean[0, 2])}"
    assert names[2] == f"-3 #{int(b.clean[0, 1])}"  # a names its -3 IO: only b has it
    assert names[3:] == ["all positions", ""]
    # absolute positions (pairs of one length): a role the pairs share is named
    c, d = _pair(3, {"IO": 0, "END": 2}, seed=3), _pair(3, {"IO": 1, "END": 2}, seed=4)
    got = position_names(model, ["attn:1:2", "attn:1:0"], [c, d])
    assert got[0].startswith("END #") and got[1].startswith("0 #")

    per_pair = [(_ids(3), np.arange(4.0)), (_ids(4), np.arange(5.0))]
    scores = merge_pairs("m", per_pair, 0.0, pairs=[a, b])
    pos = position_names(model, scores.nodes, [a, b])
    import pyarrow.parquet as pq

    t = pq.read_table(save_table(scores, tmp_path / "m.parquet", pos))
    assert t.column("position").to_pylist() == pos
    assert t.schema.metadata[b"method"] == b"m"
    plot_top_nodes(scores, tmp_path / "m.png", positions=dict(zip(scores.nodes, pos, strict=True)))
    assert (tmp_path / "m.png").stat().st_size > 0
