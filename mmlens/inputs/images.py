"""Images as the HF processors read them correctly: 8-bit, from a file, never from the network.

The processors rescale every image by 1/255, so an image already in [0, 1] would turn black, and
PIL clips 16-bit images to white when it converts them to RGB. `as_image` converts such inputs to
8 bits first (the rule is in docs/semantics.md, "Images"), opens local paths, and refuses URLs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def as_image(image: Any) -> Image.Image | np.ndarray:
    """An image the HF processor reads as meant: a PIL image, or a uint8 array in the given layout.

    - A path (`str` or `pathlib.Path`) is opened with PIL; a URL is refused (mmlens never
      fetches anything).
    - Float arrays/tensors must hold values in [0, 1]; they become ``round(255 * x)``.
    - 16-bit images (PIL modes ``I;16*`` and ``I``, uint16 arrays) become ``round(x / 257)``.
    - Other integer arrays must hold values in [0, 255].
    - 8-bit PIL images and uint8 arrays are returned as they are.

    Examples:
        >>> as_image(np.full((4, 4, 3), 0.5)).dtype    # a float image in [0, 1]
        dtype('uint8')
    """
    if isinstance(image, (str, os.PathLike)):
        image = _open(image)
    if isinstance(image, Image.Image):
        if 0 in image.size:
            raise ValueError(f"the image is {image.width}x{image.height}: it has no pixels")
        return _eight_bit_pil(image)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        _check_array_shape(image)
        return _eight_bit_array(image)
    raise TypeError(
        f"cannot read an image of type {type(image).__name__}: pass a PIL image, a path, or an "
        "array/tensor (uint8, or float in [0, 1])"
    )


def without_alpha(images: Any) -> Any:
    """`images` (one, a list, or lists of them) with every PIL image that has an alpha channel
    (or a transparent palette colour) converted by ``convert("RGB")``, which drops the alpha as
    the original LLaVA code does (its images are opened with ``Image.open(...).convert("RGB")``);
    Hugging Face's processors blend such images onto white instead. Paths are opened first.
    Used under the papers' presets (docs/semantics.md, "Images").

    >>> without_alpha(Image.new("RGBA", (2, 2))).mode
    'RGB'
    """
    if isinstance(images, (list, tuple)):
        return type(images)(without_alpha(image) for image in images)
    if isinstance(images, (str, os.PathLike)) and not _URL.match(os.fspath(images)):
        images = _open(images)
    if isinstance(images, Image.Image) and (
        "A" in images.getbands() or "transparency" in images.info
    ):
        return images.convert("RGB")
    return images


def _check_array_shape(array: np.ndarray) -> None:
    """An image array is ``[height, width]`` or has 1 or 3 channels first or last, and pixels."""
    if array.ndim not in (2, 3):
        raise ValueError(
            f"an image array has 2 or 3 dimensions ([height, width] or with channels), got "
            f"shape {tuple(array.shape)}"
        )
    if array.size == 0:
        raise ValueError(f"the image array has shape {tuple(array.shape)}: it has no pixels")
    if array.ndim == 3 and array.shape[-1] not in (1, 3) and array.shape[0] not in (1, 3):
        channels = array.shape[-1] if array.shape[-1] <= 4 else array.shape[0]
        hint = (
            "; drop the alpha channel (array[..., :3]) or pass Image.fromarray(array, 'RGBA')"
            if channels == 4
            else ""
        )
        raise ValueError(
            f"an image array of shape {tuple(array.shape)} has {channels} channels; pass 1 or 3 "
            f"channels (first or last){hint}"
        )


def processor_arguments(images: Any, text: Any) -> tuple[list, list[str]]:
    """A processor call's `images` (None, one image, or a list) and `text` (a string or a list)
    as two lists, as HF processors accept them.

    >>> processor_arguments(None, "Why?")
    ([], ['Why?'])
    """
    texts = [text] if isinstance(text, str) else list(text or [])
    if images is None:
        return [], texts
    return (list(images) if isinstance(images, (list, tuple)) else [images]), texts


def _open(path: str | os.PathLike) -> Image.Image:
    text = os.fspath(path)
    if _URL.match(text):
        raise ValueError(
            f"image {text!r} is a URL; mmlens never fetches anything. Download the image and "
            "pass its local path or a PIL image"
        )
    file = Path(text).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"image file {file} does not exist")
    with Image.open(file) as opened:
        opened.load()
        return opened.copy()


def _eight_bit_pil(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        return Image.fromarray(_sixteen_to_eight(np.asarray(image), f"PIL mode {image.mode}"))
    if image.mode == "F":
        return Image.fromarray(_unit_float_to_eight(np.asarray(image), "PIL mode F"))
    return image


def _eight_bit_array(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        raise ValueError("a boolean array is not an image; pass uint8 values or floats in [0, 1]")
    if np.issubdtype(array.dtype, np.floating):
        return _unit_float_to_eight(array, f"a {array.dtype} array")
    if array.dtype == np.uint16:
        return _sixteen_to_eight(array, "a uint16 array")
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"an {array.dtype} image with values in [{low}, {high}]: pass 8-bit values "
                "(0..255), a uint16 array for 16-bit images, or floats in [0, 1]"
            )
        return array.astype(np.uint8)
    raise TypeError(f"cannot read an image array of dtype {array.dtype}")


def _unit_float_to_eight(array: np.ndarray, what: str) -> np.ndarray:
    low, high = float(np.nanmin(array)), float(np.nanmax(array))
    if np.isnan(array).any() or low < 0.0 or high > 1.0:
        raise ValueError(
            f"{what} must hold values in [0, 1] (got [{low:g}, {high:g}]); for 0..255 values "
            "pass a uint8 array (array.astype(np.uint8))"
        )
    return np.round(array.astype(np.float64) * 255).astype(np.uint8)


def _sixteen_to_eight(array: np.ndarray, what: str) -> np.ndarray:
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 65535:
        raise ValueError(f"{what} with values in [{low}, {high}] is not a 16-bit image")
    return np.round(array.astype(np.float64) / 257).astype(np.uint8)
