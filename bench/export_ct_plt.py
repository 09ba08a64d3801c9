"""Write a per-layer transcoder set that adag reads (e.g. the one ``adag train-transcoders`` made)
in circuit-tracer's ``transcoder_set`` layout, so that circuit-tracer 0.5.0 traces the same
transcoders in issue 12's benchmark (``bench/bench_transcoders.py --plt OUT``):

    OUT/config.yaml              model_kind: transcoder_set, feature_input_hook: mlp.hook_in, ...
    OUT/layer_{i}.safetensors    W_enc (d_transcoder, d_model), W_dec (d_transcoder, d_model),
                                 b_enc, b_dec, activation_function.threshold (JumpReLU)

Run with adag's venv: ``python bench/export_ct_plt.py SRC OUT``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import save_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="a transcoder directory adag reads")
    ap.add_argument("out")
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()

    import adag

    model = adag.load_model(args.model)
    tc = adag.load_transcoders(args.src, model)
    if tc.kind != "plt" or tc.activation != "jumprelu" or tc.W_skip is not None:
        raise SystemExit("only JumpReLU per-layer transcoders without skip weights are exported")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    assert tc.threshold is not None
    for i, layer in enumerate(tc.layers):
        tensors = {
            "W_enc": tc.W_enc[i].float().contiguous(),
            "W_dec": tc.W_dec[i].float().contiguous(),
            "b_enc": tc.b_enc[i].float().contiguous(),
            "b_dec": tc.b_dec[i].float().contiguous(),
            "activation_function.threshold": tc.threshold[i].float().contiguous(),
        }
        save_file(tensors, str(out / f"layer_{layer}.safetensors"))
    cfg = [
        "model_kind: transcoder_set",
        f"model_name: {model.name}",
        "feature_input_hook: mlp.hook_in",
        "feature_output_hook: mlp.hook_out",
        f"scan: {Path(args.src).name}",
        "transcoders:",
        *[f"  - layer_{layer}.safetensors" for layer in tc.layers],
    ]
    (out / "config.yaml").write_text("\n".join(cfg) + "\n", encoding="utf-8")
    print(f"wrote {len(tc.layers)} layers x {tc.d_features} features to {out}")


if __name__ == "__main__":
    main()
