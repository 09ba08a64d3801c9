"""Models placed by accelerate (issue 15, item 3): a tiny model dispatched with a ``device_map``
that offloads a layer to disk, which keeps its weights on the meta device outside its forward
behind accelerate's hooks (as ``device_map="auto"`` does when a model does not fit its GPUs),
traces the same graph and gets the same AtP* scores as the model in memory, bit for bit; and
``load_model(..., device="auto")`` loads through ``device_map``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adag.graphs.trace import trace
from adag.models.model import Model
from adag.patching.atp import atp_star
from adag.tasks.pairs import PromptPair, TokenizedPair

from .conftest import tiny_hf

MAPS = {
    "llama": [
        "model.embed_tokens",
        "model.layers.0",
        "model.layers.1",
        "model.layers.2",
        "model.norm",
        "model.rotary_emb",
        "lm_head",
    ],
    "gpt2": [
        "transformer.wte",
        "transformer.wpe",
        "transformer.h.0",
        "transformer.h.1",
        "transformer.h.2",
        "transformer.ln_f",
        "lm_head",
    ],
}
OFFLOADED = {"llama": "model.layers.1", "gpt2": "transformer.h.1"}


@pytest.fixture(params=sorted(MAPS))
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Model, Model]]:
    from accelerate import dispatch_model

    arch = request.param
    plain = Model(tiny_hf(arch, torch.float32), None)
    device_map = {name: "cpu" for name in MAPS[arch]}
    device_map[OFFLOADED[arch]] = "disk"
    hf = dispatch_model(tiny_hf(arch, torch.float32), device_map=device_map, offload_dir=tmp_path)
    yield plain, Model(hf, None)


def test_offloaded_layers_trace_and_patch_like_the_model_in_memory(pair) -> None:
    plain, placed = pair
    assert placed.device == torch.device("cpu")
    assert any(p.is_meta for p in placed.hf.parameters())  # really offloaded
    ids = torch.randint(0, 61, (9,), generator=torch.Generator().manual_seed(1))
    a = trace(plain, ids, k=3, node_threshold=0.01)[0]
    b = trace(placed, ids, k=3, node_threshold=0.01)[0]
    assert a == b
    noise = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(2))
    pairs = [
        TokenizedPair(
            pair=PromptPair(clean="", noise="", answer="", foil=""),
            clean=ids[None],
            noise=noise,
            answer_id=3,
            foil_id=5,
        )
    ]
    sa, sb = atp_star(plain, pairs), atp_star(placed, pairs)
    assert sa.nodes == sb.nodes and torch.equal(
        torch.as_tensor(sa.estimate), torch.as_tensor(sb.estimate)
    )


def test_load_model_device_auto(tiny_dir: Path) -> None:
    from adag.models.load import load_model

    m = load_model(str(tiny_dir), device="auto")
    assert m.device.type == "cpu"  # one CPU: transformers places everything there
    g = trace(m, "The capital of France is", k=2)[0]
    ref = trace(load_model(str(tiny_dir)), "The capital of France is", k=2)[0]
    assert g == ref
