"""Seeded random JumpReLU per-layer transcoders (PLTs) for SmolLM2-135M, written in circuit-tracer's
``transcoder_set`` layout so that circuit-tracer 0.5.0 and ``adag.load_transcoders`` read the same
files (issue 12's benchmark):

    OUT/config.yaml              model_kind: transcoder_set, feature_input_hook: mlp.hook_in,
                                 feature_output_hook: mlp.hook_out, transcoders: [layer_i paths]
    OUT/layer_{i}.safetensors    W_enc (d_transcoder, d_model), W_dec (d_transcoder, d_model),
                                 b_enc (d_transcoder,), b_dec (d_model,),
                                 activation_function.threshold (d_transcoder,)

Random is not meaningless here: each layer is calibrated on the model's real MLP inputs and outputs
(a fixed calibration text, not the benchmark prompts) so that the sparsity is realistic —

- encoder rows are random unit directions; ``b_enc = -W_enc @ mean(x)`` centres each
  pre-activation on the calibration tokens;
- each feature's threshold is ``mean + z · std`` of its pre-activation over the calibration
  tokens, with one ``z`` per layer set so that on average ``l0`` features of each layer fire per
  calibration token (``--l0 12`` over 30 layers: a few hundred active features per token; the
  benchmark prompts, being other text, fire somewhat more);
- decoder rows are random directions scaled so that a token's reconstruction has the RMS norm of
  the real MLP output; ``b_dec`` is the mean MLP output.

Run with adag's venv: ``python bench/make_random_plt.py [--out bench/results/random-plt]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

CALIBRATION = (
    "The history of the city begins with a small settlement on the river. Over the centuries "
    "merchants, farmers and craftsmen arrived, building markets, bridges and churches. In the "
    "nineteenth century the railway connected the town to the capital, and factories grew along "
    "the water. Today the old quarter is full of cafes and museums, while the new districts hold "
    "offices, schools and parks. Every summer a festival of music fills the squares, and visitors "
    "from many countries walk the narrow streets. def add(a, b):\n    return a + b\n\nprint(add(2, "
    "3))\nQuestion: What is 17 times 3? Answer: 51. The weather tomorrow will be sunny with a light "
    "breeze from the west, and temperatures will reach twenty degrees in the afternoon."
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="bench/results/random-plt")
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--l0", type=float, default=12.0, help="mean active features per layer/token")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import adag

    model = adag.load_model(args.model)
    L, d = model.n_layers, model.d_model
    ids = model.tok()(CALIBRATION)["input_ids"]
    tokens = torch.tensor([ids])
    ins = [f"blocks.{i}.mlp.hook_in" for i in range(L)]
    outs = [f"blocks.{i}.hook_mlp_out" for i in range(L)]
    with torch.no_grad(), model.sites(read=ins + outs) as run:
        model(tokens)
    # position 0 (BOS, whose stream is an outlier) is left out of the calibration statistics
    xs = [run.cache[s][0, 1:].double() for s in ins]  # (N, d)
    ys = [run.cache[s][0, 1:].double() for s in outs]
    n_tok = xs[0].shape[0]
    gen = torch.Generator().manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    F = args.features
    q = 1.0 - args.l0 / F
    stats = []
    for layer in range(L):
        x, y = xs[layer], ys[layer]
        W_enc = torch.randn(F, d, generator=gen, dtype=torch.float64)
        W_enc /= W_enc.norm(dim=1, keepdim=True)
        b_enc = -(W_enc @ x.mean(0))
        pre = x @ W_enc.T + b_enc  # (N, F)
        # a common z-score per layer (per-feature extreme quantiles of a few hundred tokens
        # are noise): threshold_f = mean_f + z · std_f, z set so the calibration rate is l0 / F
        z_all = (pre - pre.mean(0)) / pre.std(0).clamp_min(1e-12)
        z = float(torch.quantile(z_all.flatten()[:: max(1, z_all.numel() // 10**6)], q))
        thr = (pre.mean(0) + z * pre.std(0)).clamp_min(1e-6)
        act = pre * (pre > thr)
        l0 = float((act != 0).sum(1).double().mean())
        W_dec = torch.randn(F, d, generator=gen, dtype=torch.float64)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        b_dec = y.mean(0)
        target = (y - b_dec).norm(dim=1).mean()
        got = (act @ W_dec).norm(dim=1).mean().clamp_min(1e-12)
        W_dec *= target / got
        tensors = {
            "W_enc": W_enc.float().contiguous(),
            "W_dec": W_dec.float().contiguous(),
            "b_enc": b_enc.float().contiguous(),
            "b_dec": b_dec.float().contiguous(),
            "activation_function.threshold": thr.float().contiguous(),
        }
        save_file(tensors, str(out / f"layer_{layer}.safetensors"))
        stats.append({"layer": layer, "l0_calibration": round(l0, 2)})
    cfg = [
        "model_kind: transcoder_set",
        f"model_name: {model.name}",
        "feature_input_hook: mlp.hook_in",
        "feature_output_hook: mlp.hook_out",
        f"scan: random-plt-seed-{args.seed}",
        "transcoders:",
        *[f"  - layer_{i}.safetensors" for i in range(L)],
    ]
    (out / "config.yaml").write_text("\n".join(cfg) + "\n", encoding="utf-8")
    (out / "stats.json").write_text(
        json.dumps({"calibration_tokens": n_tok, "args": vars(args), "layers": stats}, indent=1),
        encoding="utf-8",
    )
    mean_l0 = sum(s["l0_calibration"] for s in stats) / L
    print(f"wrote {L} layers x {F} features to {out}; calibration tokens {n_tok}")
    print(f"mean L0 per layer on calibration tokens: {mean_l0:.1f} (x {L} layers per token)")


if __name__ == "__main__":
    main()
