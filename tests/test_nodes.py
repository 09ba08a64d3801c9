"""Node ids (``adag.nodes``): format / parse round trips for every kind, strict one-line errors,
``to_patch`` against hand-written Patches and the sites it changes, and the circuit-tracer
mapping."""

from __future__ import annotations

import pytest
import torch

from adag.errors import AdagError
from adag.graphs.export import to_circuit_tracer, viewer_node_ids
from adag.models.sites import Patch
from adag.nodes import (
    KINDS,
    NodeId,
    circuit_tracer_fields,
    circuit_tracer_id,
    format,
    parse,
    to_patch,
)
from adag.patching.node_sets import Group

from .test_export import golden_graph
from .test_prune import make_graph

ROUND_TRIP = [
    ("embed:4", NodeId("embed", pos=4)),
    ("embed:*", NodeId("embed")),
    ("neuron:3:5:17", NodeId("neuron", 3, 5, 17)),
    ("neuron:12:*:873", NodeId("neuron", 12, None, 873)),
    ("neuron:0:0:0", NodeId("neuron", 0, 0, 0)),
    ("head:3:5:2:q", NodeId("head", 3, 5, 2, "q")),
    ("head:3:5:1:k", NodeId("head", 3, 5, 1, "k")),
    ("head:0:0:0:v", NodeId("head", 0, 0, 0, "v")),
    ("head:3:*:5:z", NodeId("head", 3, None, 5, "z")),
    ("attn:2:7", NodeId("attn", 2, 7)),
    ("attn:2:*", NodeId("attn", 2)),
    ("mlp:29:10", NodeId("mlp", 29, 10)),
    ("mlp:0:*", NodeId("mlp", 0)),
    ("feature:4:2:123456", NodeId("feature", 4, 2, 123456)),
    ("feature:4:*:9", NodeId("feature", 4, None, 9)),
    ("error:4:2", NodeId("error", 4, 2)),
    ("error:4:*", NodeId("error", 4)),
    ("logit:2364", NodeId("logit", index=2364)),
    ("logit:0", NodeId("logit", index=0)),
]


@pytest.mark.parametrize(("node_id", "node"), ROUND_TRIP)
def test_format_parse_round_trip(node_id: str, node: NodeId) -> None:
    assert parse(node_id) == node
    assert str(node) == node_id
    assert format(node.kind, *node.fields) == node_id
    assert str(parse(node_id)) == node_id


def test_every_kind_is_covered_and_format_examples() -> None:
    assert {node.kind for _, node in ROUND_TRIP} == set(KINDS)
    assert format("neuron", 3, 5, 17) == "neuron:3:5:17"
    assert format("head", 3, None, 5, "z") == "head:3:*:5:z"
    assert format("embed", 4) == "embed:4"
    assert format("logit", 2364) == "logit:2364"
    assert format("attn", 2, None) == "attn:2:*"


MALFORMED = [
    "",
    ":",
    ":1",
    "neuron",
    "neuron:",
    "neuron:3:x",
    "neuron:3:5",
    "neuron:3:5:17:2",
    "neuron:-1:5:17",
    "neuron:3:-5:17",
    "neuron:3:5:-1",
    "neuron:*:5:17",
    "neuron:3:5:*",
    "neuron:03:5:17",
    "neuron:3:5:017",
    "neuron::5:17",
    "neuron: 3:5:17",
    "neuron:3:5:17 ",
    "neuron:3:5:17\n",
    "neuron:3:5:+1",
    "neuron:3:5:1.0",
    "neuron:3:5:1e3",
    "neuron:3:5:١",  # Arabic-Indic digit one: str.isdigit() is True
    "neuron:3:²:1",
    "Neuron:3:5:17",
    "neurons:3:5:17",
    "head:3:5:2",
    "head:3:5:2:x",
    "head:3:5:2:Z",
    "head:3:5:z:2",
    "head:3:5:2:z:1",
    "attn:2",
    "attn:2:3:4",
    "attn:*:3",
    "mlp:*:*",
    "embed:",
    "embed:1:2",
    "embed:x",
    "embed:**",
    "logit:*",
    "logit:",
    "logit:1:2",
    "logit:-5",
    "feature:1:2",
    "error:1",
    "error:1:2:3",
    "foo:1",
    "neuron:3:5:17:",
]


@pytest.mark.parametrize("node_id", MALFORMED)
def test_malformed_ids_raise_one_line(node_id: str) -> None:
    with pytest.raises(AdagError) as info:
        parse(node_id)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"bad node id {node_id!r}: expected ")


