"""The family contract: what a model family provides, so that loading, `prepare`, the
analyses, the plots, the presets and the runner never name a family (docs/architecture.md,
"The family contract" and "Adding a model family").

A family is one module (or folder) under `mmlens/models/` holding a `HookedLlava` subclass
registered for its HF `model_type`s (`mmlens.models.registry.register`). The class satisfies
`VisionLanguageFamily`; each `MultimodalInput.image_geometry` entry its `prepare` makes
satisfies `ImageTokenGeometry`. Both are `typing.Protocol`s, checked structurally
(tests/test_architecture.py checks every registered class and every geometry).

Examples:
    >>> from mmlens.models import MODEL_TYPES, HookedLlava
    >>> families = {cls for cls in MODEL_TYPES.values() if issubclass(cls, HookedLlava)}
    >>> all(isinstance(cls, VisionLanguageFamily) for cls in families)
    True
    >>> isinstance(inp.image_geometry[0], ImageTokenGeometry)
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from jaxtyping import Float, Int
from torch import Tensor

from mmlens.config import MMConfig
from mmlens.inputs.geometry import ImageGeometry
from mmlens.inputs.layout import Box, ImageTokenLayout


@runtime_checkable
class TileGrid(Protocol):
    """How a tiled image's crops become its high-resolution token grid (LLaVA-NeXT's
    `AnyresGrid`). The model packs its projected tile features with `pack`, and LLaVA-CAM packs
    vision-layer features with the same method, so the two cannot disagree."""

    n_tiles: int
    token_grid_size: tuple[int, int]
    first_tile_crop: int
    """Where the tiles start among the image's crops (its rows of ``pixel_values``): 1 after
    LLaVA-NeXT's base crop, 0 where the whole-image crop comes last (InternVL's thumbnail)."""

    def pack(
        self, tile_features: Float[Tensor, "tile patch d"]
    ) -> Float[Tensor, "token_rows token_cols d"]:
        """The tiles' patch features (crop order, row-major patches) as the token grid; where
        a connector merges patches into tokens, the vision tower's patch features as the grid
        of patches (`cells_per_token` finer)."""
        ...

    def describe(self) -> str:
        """The token grid in words, for figure captions ("unpadded tile grid", ...)."""
        ...


@runtime_checkable
class ImageTokenGeometry(Protocol):
    """Where one image's pixels go and which decoder tokens show them.

    `mmlens.inputs.ImageGeometry` (one crop, a token per patch) is the simplest; a family
    whose images are tiled or read through learned queries wraps it.
    """

    original_size: tuple[int, int]
    processed_size: tuple[int, int]
    n_crops: int
    """Crops the vision tower sees for this image (its pixel rows in `pixel_values`)."""
    vision_view: ImageGeometry
    """The first crop as the vision tower sees it: what vision-layer maps and figures show."""
    tile_grid: TileGrid | None
    """The high-resolution token grid of a tiled image, None otherwise."""

    def n_image_tokens(self, has_cls: bool) -> int:
        """The decoder's image tokens for this image."""
        ...

    def token_layout(
        self, *, item: int, image: int, positions: Int[Tensor, "n_image_tokens"], has_cls: bool
    ) -> ImageTokenLayout:
        """What each of this image's tokens (at `positions` of batch item `item`) shows."""
        ...

    def patch_ranges_per_grid(self, box: Box) -> dict[str, tuple[range, range]]:
        """Rows and columns of each token grid (``"base"``, ``"tiles"``) that `box` touches;
        an error that says why when no decoder token shows a patch."""
        ...


@runtime_checkable
class VisionLanguageFamily(Protocol):
    """What a family's model class provides beyond `HookedTransformer`.

    Loading: `config_from_hf` (its HF config as `MMConfig`: decoder, tower, connector),
    `weight_prefixes` and `weight_renames` (HF tensor names to mmlens ones, tried before the
    shared rules of `mmlens.loading`), `load_processor`. Modules: `build_connector` (projector,
    Q-Former, ...) and `encode_images` (pixels to the embeddings of the image slots, with the
    keywords named by `image_inputs`). Inputs: `prepare` (one image token shows a patch of
    `token_patch_size` pixels: the tower's, or a multiple where the connector merges), whose
    processor is read through the
    `mmlens.inputs.adapters.ProcessorAdapter` the family registers (which image options apply,
    the variant for them, each image's `ImageTokenGeometry`). Image tokens:
    `image_tokens_are_patches`, and where they are not, `spread_hook_names`,
    `tokens_to_patches` and `spread_note` (how maps over the tokens reach the patches).
    Pixels: `vision_patch_index` (where the vision tower's hooks hold an image's first crop,
    as its patch grid), `vision_pixels` (that crop as ``[channel, height, width]``, to draw) and
    `pixel_noise` (Gaussian noise on the [0, 1] image in the units and layout of
    ``pixel_values``), which LLaVA-CAM and its figure read.
    Papers: `paper_window_sizes` (the presets read them) and `default_template`, which
    `mmlens.inputs.templates.ORIGINAL_TEMPLATES` maps to the original conversation. Position
    ids: `position_ids` (`HookedTransformer`).
    """

    image_inputs: tuple[str, ...]
    image_tokens_are_patches: bool
    token_patch_size: int
    spread_note: str
    weight_prefixes: tuple[tuple[str, str], ...]
    weight_renames: tuple[tuple[str, str], ...]
    paper_window_sizes: Mapping[str, Mapping[str, int]]

    @classmethod
    def config_from_hf(cls, hf_config: Any, **overrides: Any) -> MMConfig: ...

    @classmethod
    def load_processor(cls, folder: Path, hf_config: Any) -> Any: ...

    def build_connector(self, cfg: MMConfig) -> None: ...

    def encode_images(self, pixel_values: Tensor, **image_kwargs: Any) -> Tensor: ...

    def prepare(self, images: Any, prompts: str | list[str], **kwargs: Any) -> Any: ...

    def spread_hook_names(self) -> list[str]: ...

    def tokens_to_patches(
        self, activations: Mapping[str, Tensor], image: int = 0
    ) -> Float[Tensor, "image_token patch"]: ...

    def vision_patch_index(
        self, inp: Any, image: int = 0
    ) -> tuple[int, Int[Tensor, "rows cols"]]: ...

    def vision_pixels(self, inp: Any, image: int = 0) -> Float[Tensor, "channel height width"]: ...

    def pixel_noise(self, pixel_values: Tensor, std: float, generator: Any) -> Tensor: ...
