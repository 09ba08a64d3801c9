"""Attribution-profile tables (the profiles themselves are checked against finite differences in
test_trace.py) and prompt files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adag.errors import AdagError
from adag.graphs.trace import trace
from adag.models.model import Model
from adag.profiles import profile, save_profiles
from adag.tasks.prompts import PromptSpec, load_prompts


def test_profile_table_matches_graph(tmp_path):
    from .conftest import tiny_model

    m: Model = tiny_model("llama")
    ids = [torch.randint(0, 61, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 9)]
    gs = trace(m, ids, k=2, node_threshold=0.02)
    gs[1].settings["excluded_positions"] = [0]  # as for a BOS
    table = profile(gs, prompt_ids=["a", "b"])
    assert table.column_names == [
        "prompt_id",
        "node",
        "layer",
        "activation",
        "side",
        "position",
        "target_id",
        "token",
        "value",
        "raw",
    ]
    t = table.to_pandas()
    for pid, g in zip(["a", "b"], gs, strict=True):
        rows = np.flatnonzero(g.mask("neuron"))
        sub = t[t.prompt_id == pid]
        n_pos = len(g.prompt_ids) - len(g.settings["excluded_positions"])
        assert len(sub) == len(rows) * (n_pos + len(g.target_ids))
        r = rows[0]
        node = g.node_ids[r]
        inp = sub[(sub.node == node) & (sub.side == "input")].sort_values("position")
        pos = [p for p in range(len(g.prompt_ids)) if p not in g.settings["excluded_positions"]]
        assert inp.position.tolist() == pos
        np.testing.assert_allclose(inp.raw, g.input_attr[r, pos])
        np.testing.assert_allclose(inp.value, g.input_attr[r, pos] / g.node_activation[r])
        # every row of a node carries its activation (whose sign decides its clustering unit)
        act = dict(zip(g.node_ids, g.node_activation.tolist(), strict=True))
        assert sub.activation.tolist() == [act[n] for n in sub.node]
        out = sub[(sub.node == node) & (sub.side == "output")]
        assert out.target_id.tolist() == g.target_ids.tolist()
        np.testing.assert_allclose(out.value, g.output_attr[r] / g.target_logits)
    # Llama has no biases: every input profile sums to 1 over all positions
    g = gs[0]
    sums = t[(t.prompt_id == "a") & (t.side == "input")].groupby("node").value.sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, rtol=1e-9)
    path = save_profiles(profile(gs), tmp_path / "profiles.parquet")
    import pyarrow.parquet as pq

    assert pq.read_table(path).num_rows == len(t)
    with pytest.raises(AdagError, match="no graphs"):
        profile([])


def test_load_prompts(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("The capital of France is\n\nThe capital of Italy is\n")
    assert load_prompts(p) == [
        PromptSpec("The capital of France is"),
        PromptSpec("The capital of Italy is"),
    ]
    j = tmp_path / "p.jsonl"
    j.write_text('{"prompt": "Q?", "seed": "Answer:", "label": "x"}\n')
    assert load_prompts(j) == [PromptSpec("Q?", "Answer:", "x")]
    for text, msg in [
        ('{"prompt": "a"}\n{"prompt": 3}\n', ":2: each line needs"),
        ('{"prompt": "a", "extra": 1}\n', "unknown keys"),
        ('{"prompt": "a"\n', "not valid JSON"),
        ('{"prompt": " "}\n', "prompt is empty"),
    ]:
        j.write_text(text)
        with pytest.raises(AdagError, match=msg):
            load_prompts(j)
