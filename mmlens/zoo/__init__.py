"""Small trained models that ship inside the mmlens package, and the data they were trained on.

- ``"tiny-shapes"``: a LLaVA-1.5-style model (CLIP ViT, GELU projector, 6-layer Llama decoder,
  word-level tokenizer) trained from scratch on `mmlens.zoo.shapes` by
  `python -m train.train_shapes` (in the repository, not installed); see docs/zoo.md for its accuracy and ground-truth numbers.
- ``"tiny-shapes-routed"``: tiny-shapes retrained with the answer positions kept from the image
  (masked, then penalised for attending to it: `python -m train.train_shapes --routed`): image
  information must reach the answer through the question tokens. 99.9% accuracy on held-out
  samples (docs/zoo.md).
- ``"tiny-shapes-sae"``: a sparse autoencoder on tiny-shapes' ``blocks.2.hook_resid_post``
  (SAELens' format; `mmlens.sae.load("tiny-shapes-sae")`), trained by
  `python -m train.train_sae`; its evaluation is in docs/zoo.md.

`load(name)` resolves the name to the checkpoint folder inside the installed package and loads it
through `mmlens.from_pretrained`, the same path as any llava-hf checkpoint folder.

Examples:
    >>> model = mmlens.load("tiny-shapes")
    >>> sample = mmlens.zoo.shapes.generate(1, seed=0)[0]
    >>> inp = model.prepare(sample.image, sample.question)
    >>> model.to_string(model(inp)[0, -1].argmax()) == sample.answer
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmlens.models import HookedLlava, from_pretrained
from mmlens.zoo import shapes
from mmlens.zoo.catalog import MODELS

TRAINED_TEMPLATES = {"tiny-shapes": shapes.TEMPLATE, "tiny-shapes-routed": shapes.TEMPLATE}
"""The conversation each shipped model was trained with: its `prepare` default."""


def checkpoint_path(name: str) -> Path:
    """The folder of the shipped checkpoint `name` inside the installed package.

    Raises:
        ValueError: unknown name.
        FileNotFoundError: the package was installed without the checkpoint files.
    """
    if name not in MODELS:
        raise ValueError(f"unknown zoo model {name!r}; shipped models: {', '.join(sorted(MODELS))}")
    folder = Path(__file__).resolve().parent / name
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} holds no checkpoint: this installation of mmlens lacks the package data "
            f"of {name!r} (reinstall mmlens, or train it with `python -m train.train_shapes` (in the repository, not installed))"
        )
    return folder


def load(name: str = "tiny-shapes", **kwargs: Any) -> HookedLlava:
    """Load a shipped model through `mmlens.from_pretrained` (`kwargs`: ``dtype``, ``device``).

    Examples:
        >>> model = mmlens.load("tiny-shapes", dtype=torch.float32, device="cpu")
    """
    model = from_pretrained(checkpoint_path(name), **kwargs)
    model.default_template = TRAINED_TEMPLATES[name]
    return model
