"""Train the shipped ``tiny-shapes-sae``: a ReLU sparse autoencoder on the ``tiny-shapes``
residual stream after layer 2 (``blocks.2.hook_resid_post``), image, question and last
positions.

    python -m train.train_sae                      # writes mmlens/zoo/tiny-shapes-sae/
    python -m train.train_sae --out /tmp/sae --steps 300   # a quick try elsewhere

SAELens does not install beside TransformerLens 4, so this is a short trainer in its image
(docs/sae.md, "Training"):

1. Activations: `mmlens.sae.evaluation.collect_activations` over ``--samples`` fresh samples of
   `mmlens.zoo.shapes` (dataset seed 1000 + seed, never an evaluation seed), held in memory
   (~60k vectors of 128 floats), scaled by one constant so that their mean norm is sqrt(d_in)
   (SAELens' ``expected_average_only_in``; the constant is folded into the weights at the end,
   so the saved SAE reads raw activations and says ``normalize_activations: "none"``).
2. Model: W_dec rows of norm 0.1 in random directions, W_enc = W_dec.T, b_enc = 0, b_dec = the
   mean activation (the April-update initialisation of Anthropic, as SAELens' "standard").
3. Loss: mean squared error summed over d_in + ``l1`` * sum_i |f_i| * ||W_dec[i]|| (the
   decoder-norm-weighted L1 penalty), its coefficient warmed up linearly over the first 5% of
   steps; Adam (lr 4e-3, betas 0.9, 0.999), the rate decayed linearly to 0 over the last 20%.
4. Saved with `mmlens.sae.save` (SAELens' format: cfg.json + sae_weights.safetensors), then
   evaluated on 256 held-out samples (dataset seed 7) with `mmlens.sae.evaluate`.

About five minutes on two busy CPU cores (a third of it the evaluation). Everything is seeded.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import mmlens
from mmlens.sae import SAEConfig, SparseAutoencoder, evaluate, save
from mmlens.sae.evaluation import collect_activations, feature_attributes

HOOK = "blocks.2.hook_resid_post"
DEFAULTS = dict(d_sae=256, samples=800, steps=2500, batch=512, lr=4e-3, l1=1.5, seed=0)


def train(
    out: Path, d_sae: int, samples: int, steps: int, batch: int, lr: float, l1: float, seed: int
) -> SparseAutoencoder:
    torch.manual_seed(seed)
    model = mmlens.load("tiny-shapes")
    data = mmlens.zoo.shapes.generate(samples, seed=1000 + seed)
    x = collect_activations(model, data, HOOK)
    scale = x.shape[1] ** 0.5 / x.norm(dim=-1).mean()  # expected_average_only_in
    x = x * scale
    print(f"{len(x)} activations of width {x.shape[1]}; input scale {scale:.4f}")
    d_in = x.shape[1]
    directions = torch.randn(d_sae, d_in)
    W_dec = torch.nn.Parameter(0.1 * directions / directions.norm(dim=-1, keepdim=True))
    W_enc = torch.nn.Parameter(W_dec.detach().T.clone())
    b_enc = torch.nn.Parameter(torch.zeros(d_sae))
    b_dec = torch.nn.Parameter(x.mean(0))
    parameters = [W_enc, b_enc, W_dec, b_dec]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    start = time.perf_counter()
    for step in range(steps):
        rows = x[torch.randint(len(x), (batch,))]
        acts = torch.relu((rows - b_dec) @ W_enc + b_enc)
        recons = acts @ W_dec + b_dec
        mse = (recons - rows).pow(2).sum(-1).mean()
        sparsity = (acts * W_dec.norm(dim=-1)).sum(-1).mean()
        coefficient = l1 * min(1.0, step / (0.05 * steps))
        loss = mse + coefficient * sparsity
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (steps - step) / (0.2 * steps))
        if step % 500 == 0 or step == steps - 1:
            l0 = (acts > 0).float().sum(-1).mean().item()
            variance = 1 - (recons - rows).pow(2).sum() / (rows - rows.mean(0)).pow(2).sum()
            print(
                f"step {step:5d}  mse {mse.item():.3f}  L0 {l0:.1f}  "
                f"explained variance {variance.item():.3f}  {time.perf_counter() - start:.0f}s"
            )
    # Fold the input scale in: the saved SAE reads raw activations.
    weights = dict(
        W_enc=W_enc.detach() * scale,
        b_enc=b_enc.detach(),
        W_dec=W_dec.detach() / scale,
        b_dec=b_dec.detach() / scale,
    )
    cfg = SAEConfig("standard", d_in, d_sae, HOOK, apply_b_dec_to_input=True)
    sae = SparseAutoencoder(cfg, weights)
    save(sae, out)
    held_out = mmlens.zoo.shapes.generate(256, seed=7)
    scores = evaluate(model, sae, held_out)
    print(json.dumps(scores, indent=2))
    table = feature_attributes(model, sae, held_out)
    print(table.head(20).to_string(index=False))
    return sae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(mmlens.__file__).parent / "zoo" / "tiny-shapes-sae"
    )
    for name, value in DEFAULTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train(args.out, **{name: getattr(args, name) for name in DEFAULTS})


if __name__ == "__main__":
    main()