def test_error_message_shows_the_expected_form() -> None:
    with pytest.raises(AdagError) as info:
        parse("neuron:3:x")
    assert str(info.value) == (
        "bad node id 'neuron:3:x': expected neuron:LAYER:POS:INDEX (POS may be *)"
    )
    with pytest.raises(AdagError, match=r"head:LAYER:POS:HEAD:X .*q k v z"):
        parse("head:1:2:3:w")
    with pytest.raises(AdagError, match=r"expected one of embed:POS, neuron:LAYER:POS:INDEX"):
        parse("nope:1")
    with pytest.raises(AdagError, match="bad node id 3"):
        parse(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "fields", "match"),
    [
        ("nope", (1,), "unknown node kind"),
        ("neuron", (1, 2), "takes 3 field"),
        ("logit", (), "takes 1 field"),
        ("head", (1, 2, 3, "x"), "head sub"),
        ("neuron", (None, 2, 3), "only the position"),
        ("neuron", (1, 2, None), "only the position"),
        ("logit", (None,), "only the position"),
    ],
)
def test_format_validates(kind: str, fields: tuple[object, ...], match: str) -> None:
    with pytest.raises(AdagError, match=match):
        format(kind, *fields)  # type: ignore[arg-type]


def test_node_id_validates_its_fields() -> None:
    with pytest.raises(AdagError, match="needs index"):
        NodeId("neuron", 1, 2)
    with pytest.raises(AdagError, match="has no layer"):
        NodeId("embed", layer=1, pos=2)
    with pytest.raises(AdagError, match="has no pos"):
        NodeId("logit", pos=3, index=5)
    with pytest.raises(AdagError, match="needs sub"):
        NodeId("head", 1, 2, 3)
    with pytest.raises(AdagError, match="unknown node kind"):
        NodeId("nope")


def _old_group_ids(g: Group) -> list[str]:
    """The hand-written ids ``Group.ids`` produced before it used ``adag.nodes.format``."""
    lay = g.layer
    if g.kind == "head":
        if g.per_pos:
            n_h, t = g.shape
            return [f"head:{lay}:{p}:{h}:{g.sub}" for h in range(n_h) for p in range(t)]
        return [f"head:{lay}:*:{h}:{g.sub}" for h in range(g.shape[0])]
    if g.kind == "neuron":
        if g.per_pos:
            t, d = g.shape
            return [f"neuron:{lay}:{p}:{i}" for p in range(t) for i in range(d)]
        return [f"neuron:{lay}:*:{i}" for i in range(g.shape[0])]
    if g.per_pos:
        return [f"{g.kind}:{lay}:{p}" for p in range(g.shape[0])]
    return [f"{g.kind}:{lay}:*"]


def test_group_ids_unchanged_and_parse() -> None:
    groups = [
        Group("head", 2, "z", True, (4, 5)),
        Group("head", 0, "k", False, (2,)),
        Group("neuron", 1, None, True, (3, 6)),
        Group("neuron", 1, None, False, (6,)),
        Group("attn", 2, None, True, (5,)),
        Group("mlp", 0, None, False, (1,)),
    ]
    for g in groups:
        ids = g.ids()
        assert ids == _old_group_ids(g)
        assert len(ids) == g.size
        assert [str(parse(i)) for i in ids] == ids


def test_to_patch_merges_by_site_and_position_shape() -> None:
    ids = [
        "neuron:1:3:7",
        "neuron:1:*:9",
        "neuron:1:5:2",
        "neuron:1:*:4",
        "neuron:2:0:1",
        "head:0:2:1:z",
        "head:0:4:3:z",
        "head:0:*:3:z",
        "head:0:2:1:q",
        "attn:2:4",
        "attn:2:6",
        "mlp:0:*",
        "embed:3",
        "neuron:1:3:7",  # repeated: counts once
    ]
    assert to_patch(ids, "replace", 0.0) == [
        Patch("blocks.1.mlp.hook_post", 0.0, pos=[3, 5], index=[7, 2]),
        Patch("blocks.1.mlp.hook_post", 0.0, index=[9, 4]),
        Patch("blocks.2.mlp.hook_post", 0.0, pos=[0], index=[1]),
        Patch("blocks.0.attn.hook_z", 0.0, head=[1, 3], pos=[2, 4]),
        Patch("blocks.0.attn.hook_z", 0.0, head=[3]),
        Patch("blocks.0.attn.hook_q", 0.0, head=[1], pos=[2]),
        Patch("blocks.2.hook_attn_out", 0.0, pos=[4, 6]),
        Patch("blocks.0.hook_mlp_out", 0.0),
        Patch("blocks.0.hook_resid_pre", 0.0, pos=[3]),
    ]
    assert to_patch("head:1:*:0:v", "detach") == [
        Patch("blocks.1.attn.hook_v", op="detach", head=[0])
    ]
    assert to_patch([]) == []


def test_to_patch_rejects_non_sites() -> None:
    with pytest.raises(AdagError, match="is a logit, not a site"):
        to_patch(["neuron:0:1:2", "logit:5"], "replace", 0.0)
    for node_id in ("feature:1:2:3", "error:1:2", "feature:1:*:3"):
        with pytest.raises(AdagError, match="transcoder splice"):
            to_patch(node_id, "replace", 0.0)
    with pytest.raises(AdagError, match="bad node id"):
        to_patch("neuron:1:2", "replace", 0.0)
    with pytest.raises(AdagError, match="needs a value"):
        to_patch("neuron:1:2:3", "replace")
    with pytest.raises(AdagError, match="op"):
        to_patch("neuron:1:2:3", "fn", 0.0)


