"""Shared fixtures: tiny random models of every supported architecture (float64) and the real
SmolLM2-135M (float32), loaded once per session.

Every test that loads SmolLM2 carries the ``smollm2`` marker automatically (``make test-fast``
runs ``-m "not smollm2"``): tests that use the ``smollm2`` fixture (directly or through another
fixture), every test of the modules in ``SMOLLM2_MODULES``, and the tests in ``SMOLLM2_TESTS``
that load it by path.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adag.models.model import Model

SMOLLM2_MODULES = {
    "test_cli",
    "test_cli_inputs",
    "test_trace_cli",
    "test_docs",
    "test_smollm2",
    "test_rundir",
    "test_datasets",
    "test_cluster_cli",
    "test_run",
    "test_demo",
    "test_transcoders_cli",
}
"""Modules that load SmolLM2 through the CLI or the README, not through the fixture."""
SMOLLM2_TESTS = {"test_load.py::test_gguf_conversion_is_atomic_and_cached"}
"""Single tests that load SmolLM2 from its GGUF file themselves."""
CACHED_LOADER_MODULES = {
    "test_cli",
    "test_cli_inputs",
    "test_trace_cli",
    "test_docs",
    "test_rundir",
    "test_datasets",
    "test_cluster_cli",
    "test_demo",
}
"""Modules whose ``load_model("smollm2-135m")`` returns the session's model (see
:func:`cached_smollm2_loader`)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = Path(str(item.fspath)).stem
        by_id = item.nodeid.split("[")[0].split("/")[-1] in SMOLLM2_TESTS
        uses = "smollm2" in getattr(item, "fixturenames", ())
        if uses or by_id or module in SMOLLM2_MODULES:
            item.add_marker(pytest.mark.smollm2)


ARCHS = ["llama", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2", "gpt2"]
VOCAB = 61

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_config(arch: str):
    import transformers as tr

    if arch == "llama":
        return tr.LlamaConfig(**_COMMON, head_dim=8)
    if arch == "qwen2":
        return tr.Qwen2Config(**_COMMON)
    if arch == "qwen3":
        return tr.Qwen3Config(**_COMMON, head_dim=8)
    if arch == "gemma2":
        return tr.Gemma2Config(
            **_COMMON,
            head_dim=8,
            query_pre_attn_scalar=8,
            attn_logit_softcapping=4.0,
            final_logit_softcapping=3.0,
            sliding_window=4,
        )
    if arch == "gemma3_text":
        return tr.Gemma3TextConfig(
            **_COMMON,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=4,
            final_logit_softcapping=3.0,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
    if arch == "olmo2":
        return tr.Olmo2Config(**_COMMON)
    if arch == "gpt2":
        return tr.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=3,
            n_head=4,
            n_inner=48,
            n_positions=64,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    raise KeyError(arch)


def tiny_hf(arch: str, dtype: torch.dtype = torch.float64, seed: int = 0, attn: str = "eager"):
    """A tiny random HF model whose weights are large enough for every nonlinearity to matter."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation=attn)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 1 and name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:  # norm weights; Gemma's are stored as w in (1 + w)
                base = 0.0 if arch.startswith("gemma") else 1.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=gen))
            elif "wte" in name or "wpe" in name or "embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[0] if arch == "gpt2" else p.shape[1]
                p.copy_(torch.randn(p.shape, generator=gen) * 1.5 / math.sqrt(fan_in))
    return hf.to(dtype).eval()


def tiny_model(arch: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> Model:
    return Model(tiny_hf(arch, dtype, seed), None, name=f"tiny-{arch}")


@pytest.fixture(scope="session", params=ARCHS)
def tiny(request) -> Model:
    """A tiny random float64 model, parametrised over every supported architecture."""
    return tiny_model(request.param)


@pytest.fixture
def tokens() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (2, 9), generator=gen)


@functools.cache
def _session_smollm2() -> Model:
    """SmolLM2 loaded once per session, on first use (the fixture and the CLI loader share it)."""
    from adag.models import load

    real = getattr(load.load_model, "__wrapped__", load.load_model)  # never the cached loader
    return real("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2() -> Model:
    return _session_smollm2()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved with SmolLM2's tokenizer (from the embedded GGUF), loadable by
    path like any local model: for CLI tests that need text prompts but not real weights."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from adag.models.load import ALIASES, convert_gguf, find_alias_gguf

    gguf = find_alias_gguf(ALIASES["smollm2-135m"])
    assert gguf is not None
    tok = AutoTokenizer.from_pretrained(str(convert_gguf(gguf)))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.3,  # large enough weights that MLP neurons matter
    )
    hf = LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("tiny") / "model"
    hf.save_pretrained(d)
    tok.save_pretrained(d)
    return d


SMALL_RUN = Path(__file__).parent / "fixtures" / "run-small.yaml"


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of ``tests/fixtures/run-small.yaml`` (SmolLM2, local explainer, 4
    clusters), run once per session: what the report and viewer browser tests read."""
    from adag.pipeline.config import load_config
    from adag.pipeline.run import run

    out = tmp_path_factory.mktemp("small-run") / "run"
    run(load_config(SMALL_RUN), out=out, model=_session_smollm2())
    return out


@pytest.fixture(autouse=True)
def cached_smollm2_loader(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """In the modules of ``CACHED_LOADER_MODULES``, ``adag.models.load.load_model`` (which the CLI
    and ``adag.load_model`` resolve at call time) returns the session's SmolLM2 for the default
    alias, dtype and device instead of loading another copy; anything else loads for real. The
    session model is only loaded when asked for, so error tests load nothing."""
    if Path(str(request.node.fspath)).stem not in CACHED_LOADER_MODULES:
        yield
        return
    import adag.models.load as load

    real = load.load_model

    def load_model(
        name: str = load.DEFAULT_MODEL, *, dtype: str = "float32", device: str = "cpu"
    ) -> Model:
        if (name, dtype, device) == ("smollm2-135m", "float32", "cpu"):
            return _session_smollm2()
        return real(name, dtype=dtype, device=device)

    load_model.__wrapped__ = real  # type: ignore[attr-defined]
    monkeypatch.setattr(load, "load_model", load_model)
    yield
