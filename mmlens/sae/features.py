"""Features over images: a feature's activation on each image patch (`patch_activations`), the
rows the runner's ``sae-features`` experiment streams per sample (`feature_rows`) and the
dashboard table of each feature's top samples and patches (`top_activations`)."""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mmlens.sae.autoencoder import SparseAutoencoder


def patch_activations(
    model: Any, inp: Any, sae: SparseAutoencoder
) -> Float[Tensor, "batch rows cols d_sae"]:
    """Every feature's activation on every patch token of each prompt's image, on the image's
    patch grid (`inp.layout.patch_grid`). One image per prompt; the SAE reads a decoder hook of
    the model, whose activation at the image tokens it encodes. Where the image tokens are
    learned queries (`model.image_tokens_are_patches` False), each query's activation is spread
    to the vision tower's patches as the family's `tokens_to_patches` weighs them (the
    connector's cross-attention), on the vision grid, as LLaVA-CAM's maps are.

    Examples:
        >>> from mmlens.sae import patch_activations
        >>> grids = patch_activations(model, inp, mmlens.sae.load("tiny-shapes-sae"))
        >>> grids.shape                      # [batch, rows, cols, d_sae]
        torch.Size([1, 8, 8, 256])
    """
    with torch.no_grad():
        cache = _cached(model, inp, sae)
        return _patch_grids(model, inp, cache, sae)


def _cached(model: Any, inp: Any, sae: SparseAutoencoder) -> Any:
    """One forward pass caching the SAE's hook and what the family spreads image tokens to the
    patches with (none where image tokens are patches)."""
    names = [sae.cfg.hook_name, *model.spread_hook_names()]
    return model.run_with_cache(inp, names_filter=names)[1]


def _patch_grids(model: Any, inp: Any, cache: Any, sae: SparseAutoencoder) -> Tensor:
    if inp.n_images != inp.batch_size:
        raise ValueError(
            f"SAE features over image patches take one image per prompt; this input has "
            f"{inp.n_images} image(s) for {inp.batch_size} prompt(s)"
        )
    activation = cache[sae.cfg.hook_name]
    grids = []
    for item in range(inp.batch_size):
        image = inp.image_items.index(item)
        if model.image_tokens_are_patches:
            grid = inp.layout.patch_grid(image)
            grids.append(sae.encode(activation[item, grid.to(activation.device)]))
        else:  # learned queries: each query's activation spread to the patches it reads
            tokens = sae.encode(activation[item, inp.positions("image", item)]).float().cpu()
            spread = model.tokens_to_patches(cache, image).float().cpu()  # [token, patch]
            rows, cols = inp.image_geometry[image].vision_view.grid_size
            grids.append((spread.T @ tokens).reshape(rows, cols, -1))
    return torch.stack(grids)


def feature_rows(
    model: Any, inp: Any, sae: SparseAutoencoder, sample_ids: list[str]
) -> list[dict[str, Any]]:
    """One row per (sample, feature active on its image): the feature's largest activation over
    the image patches (``activation``), the patch where it is (``patch_row``,
    ``patch_col``), how many patches it is active on (``n_patches``) and its largest
    activation at the text positions after the image (question and answer prompt:
    ``text_activation``, at ``text_token``).

    Examples:
        >>> from mmlens.sae import feature_rows
        >>> rows = feature_rows(model, inp, mmlens.sae.load("tiny-shapes-sae"), ["s0"])
        >>> sorted(rows[0])
        ['activation', 'feature', 'n_patches', 'patch_col', 'patch_row', 'sample_id', 'text_activation', 'text_token']
    """
    with torch.no_grad():
        cache = _cached(model, inp, sae)
        grids = _patch_grids(model, inp, cache, sae)
    rows = []
    for item, sample_id in enumerate(sample_ids):
        grid = grids[item]
        cols = grid.shape[1]
        flat = grid.flatten(0, 1)  # [patches, d_sae]
        peak, where = flat.max(0)
        text = torch.cat([inp.positions(name, item) for name in ("question", "last")]).unique()
        with torch.no_grad():
            text_acts = sae.encode(cache[sae.cfg.hook_name][item, text])
        text_peak, text_where = text_acts.max(0)
        tokens = inp.input_ids[item, text].tolist()
        for feature in (peak > 0).nonzero().flatten().tolist():
            rows.append(
                {
                    "sample_id": sample_id,
                    "feature": feature,
                    "activation": peak[feature].item(),
                    "patch_row": int(where[feature]) // cols,
                    "patch_col": int(where[feature]) % cols,
                    "n_patches": int((flat[:, feature] > 0).sum()),
                    "text_activation": text_peak[feature].item(),
                    "text_token": model.tokenizer.decode([tokens[int(text_where[feature])]]),
                }
            )
    return rows


def top_activations(rows: pd.DataFrame, k: int = 10, by: str = "activation") -> pd.DataFrame:
    """Each feature's `k` samples with the largest `by` (``activation``: on the image patches;
    ``text_activation``: at the question), strongest first: the dashboard table (a feature's
    top samples and, per sample, its top patch).

    Examples:
        >>> from mmlens.sae import feature_rows, top_activations
        >>> sae = mmlens.sae.load("tiny-shapes-sae")
        >>> rows = pd.DataFrame(feature_rows(model, inp, sae, ["s0"]))
        >>> top = top_activations(rows, k=1)
        >>> len(top) == rows.feature.nunique(), int(top.groupby("feature").size().max())
        (True, 1)
    """
    if by not in rows.columns:
        raise ValueError(f"by={by!r} is not a column of the rows: {', '.join(rows.columns)}")
    ranked = rows.sort_values(["feature", by], ascending=[True, False])
    return ranked.groupby("feature", sort=True).head(k).reset_index(drop=True)
