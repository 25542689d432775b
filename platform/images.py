"""Image pixels: how an image file becomes the uint8 array the data cache keeps, and the training
augmentation drawn per task. Training (platform.data, platform.tasks) and adaptation
(platform.learner) call the same functions, so a user's image is converted exactly as the
training data was. No torch here: checking a config imports this module.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from platform.streams import Stream

CHANNELS = (1, 3)  # grayscale drawings (Omniglot's way) or RGB photographs


class DataError(Exception):
    """A data source is missing or broken; the message says which file, what is wrong and what to do."""


@dataclass(frozen=True)
class ImageFormat:
    """What every image is converted to: `size` x `size` pixels, 1 channel (grayscale, inverted so
    that ink is high, as Omniglot, unless `invert` is off) or 3 (RGB, as it is, whatever `invert`).
    The default is Omniglot's 28x28 grayscale."""

    size: int = 28
    channels: int = 1
    invert: bool = True

    @property
    def shape(self) -> tuple[int, int, int]:
        """One image as the model takes it: (channels, size, size)."""
        return (self.channels, self.size, self.size)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """One image as the cache keeps it: (size, size) grayscale, (3, size, size) RGB."""
        return self.shape[1:] if self.channels == 1 else self.shape

    @property
    def preprocessing(self) -> str:
        """Part of every cache key: it changes whenever the conversion does (28x28 grayscale keeps the
        key it had before RGB existed, and inverted grayscale the key it had before `invert`, so
        existing caches stay valid)."""
        if self.channels == 1:
            return f"v1 grayscale, LANCZOS {self.size}x{self.size}" + (", inverted" if self.invert else "")
        return f"v1 RGB, LANCZOS {self.size}x{self.size}"

    def decode(self, read: Callable[[], bytes | np.ndarray], where: str) -> np.ndarray:
        """One image as uint8 of `stored_shape`, from its file's bytes or from its pixels (uint8 (H, W, 3)
        or (H, W), as data sets shipped as arrays hold them): transparent parts white, LANCZOS-resized
        (aspect ratio not kept); grayscale is inverted (ink high) unless `invert` is off, RGB is kept as
        it is (channels first)."""
        mode = "L" if self.channels == 1 else "RGB"
        try:
            content = read()
            opened = Image.fromarray(content) if isinstance(content, np.ndarray) else Image.open(io.BytesIO(content))
            with opened as img:
                if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                    img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
                small = img.convert(mode).resize((self.size, self.size), Image.Resampling.LANCZOS)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, Image.DecompressionBombError) as e:
            raise DataError(f"{where}: cannot read the image ({e}); replace or remove the file") from None
        pixels = np.asarray(small, dtype=np.uint8)
        if self.channels == 3:
            return np.ascontiguousarray(pixels.transpose(2, 0, 1))
        return 255 - pixels if self.invert else pixels


OMNIGLOT_FORMAT = ImageFormat()  # 28x28 grayscale, ink high


def augment(images: np.ndarray, stream: Stream, crop_padding: int, flip: bool) -> np.ndarray:
    """Training augmentation of uint8 images (n, [C,] H, W): per image a random crop of the image padded
    with `crop_padding` black pixels on each side, then a horizontal flip with probability 1/2 (as
    torchvision's RandomCrop(padding) and RandomHorizontalFlip). Every draw comes from `stream`, so a
    task's augmentation is a function of its seed like the rest of it."""
    out = images
    n, height, width = len(images), images.shape[-2], images.shape[-1]
    if crop_padding:
        pad = [(0, 0)] * (images.ndim - 2) + [(crop_padding, crop_padding)] * 2
        padded = np.pad(images, pad)
        offsets = np.array(stream.below([2 * crop_padding + 1] * (2 * n))).reshape(n, 2)
        out = np.stack([padded[i, ..., y : y + height, x : x + width] for i, (y, x) in enumerate(offsets)])
    if flip:
        flipped = np.array(stream.below([2] * n), dtype=bool)
        out = out.copy() if out is images else out
        out[flipped] = out[flipped][..., ::-1]
    return out