def test_to_patch_zeroes_exactly_those_neurons(tiny, tokens) -> None:
    site = "blocks.1.mlp.hook_post"
    _, base = tiny.run_with_cache(tokens, [site])
    _, cache = tiny.run_with_cache(
        tokens, [site], patches=to_patch(["neuron:1:3:7", "neuron:1:*:9"], "replace", 0.0)
    )
    want = base[site].clone()  # (batch, pos, d_mlp)
    want[:, 3, 7] = 0.0
    want[:, :, 9] = 0.0
    assert torch.equal(cache[site], want)
    assert (base[site][:, 3, 7] != 0).all() and (base[site][:, :, 9] != 0).all()


def test_to_patch_zeroes_a_head_at_a_position(tiny, tokens) -> None:
    z, v = "blocks.1.attn.hook_z", "blocks.1.attn.hook_v"
    logits0, base = tiny.run_with_cache(tokens, [z, v])
    logits, cache = tiny.run_with_cache(
        tokens, [z], patches=to_patch("head:1:4:2:z", "replace", 0.0)
    )
    want = base[z].clone()  # (batch, head, pos, d_head)
    want[:, 2, 4] = 0.0
    assert torch.equal(cache[z], want)
    assert not torch.equal(logits, logits0)
    # a KV head summed over positions, together with a z head: the same as hand-written Patches
    ids = ["head:1:*:1:v", "head:1:4:2:z"]
    logits, cache = tiny.run_with_cache(tokens, [v, z], patches=to_patch(ids, "replace", 0.0))
    hand = [Patch(v, 0.0, head=1), Patch(z, 0.0, head=[2], pos=[4])]
    logits_hand, cache_hand = tiny.run_with_cache(tokens, [v, z], patches=hand)
    want = base[v].clone()  # (batch, kv_head, pos, d_head)
    want[:, 1] = 0.0
    assert torch.equal(cache[v], want)
    assert torch.equal(cache[z], cache_hand[z]) and torch.equal(logits, logits_hand)
    assert (cache[z][:, 2, 4] == 0).all()


def test_to_patch_tensor_value_broadcasts(tiny, tokens) -> None:
    site = "blocks.0.hook_attn_out"
    _, base = tiny.run_with_cache(tokens, [site])
    vec = torch.linspace(-1.0, 1.0, tiny.d_model, dtype=torch.float64)
    _, cache = tiny.run_with_cache(
        tokens, [site], patches=to_patch(["attn:0:2", "attn:0:5"], "add", vec)
    )
    want = base[site].clone()  # (batch, pos, d_model)
    want[:, [2, 5]] += vec
    assert torch.equal(cache[site], want)


def test_circuit_tracer_fields_every_kind() -> None:
    cantor = (1 + 3) * (1 + 3 + 1) // 2 + 3
    assert circuit_tracer_fields("neuron", 1, 2, 3) == {
        "node_id": "1_3_2",
        "feature": cantor,
        "layer": "1",
        "feature_type": "cross layer transcoder",
        "jsNodeId": "1_3-0",
    }
    assert circuit_tracer_fields("feature", 1, 2, 3) == circuit_tracer_fields("neuron", 1, 2, 3)
    assert circuit_tracer_fields("error", 1, 2, -1) == {
        "node_id": "1_-1_2",
        "feature": -1,
        "layer": "1",
        "feature_type": "mlp reconstruction error",
        "jsNodeId": "1_-1-2",
    }
    assert circuit_tracer_fields("embed", -1, 1, 12) == {
        "node_id": "E_12_1",
        "feature": 1,
        "layer": "E",
        "feature_type": "embedding",
        "jsNodeId": "E_12-1",
    }
    assert circuit_tracer_fields("logit", 2, 1, 21) == {  # layer = n_layers as a Graph stores it
        "node_id": "3_21_1",
        "feature": 21,
        "layer": "3",
        "feature_type": "logit",
        "jsNodeId": "L_21-1",
    }
    for kind in ("neuron", "feature", "error", "embed", "logit"):
        assert circuit_tracer_id(kind, 4, 5, 6) == circuit_tracer_fields(kind, 4, 5, 6)["node_id"]
    for kind in ("head", "attn", "mlp", "nope"):
        with pytest.raises(AdagError, match="no circuit-tracer node"):
            circuit_tracer_fields(kind, 1, 2, 3)


def test_export_uses_the_mapping() -> None:
    for g in (
        golden_graph(),
        make_graph(
            ["embed:0", "neuron:0:0:4", "error:1:2", "feature:2:1:9", "logit:21"],
            [("embed:0", "neuron:0:0:4", 1.0), ("neuron:0:0:4", "logit:21", 1.0)],
            targets=[(21, " on", 1.0)],
        ),
    ):
        data = to_circuit_tracer(g, slug="m")
        keys = ("node_id", "feature", "layer", "feature_type", "jsNodeId")
        for row, node in enumerate(data["nodes"]):
            want = circuit_tracer_fields(
                g.node_kinds[row],
                int(g.node_layer[row]),
                int(g.node_position[row]),
                int(g.node_index[row]),
            )
            assert {k: node[k] for k in keys} == want
        assert viewer_node_ids(g) == [n["node_id"] for n in data["nodes"]]
