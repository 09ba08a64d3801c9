"""The IOI pair for the TransformerLens comparison (``bench/tl_patching.py``), run in adag's venv.

Two modes:

* ``--out PAIR.json``: writes pair ``--index`` (default 3, 15 tokens) of ``make_task("ioi", model,
  4, seed=0)``: clean and noise token ids, answer (IO) and foil (S) ids, adag's clean logits at the
  last position (for checking the TL model) and the directory of the converted safetensors copy
  of the GGUF weights that adag loads (TL's venv builds its model from it).
* ``--tl TL.json``: times ``adag.patching.exhaustive(model, [pair], nodes="heads")`` at
  ``--threads`` torch threads (``--repeat`` times; the clean and noise runs are inside the timing,
  as they are in TL's) and prints the max abs difference of its effects against TL's.

    OMP_NUM_THREADS=1 .venv/bin/python bench/dump_ioi_pair.py --out /tmp/ioi_pair.json
    OMP_NUM_THREADS=1 .venv/bin/python bench/dump_ioi_pair.py --pair-json /tmp/ioi_pair.json \
        --tl /tmp/tl_result.json --json-out /tmp/adag_result.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the pair JSON here")
    ap.add_argument("--pair-json", help="read the pair from this JSON (with --tl)")
    ap.add_argument("--tl", help="TL results JSON to compare against")
    ap.add_argument("--json-out", help="write adag's timing and the comparison here")
    ap.add_argument("--index", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import adag
    from adag.models.load import ALIASES, find_alias_gguf, gguf_cache_path
    from adag.patching import exhaustive
    from adag.tasks import TokenizedPair, make_task, tokenize_pairs

    model = adag.load_model("smollm2-135m")
    if args.pair_json:
        d = json.loads(Path(args.pair_json).read_text())
        pairs = tokenize_pairs(model, make_task("ioi", model, d["n_pairs"], seed=d["seed"]))
        pair = pairs[d["index"]]
        assert pair.clean[0].tolist() == d["clean"] and pair.noise[0].tolist() == d["noise"]
    else:
        pairs = tokenize_pairs(model, make_task("ioi", model, 4, seed=0))
        pair = pairs[args.index]
    assert isinstance(pair, TokenizedPair)

    if args.out:
        gguf = find_alias_gguf(ALIASES["smollm2-135m"])
        assert gguf is not None
        with torch.no_grad():
            logits = model(pair.clean, last_only=True)[0, -1].double()
            noise_logits = model(pair.noise, last_only=True)[0, -1].double()
        a, f = pair.answer_id, pair.foil_id
        assert f is not None
        d = {
            "task": "ioi",
            "n_pairs": 4,
            "seed": 0,
            "index": args.index,
            "clean_text": pair.pair.clean,
            "noise_text": pair.pair.noise,
            "clean": pair.clean[0].tolist(),
            "noise": pair.noise[0].tolist(),
            "answer_id": a,
            "foil_id": f,
            "hf_dir": str(gguf_cache_path(gguf)),
            "clean_last_logits": logits.tolist(),
            "clean_metric": float(logits[a] - logits[f]),
            "noise_metric": float(noise_logits[a] - noise_logits[f]),
        }
        Path(args.out).write_text(json.dumps(d))
        print(f"wrote {args.out}: {pair.n_pos} tokens, clean {pair.pair.clean!r}")

    if args.tl:
        tl = json.loads(Path(args.tl).read_text())
        times, cpu = [], []
        scores = None
        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            scores = exhaustive(model, [pair], nodes="heads", batch_size=args.batch_size)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        assert scores is not None
        eff = np.asarray(tl["effects"], dtype=np.float64)  # layer, pos, head
        diffs = []
        for node, e in zip(scores.nodes, scores.per_pair[0], strict=True):
            kind, layer, pos, head, site = node.split(":")
            assert kind == "head" and site == "z", node
            diffs.append(abs(e - eff[int(layer), int(pos), int(head)]))
        adag_eff = scores.per_pair[0]
        out = {
            "adag_seconds": times,
            "adag_cpu_seconds": cpu,
            "adag_cost_forwards": scores.cost,
            "n_nodes": len(scores.nodes),
            "max_abs_diff": float(max(diffs)),
            "max_abs_effect": float(np.abs(adag_eff).max()),
            "tl_version": tl.get("tl_version"),
            "tl_seconds": tl.get("seconds"),
            "tl_cpu_seconds": tl.get("cpu_seconds"),
            "tl_best_group": tl.get("best_group"),
            "threads": torch.get_num_threads(),
        }
        print(json.dumps(out, indent=1))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
