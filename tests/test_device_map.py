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


def test_each_worker_gets_its_share_of_the_gpus() -> None:
    from adag.errors import AdagError
    from adag.pipeline.dist import Dist

    two = [Dist(rank=r, world=2, local_rank=r, local_world=2) for r in range(2)]
    assert [d.device("auto", n_gpus=4) for d in two] == ["auto:0,1", "auto:2,3"]
    assert [d.device("auto", gpus_per_model=1, n_gpus=4) for d in two] == ["auto:0", "auto:1"]
    assert [d.device("cuda") for d in two] == ["cuda:0", "cuda:1"]
    # two machines of two ranks: the local rank decides
    assert Dist(rank=3, world=4, local_rank=1, local_world=2).device("auto", n_gpus=2) == "auto:1"
    assert Dist().device("auto", gpus_per_model=2, n_gpus=8) == "auto:0,1"
    assert Dist().device("auto") == "auto" and Dist().device("cpu") == "cpu"
    with pytest.raises(AdagError, match="need 6 GPUs and this machine has 4"):
        two[1].device("auto", gpus_per_model=3, n_gpus=4)
    with pytest.raises(AdagError, match="with --device auto"):
        Dist().device("cuda", gpus_per_model=2)


def test_a_workers_gpus_are_the_only_ones_planned() -> None:
    """Meta-device planning: accelerate places the model on the worker's GPUs (and the CPU for
    what does not fit), never on another worker's."""
    import warnings

    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoModelForCausalLM

    from adag.errors import AdagError
    from adag.models.load import gpu_list, load_model, max_memory_for

    from .conftest import tiny_config

    assert gpu_list("auto:2,3") == [2, 3]
    for bad in ("auto:", "auto:x", "auto:-1"):
        with pytest.raises(AdagError, match="lists GPU indices"):
            gpu_list(bad)
    with init_empty_weights():
        hf = AutoModelForCausalLM.from_config(tiny_config("llama"))
    size = sum(p.numel() * p.element_size() for p in hf.parameters())
    plan = max_memory_for([2, 3], free={2: int(size * 0.5), 3: int(size * 0.5)})
    assert set(plan) <= {2, 3, "cpu"} and plan[2] == int(0.9 * int(size * 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        placed = infer_auto_device_map(
            hf, max_memory=plan, no_split_module_classes=["LlamaDecoderLayer"]
        )
    assert set(placed.values()) <= {2, 3, "cpu"} and {2, 3} <= set(placed.values())
    if not torch.cuda.is_available():
        with pytest.raises(AdagError, match="CUDA is not available"):
            load_model("smollm2-135m", device="auto:0")
