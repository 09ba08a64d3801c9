"""Transcoder graphs side by side with circuit-tracer 0.5.0 (issue 12's benchmark).

Both tools trace SmolLM2-135M (float32, CPU) with the same random JumpReLU PLTs
(``bench/make_random_plt.py``), on the same token ids (``<|im_start|>`` (id 1, the tokenizer's
BOS) + the prompt's tokens: adag's tokenizer adds no BOS, circuit-tracer prepends the first
special id when the ids do not start with one, so both get the ids already prefixed), the same
batch size, no node or edge threshold:

* **three prompts**: all active features (no ``max_feature_nodes``): wall time of the trace call
  (best of ``--repeats``), peak memory (see below), and the largest difference between the two
  raw adjacency matrices on feature rows, per row relative to the row's largest |entry|
  (circuit-tracer's); nodes are matched by (layer, position, feature index), errors by
  (layer, position), embeddings by position;
* **length sweep**: 16–256 tokens with ``max_feature_nodes`` (2,000): time and memory.

Each (tool, prompt) runs in a fresh subprocess (circuit-tracer in its own venv,
``--ct-python``). Memory: each worker first traces a 4-token prefix (a warm-up that pages in what
both tools load lazily: adag's memory-mapped model and transcoder weights, circuit-tracer's lazy
decoders), then resets the peak RSS (``VmHWM``, via ``/proc/self/clear_refs``) and records the
peak during the first timed trace: "+" is that peak over the RSS before the trace (what the
trace itself needs); the absolute peak and ``ru_maxrss`` of the whole process are recorded too.

circuit-tracer is loaded the way its README says (``ReplacementModel.from_pretrained_and_
transcoders`` on the TransformerLens backend, ``load_transcoder_set`` with its default lazy
decoder), given the local HF directory: TransformerLens 3.2 knows no local Llama by path, so the
path is added to its official names, and its generic Llama config forgets ``rope_theta``
(SmolLM2: 100,000; TransformerLens's default 10,000), which is set from the HF config.

Run (adag's venv): ``python bench/bench_transcoders.py --ct-python /tmp/ctvenv/bin/python``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
PROMPTS = [
    "The capital of France is",
    "When Mary and John went to the store, John gave a drink to",
    "The Eiffel Tower is located in the city of",
]
LONG_TEXT = (
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "carpenter named Tomas and his granddaughter Lina. Every morning they walked together to the "
    "workshop, where the smell of pine and oak filled the air. Tomas taught Lina how to choose the "
    "right wood, how to sharpen a chisel, and how to listen to the grain before cutting it. In the "
    "evenings they sat by the fire while the wind moved through the trees, and Tomas told stories "
    "about the travellers who had passed through the village many years before: merchants from "
    "the south carrying silk and spices, soldiers returning from distant wars, and once a "
    "musician whose violin could make the whole square fall silent. Lina loved these stories, but "
    "most of all she loved the one about the bridge. Long ago, Tomas said, the river that ran "
    "beside the village flooded every spring, and the people on the far bank were cut off for "
    "weeks. The village council asked every carpenter in the region to build a bridge that would "
    "survive the water, and many tried and failed. Then a young woman arrived with a plan drawn on "
    "a single sheet of paper, and after a long summer of work the bridge stood. It still stands "
    "today, and the people call it by her name. When Lina asked what that name was, her "
    "grandfather smiled and said that she would learn it when she was ready to build something of "
    "her own. So Lina worked harder than ever, and one day she brought him a small wooden box"
)
BOS = 1  # <|im_start|>: SmolLM2's bos_token_id


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _measure(trace, ids, repeats: int) -> tuple[dict, object]:
    """Warm up on a 4-token prefix (pages in lazily loaded weights), then time ``repeats`` traces
    of ``ids``; the peak RSS is that of the first timed trace. Returns the record's memory and
    time fields and the last result."""
    cold = _rss_mb()
    trace(ids[:4])
    rss0 = _rss_mb()
    _reset_hwm()
    times, hwm, result = [], float("nan"), None
    for r in range(repeats):
        t0 = time.perf_counter()
        result = trace(ids)
        times.append(time.perf_counter() - t0)
        if r == 0:
            hwm = _hwm_mb()
    assert result is not None
    record = {
        "times": times,
        "rss_cold_mb": cold,
        "rss_before_mb": rss0,
        "trace_peak_mb": hwm,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    return record, result


def _smollm2_dir() -> Path:
    return next((Path.home() / ".cache/adag/models").glob("SmolLM2-135M-Instruct*"))


def make_hf_dir(dst: Path) -> None:
    """The float32 HF directory circuit-tracer's transformers 4.57 reads: adag's converted
    SmolLM2 (weights and tokenizer linked), with ``rope_theta`` at the top level (transformers 5
    wrote ``rope_parameters``, which 4.57 ignores, falling back to 10,000) and a tokenizer class
    4.57 knows."""
    if (dst / "config.json").is_file():
        return
    src = _smollm2_dir()
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        (dst / name).symlink_to(src / name)
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    cfg.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    cfg["torch_dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    tok = json.loads((src / "tokenizer_config.json").read_text())
    for k in ("backend", "is_local", "local_files_only"):
        tok.pop(k, None)
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    (dst / "tokenizer_config.json").write_text(json.dumps(tok, indent=1))


# ------------------------------------------------------------------------------------------
# Workers (run in a subprocess each; print one JSON line)


def worker_adag(a: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    import adag
    from adag.transcoders import load_transcoders

    ids = json.loads(a.ids)
    model = adag.load_model("smollm2-135m")
    tc = load_transcoders(a.plt, model)
    opts = dict(
        node_threshold=0.0,
        edge_threshold=0.0,
        desired_logit_prob=0.95,
        max_n_logits=10,
        max_feature_nodes=a.max_feature_nodes,
        batch_size=a.batch_size,
        max_batch_tokens=a.max_batch_tokens or a.batch_size * len(ids),
    )
    record, g = _measure(lambda x: adag.trace(model, x, transcoders=tc, **opts)[0], ids, a.repeats)
    out = {
        "tool": "adag",
        **record,
        "n_features": int(sum(k == "feature" for k in g.node_kinds)),
        "n_nodes": g.n_nodes,
        "n_edges": len(g.edge_weight),
        "targets": g.target_ids.tolist(),
    }
    if a.save:
        A = g.adjacency("circuit_tracer").tocoo()
        kinds = np.array(
            [{"embed": 0, "feature": 1, "error": 2, "logit": 3}[k] for k in g.node_kinds]
        )
        np.savez(
            a.save,
            kind=kinds,
            layer=g.node_layer,
            pos=g.node_position,
            index=g.node_index,
            row=A.row,
            col=A.col,
            val=A.data,
        )
    return out


def worker_ct(a: argparse.Namespace) -> dict:
    import gc
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import transformer_lens.loading_from_pretrained as loading
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = a.hf_dir
    tok = AutoTokenizer.from_pretrained(hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    rope = float(hf.config.rope_theta)
    loading.OFFICIAL_MODEL_NAMES.append(hf_dir)
    convert = loading.convert_hf_model_config

    def with_rope(name, **kw):
        d = convert(name, **kw)
        d["rotary_base"] = rope
        return d

    loading.convert_hf_model_config = with_rope
    L = hf.config.num_hidden_layers
    tcs = load_transcoder_set(
        {i: str(Path(a.plt) / f"layer_{i}.safetensors") for i in range(L)},
        scan="random-plt",
        feature_input_hook="mlp.hook_in",
        feature_output_hook="mlp.hook_out",
        device=torch.device("cpu"),
        dtype=torch.float32,
        lazy_encoder=False,
        lazy_decoder=True,
    )
    model = ReplacementModel.from_pretrained_and_transcoders(
        hf_dir,
        tcs,
        backend="transformerlens",
        device=torch.device("cpu"),
        dtype=torch.float32,
        hf_model=hf,
        tokenizer=tok,
    )
    del hf
    gc.collect()
    ids = torch.tensor(json.loads(a.ids))
    record, g = _measure(
        lambda x: attribute(
            x,
            model,
            max_n_logits=10,
            desired_logit_prob=0.95,
            batch_size=a.batch_size,
            max_feature_nodes=a.max_feature_nodes,
        ),
        ids,
        a.repeats,
    )
    sel = g.active_features[g.selected_features]
    out = {
        "tool": "circuit-tracer",
        **record,
        "n_features": len(sel),
        "n_active": len(g.active_features),
        "n_nodes": int(g.adjacency_matrix.shape[0]),
        "targets": [t.vocab_idx for t in g.logit_targets],
    }
    if a.save:
        nf = len(sel)
        n_logits = len(g.logit_targets)
        A = g.adjacency_matrix
        np.savez(
            a.save,
            feat=sel.numpy(),
            n_pos=len(ids),
            n_layers=L,
            feat_rows=A[:nf].numpy(),
            logit_rows=A[-n_logits:].numpy(),
            logit_ids=np.array([t.vocab_idx for t in g.logit_targets]),
        )
    return out


# ------------------------------------------------------------------------------------------
# The comparison


def compare(adag_file: Path, ct_file: Path) -> dict:
    """Largest |A_adag − A_ct| per feature row over the columns both graphs have, relative to
    the row's largest |A_ct| entry over those columns; logit rows the same way (they differ by
    definition: circuit-tracer's logit directions are demeaned over the vocabulary)."""
    ad, ct = np.load(adag_file), np.load(ct_file)
    L, T = int(ct["n_layers"]), int(ct["n_pos"])
    feat = ct["feat"]
    nf = len(feat)
    # circuit-tracer columns: features, errors (layer-major), tokens, logits
    ct_key: dict[tuple, int] = {}
    for j, (lay, p, i) in enumerate(feat.tolist()):
        ct_key[("f", lay, p, i)] = j
    for lay in range(L):
        for p in range(T):
            ct_key[("e", lay, p)] = nf + lay * T + p
    for p in range(T):
        ct_key[("t", p)] = nf + L * T + p
    ad_key: list[tuple] = []
    for k, lay, p, i in zip(ad["kind"], ad["layer"], ad["pos"], ad["index"], strict=True):
        ad_key.append(
            [
                ("t", int(p)),
                ("f", int(lay), int(p), int(i)),
                ("e", int(lay), int(p)),
                ("l", int(i)),
            ][int(k)]
        )
    ad_row_of = {key: r for r, key in enumerate(ad_key)}
    # adag's adjacency as dense rows over circuit-tracer's columns (-1: no such column there)
    col_map = np.array([ct_key.get(k, -1) for k in ad_key])
    ncols = nf + (L + 1) * T
    row, col, val = ad["row"], ad["col"], ad["val"]
    ad_feats = {k for k in ad_key if k[0] == "f"}
    ct_feats = {("f", *x) for x in feat.tolist()}
    common_cols = np.zeros(ncols, dtype=bool)
    common_cols[col_map[col_map >= 0]] = True
    lost_in_adag = ncols - int(common_cols.sum())
    # dense adag rows for circuit-tracer's feature rows
    dense = np.zeros((nf, ncols))
    ad_rows = np.array([ad_row_of.get(("f", *x), -1) for x in feat.tolist()])
    ct_row_of_ad = np.full(len(ad_key), -1)
    ct_row_of_ad[ad_rows[ad_rows >= 0]] = np.nonzero(ad_rows >= 0)[0]
    m = (ct_row_of_ad[row] >= 0) & (col_map[col] >= 0)
    dense[ct_row_of_ad[row[m]], col_map[col[m]]] = val[m]
    A = ct["feat_rows"][:, :ncols].astype(np.float64)
    both = ad_rows >= 0
    Ac, Dc = A[both][:, common_cols], dense[both][:, common_cols]
    scale = np.abs(Ac).max(1)
    rel = np.abs(Ac - Dc).max(1) / np.where(scale > 0, scale, 1)
    worst = int(np.argmax(rel)) if len(rel) else -1
    # the columns adag does not have (the BOS position's token and error nodes)
    missing = ~common_cols
    miss_rel = np.abs(A[both][:, missing]).max(1) / np.where(scale > 0, scale, 1)
    # logit rows
    lrows = []
    for j, tid in enumerate(ct["logit_ids"].tolist()):
        r = ad_row_of.get(("l", tid))
        if r is None:
            continue
        d = np.zeros(ncols)
        mm = (row == r) & (col_map[col] >= 0)
        d[col_map[col[mm]]] = val[mm]
        a_row = ct["logit_rows"][j, :ncols].astype(np.float64)[common_cols]
        s = np.abs(a_row).max()
        lrows.append(float(np.abs(a_row - d[common_cols]).max() / (s if s > 0 else 1)))
    return {
        "feature_rows_compared": int(both.sum()),
        "features_only_ct": len(ct_feats - ad_feats),
        "features_only_adag": len(ad_feats - ct_feats),
        "columns_compared": int(common_cols.sum()),
        "ct_columns_absent_in_adag": lost_in_adag,
        "max_rel_diff_feature_rows": float(rel.max()) if len(rel) else float("nan"),
        "median_rel_diff_feature_rows": float(np.median(rel)) if len(rel) else float("nan"),
        "worst_row": list(feat[both][worst].tolist()) if worst >= 0 else None,
        "max_rel_absent_columns": float(miss_rel.max()) if len(miss_rel) else float("nan"),
        "max_rel_diff_logit_rows": max(lrows) if lrows else float("nan"),
    }


