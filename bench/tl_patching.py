"""Exhaustive head patching (hook_z, one head at one position, noising) with TransformerLens's
HookedTransformer, optimised by hand, for comparison with ``adag.patching.exhaustive``.

Runs in a separate venv with TransformerLens (not in adag's): see ``bench/dump_ioi_pair.py`` for
the pair JSON and the comparison. No hub access: the HookedTransformer is built from a hand-made
``HookedTransformerConfig`` (Llama architecture, SmolLM2-135M's numbers) and TL's Llama weight
converter applied to the transformers model that adag loads (its safetensors copy of the GGUF),
with no weight processing (no LayerNorm folding, no centering), so the numbers match HF.

The sweep, for every layer L, position p and head h: run the clean prompt with
``blocks.L.attn.hook_z[p, h]`` set to its value on the noise prompt and read
``logit(IO) - logit(S)`` at the last position; the effect is that minus the clean metric.
Savings (all exact):

* a head at a position before the first one where clean and noise differ has the same value in
  both runs: its effect is 0 and nothing is run;
* each patched forward starts at layer L (``forward(start_at_layer=L)``) from the clean
  ``resid_pre`` of layer L, and computes only positions from its first patched one on: the
  earlier positions' keys and values, of every layer, come from the clean run, through a frozen
  ``TransformerLensKeyValueCache`` sliced to that prefix;
* it stops after the last block (``stop_at_layer=n_layers``) and applies ``ln_final`` and the
  unembedding at the last position only;
* many patches share a forward as batch rows: the 9 heads at one (L, p), or (``--group K``)
  the heads at K neighbouring positions of one layer, started at the earliest of them (the later
  rows recompute a few clean positions; exact).

    OMP_NUM_THREADS=1 /tmp/tlvenv3/bin/python bench/tl_patching.py --pair-json /tmp/ioi_pair.json \
        --threads 1 --group 1 --out /tmp/tl_result.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch


def build(hf_dir: str):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    hc = AutoConfig.from_pretrained(hf_dir)
    rope = getattr(hc, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(hc, "rope_theta", None))
    assert rope.get("rope_type", "default") == "default" and rope_theta is not None
    hf = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    )
    hf.eval()
    n_heads = hc.num_attention_heads
    cfg = HookedTransformerConfig(
        d_model=hc.hidden_size,
        d_head=hc.head_dim,
        n_heads=n_heads,
        d_mlp=hc.intermediate_size,
        n_layers=hc.num_hidden_layers,
        n_ctx=2048,  # any length above the prompt's; sizes the rotary tables
        eps=hc.rms_norm_eps,
        d_vocab=hc.vocab_size,
        act_fn=hc.hidden_act,
        n_key_value_heads=hc.num_key_value_heads if hc.num_key_value_heads != n_heads else None,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=hc.head_dim,
        rotary_base=rope_theta,
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        default_prepend_bos=False,
        dtype=torch.float32,
        device="cpu",
    )
    model = HookedTransformer(cfg)
    sd = convert_llama_weights(hf, cfg)
    model.load_and_process_state_dict(
        sd,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    model.eval()
    return model, hf


def groups_for(layer_pos: list[int], n_heads: int, group: int, batch_size: int):
    """Forwards for one layer: (start, [(pos, head), ...]) — ``group`` neighbouring positions per
    forward (from the last position back), at most ``batch_size`` rows each."""
    out = []
    pos = sorted(layer_pos, reverse=True)
    for i in range(0, len(pos), group):
        block = sorted(pos[i : i + group])
        rows = [(p, h) for p in block for h in range(n_heads)]
        for j in range(0, len(rows), batch_size):
            chunk = rows[j : j + batch_size]
            out.append((min(p for p, _ in chunk), chunk))
    return out


def sweep(
    model, clean: torch.Tensor, noise: torch.Tensor, a: int, f: int, *, group: int, batch_size: int
):
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    cfg = model.cfg
    L_, H, T = cfg.n_layers, cfg.n_heads, clean.shape[1]
    t0 = time.perf_counter()
    c0 = time.process_time()
    with torch.no_grad():
        # clean run: resid_pre of every layer, and every layer's keys/values (TL caches them
        # before the rotary embedding; it is applied to the whole key sequence each forward)
        kv = TransformerLensKeyValueCache.init_cache(cfg, cfg.device, batch_size=1)
        clean_logits, clean_cache = model.run_with_cache(
            clean,
            names_filter=lambda n: n.endswith("hook_resid_pre"),
            past_kv_cache=kv,
            attention_mask=torch.ones_like(clean),  # TL needs one with a cache (no tokenizer)
        )
        base = float(clean_logits[0, -1, a] - clean_logits[0, -1, f])
        noise_logits, noise_cache = model.run_with_cache(
            noise, names_filter=lambda n: n.endswith("attn.hook_z")
        )
        noise_metric = float(noise_logits[0, -1, a] - noise_logits[0, -1, f])
        resid = [clean_cache[f"blocks.{L}.hook_resid_pre"] for L in range(L_)]
        z_noise = [noise_cache[f"blocks.{L}.attn.hook_z"][0] for L in range(L_)]  # pos head d
        differ = (clean != noise)[0].nonzero()
        first = int(differ[0]) if len(differ) else T
        t_setup = time.perf_counter() - t0

        effects = np.zeros((L_, T, H))
        n_forwards = 0
        row_positions = 0
        for L in range(L_):
            for start, rows in groups_for(list(range(first, T)), H, group, batch_size):
                B = len(rows)
                prefix = TransformerLensKeyValueCache(
                    entries=[
                        TransformerLensKeyValueCacheEntry(
                            past_keys=e.past_keys[:, :start].expand(B, -1, -1, -1),
                            past_values=e.past_values[:, :start].expand(B, -1, -1, -1),
                            frozen=True,
                        )
                        for e in kv.entries
                    ],
                    previous_attention_mask=kv.previous_attention_mask[:, :start].expand(B, -1),
                    frozen=True,
                )
                b_idx = torch.arange(B)
                p_abs = torch.tensor([p for p, _ in rows])
                h_idx = torch.tensor([h for _, h in rows])
                values = z_noise[L][p_abs, h_idx]  # B d_head

                def patch(z, hook, b_idx=b_idx, p_rel=p_abs - start, h_idx=h_idx, values=values):
                    z[b_idx, p_rel, h_idx] = values
                    return z

                x = resid[L][:, start:].expand(B, -1, -1)
                out = model.run_with_hooks(
                    x,
                    fwd_hooks=[(f"blocks.{L}.attn.hook_z", patch)],
                    start_at_layer=L,
                    stop_at_layer=L_,
                    past_kv_cache=prefix,
                )
                logits = model.unembed(model.ln_final(out[:, -1:]))[:, 0]
                m = (logits[:, a] - logits[:, f]).double().numpy() - base
                effects[L, p_abs.numpy(), h_idx.numpy()] = m
                n_forwards += 1
                row_positions += B * (T - start)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "cpu_seconds": time.process_time() - c0,
        "setup_seconds": t_setup,
        "sweep_seconds": seconds - t_setup,
        "clean_metric": base,
        "noise_metric": noise_metric,
        "first_diff": first,
        "n_forwards": n_forwards,
        "row_positions": row_positions,
        "effects": effects,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pair-json", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1024, help="most rows per forward")
    ap.add_argument(
        "--group",
        type=int,
        nargs="+",
        default=[1],
        help="neighbouring positions per forward (several: try each)",
    )
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    d = json.loads(Path(args.pair_json).read_text())
    clean = torch.tensor([d["clean"]])
    noise = torch.tensor([d["noise"]])
    a, f = d["answer_id"], d["foil_id"]
    model, hf = build(d["hf_dir"])

    with torch.no_grad():
        tl_logits = model(clean)[0, -1].double()
        hf_logits = hf(input_ids=clean).logits[0, -1].double()
    ref = torch.tensor(d["clean_last_logits"], dtype=torch.float64)
    check = {
        "tl_vs_hf_max_abs_logit_diff": float((tl_logits - hf_logits).abs().max()),
        "tl_vs_adag_max_abs_logit_diff": float((tl_logits - ref).abs().max()),
        "tl_clean_metric": float(tl_logits[a] - tl_logits[f]),
        "adag_clean_metric": d["clean_metric"],
    }
    print(json.dumps(check))
    del hf

    runs = []
    best = None
    for g in args.group:
        for _ in range(args.repeat):
            r = sweep(model, clean, noise, a, f, group=g, batch_size=args.batch_size)
            print(
                f"group {g}: {r['seconds']:.2f} s wall, {r['cpu_seconds']:.2f} s CPU "
                f"(setup {r['setup_seconds']:.2f} s), "
                f"{r['n_forwards']} forwards, {r['row_positions']} row-positions"
            )
            runs.append({k: v for k, v in r.items() if k != "effects"} | {"group": g})
            if best is None or r["seconds"] < best["seconds"]:
                best = r | {"group": g}
    assert best is not None
    eff = best["effects"]
    out = {
        "tl_version": importlib.metadata.version("transformer_lens"),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "patches": int(eff.size),
        "seconds": best["seconds"],
        "cpu_seconds": best["cpu_seconds"],
        "best_group": best["group"],
        "batch_size": args.batch_size,
        "runs": runs,
        "check": check,
        "effects_shape": "layer, pos, head",
        "effects": eff.tolist(),
    }
    Path(args.out).write_text(json.dumps(out))
    print(
        f"TL {out['tl_version']}: {out['patches']} patches in {out['seconds']:.2f} s "
        f"(group {best['group']}); wrote {args.out}"
    )


if __name__ == "__main__":
    main()
