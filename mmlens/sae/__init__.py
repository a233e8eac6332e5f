"""Sparse autoencoders and transcoders on a model's activations (docs/sae.md).

- `load` reads SAELens' folder format and Gemma Scope's releases natively (`sae_lens` is not
  needed, and does not import beside TransformerLens 4), and the zoo's SAEs by name; `save`
  writes SAELens' format.
- `SparseAutoencoder`: encode, decode and forward with SAELens' hook points.
- Splicing (`SAEScope`; on every model: `model.saes`, `model.run_with_saes`,
  `model.run_with_cache_with_saes`): the activation at the SAE's hook point is replaced by its
  reconstruction, the error term optional.
- `patch_activations`, `feature_rows` and `top_activations`: a feature's activation over the
  image patches, and the dashboard table of its top samples and patches (the runner's ``sae-features``
  experiment streams it over a data set); `mmlens.plot.feature_map` draws it on the image.
- `evaluate`: reconstruction, sparsity and spliced-in accuracy of an SAE, and the features
  that track the colour, shape and position of `mmlens.zoo.shapes` objects.
"""

from mmlens.sae.autoencoder import HOOK_POINTS, SAEConfig, SparseAutoencoder
from mmlens.sae.evaluation import evaluate
from mmlens.sae.features import feature_rows, patch_activations, top_activations
from mmlens.sae.formats import ZOO_SAES, load, save
from mmlens.sae.splice import SAEScope

__all__ = [
    "HOOK_POINTS",
    "SAEConfig",
    "SAEScope",
    "SparseAutoencoder",
    "ZOO_SAES",
    "evaluate",
    "feature_rows",
    "load",
    "patch_activations",
    "save",
    "top_activations",
]