# ------------------------------------------------------------------------------------------
# The driver


def run_worker(tool: str, a: argparse.Namespace, ids: list[int], **kw) -> dict:
    py = a.ct_python if tool == "ct" else sys.executable
    cmd = [
        py,
        __file__,
        f"--worker={tool}",
        f"--ids={json.dumps(ids)}",
        f"--plt={a.plt}",
        f"--hf-dir={a.hf_dir}",
        f"--threads={a.threads}",
        f"--batch-size={a.batch_size}",
        f"--repeats={kw.get('repeats', a.repeats)}",
    ]
    if kw.get("max_feature_nodes"):
        cmd.append(f"--max-feature-nodes={kw['max_feature_nodes']}")
    if kw.get("save"):
        cmd.append(f"--save={kw['save']}")
    if a.max_batch_tokens:
        cmd.append(f"--max-batch-tokens={a.max_batch_tokens}")
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    env["PYTHONPATH"] = ""
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT.parent)
    if p.returncode != 0:
        raise SystemExit(f"{tool} worker failed:\n{p.stderr[-4000:]}")
    line = [x for x in p.stdout.splitlines() if x.startswith("{")][-1]
    return json.loads(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=["adag", "ct"])
    ap.add_argument("--ids")
    ap.add_argument("--save")
    ap.add_argument("--plt", default=str(RESULTS / "random-plt"))
    ap.add_argument("--hf-dir", default=str(RESULTS / "smollm2-hf"))
    ap.add_argument("--ct-python", default="/tmp/ctvenv/bin/python")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--max-batch-tokens",
        type=int,
        default=0,
        help="adag's cap on rows x tokens per pass; 0: batch_size x T (the same batch size)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-feature-nodes", type=int, default=None)
    ap.add_argument("--lengths", default="16,32,64,128,256")
    ap.add_argument("--sweep-max-features", type=int, default=2000)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: prompts,sweep")
    a = ap.parse_args()
    if a.worker:
        fn = worker_adag if a.worker == "adag" else worker_ct
        print(json.dumps(fn(a)))
        return

    from transformers import AutoTokenizer

    make_hf_dir(Path(a.hf_dir))
    tok = AutoTokenizer.from_pretrained(str(_smollm2_dir()))
    out_dir = RESULTS / "transcoders"
    out_dir.mkdir(parents=True, exist_ok=True)
    record: dict = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "load_before": os.getloadavg(),
        "threads": a.threads,
        "batch_size": a.batch_size,
    }
    skip = set(a.skip.split(","))
    if "prompts" not in skip:
        print(
            f"\nthree prompts: all active features, no thresholds, batch {a.batch_size}, "
            f"{a.threads} threads, best of {a.repeats}"
        )
        print(
            "| prompt | tokens | features (adag / ct) | adag time | ct time | speed-up | "
            "adag peak | ct peak | mem ratio | max rel diff (feature rows) | logit rows |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        rows = []
        for i, text in enumerate(PROMPTS):
            ids = [BOS, *tok(text, add_special_tokens=False)["input_ids"]]
            fa, fc = out_dir / f"adag_{i}.npz", out_dir / f"ct_{i}.npz"
            ra = run_worker("adag", a, ids, save=fa)
            rc = run_worker("ct", a, ids, save=fc)
            cmp = compare(fa, fc)
            ta, tc_ = min(ra["times"]), min(rc["times"])
            ma = ra["trace_peak_mb"] - ra["rss_before_mb"]
            mc = rc["trace_peak_mb"] - rc["rss_before_mb"]
            rows.append({"prompt": text, "ids": ids, "adag": ra, "ct": rc, "compare": cmp})
            print(
                f"| {text[:28]}… | {len(ids)} | {ra['n_features']} / {rc['n_features']} | "
                f"{ta:.2f} s | {tc_:.2f} s | {tc_ / ta:.2f}x | {ra['trace_peak_mb']:.0f} MB "
                f"(+{ma:.0f}) | {rc['trace_peak_mb']:.0f} MB (+{mc:.0f}) | "
                f"{ra['trace_peak_mb'] / rc['trace_peak_mb']:.2f} | "
                f"{cmp['max_rel_diff_feature_rows']:.2e} | {cmp['max_rel_diff_logit_rows']:.2e} |",
                flush=True,
            )
            print("   ", json.dumps(cmp), flush=True)
        record["prompts"] = rows
    if "sweep" not in skip:
        print(
            f"\nlength sweep: max_feature_nodes={a.sweep_max_features}, no thresholds, batch "
            f"{a.batch_size}, one run each"
        )
        print("| tokens | adag time | ct time | speed-up | adag peak (+trace) | ct peak (+trace) |")
        print("|---|---|---|---|---|---|")
        long_ids = tok(LONG_TEXT, add_special_tokens=False)["input_ids"]
        sweep = []
        for n in [int(x) for x in a.lengths.split(",")]:
            ids = [BOS, *long_ids[: n - 1]]
            assert len(ids) == n, (len(ids), n)
            kw = {"repeats": 1, "max_feature_nodes": a.sweep_max_features}
            ra = run_worker("adag", a, ids, **kw)
            rc = run_worker("ct", a, ids, **kw)
            ta, tc_ = ra["times"][0], rc["times"][0]
            sweep.append({"tokens": n, "adag": ra, "ct": rc})
            print(
                f"| {n} | {ta:.1f} s | {tc_:.1f} s | {tc_ / ta:.2f}x | "
                f"{ra['trace_peak_mb']:.0f} MB (+{ra['trace_peak_mb'] - ra['rss_before_mb']:.0f}) "
                f"| {rc['trace_peak_mb']:.0f} MB (+{rc['trace_peak_mb'] - rc['rss_before_mb']:.0f}) |",
                flush=True,
            )
        record["sweep"] = sweep
    record["load_after"] = os.getloadavg()
    print(f"\nload average before {record['load_before']}, after {record['load_after']}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out_dir / f"bench-{stamp}.json").write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
