"""The names of the shipped models, importing nothing: `mmlens.loading` names them in its
errors without importing the models (docs/zoo.md)."""

MODELS = {
    "tiny-shapes": "LLaVA-1.5-style model trained on mmlens.zoo.shapes (112 px, 64 image tokens)",
    "tiny-shapes-routed": "tiny-shapes retrained with its answer positions kept from the image: "
    "image information reaches the answer through the question tokens",
}
"""Names `mmlens.zoo.load` accepts, with a one-line description each."""
