"""Image preprocessing on the host: decode, resize, crop, flip, jitter, normalise.

Everything here works on numpy arrays in HWC layout (height, width, RGB) and
runs inside the input pipeline's worker processes, so it uses PIL and numpy
only (no JAX). Pixel values are uint8 0..255 until `normalize`, which returns
float32 ImageNet-normalised values.

The training protocol of SPEC 2 is: resize to 512 high x 384 wide (a squash
for KonIQ's 1024x768 landscape photos), random 224 crop, horizontal flip,
optional colour jitter, normalise. Test: the same resize, crops of 224, the
score is the mean over the crops.
"""

from __future__ import annotations

import io
import math
import os
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

# KonIQ protocol of SPEC 2: torchvision Resize((512, 384)) is (height, width).
KONIQ_RESIZE = (512, 384)
# How many of a crop's symmetries a test-time score may average over: the crop (1), with
# its mirror image (2), its four 90-degree rotations (4), or all eight (models.smartiqa.
# symmetric_views).
SYMMETRIES = (1, 2, 4, 8)

# A resize spec: (height, width) squashes to that size; an int resizes the
# shorter side to it keeping the aspect ratio; None keeps the decoded size.
ResizeSpec = Union[tuple[int, int], int, None]


class ImageDecodeError(ValueError):
    """An image file could not be turned into RGB pixels; names file and cause."""


def read_bytes(image: Union[bytes, str, os.PathLike]) -> bytes:
    """Returns encoded bytes given either the bytes themselves or a file path."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, np.ndarray) and image.dtype == object:  # tfds scalar
        return bytes(image.item())
    with open(image, 'rb') as f:
        return f.read()


def _sixteen_bit_to_uint8(img: Image.Image, file_format: str | None = None) -> np.ndarray:
    """Single-channel 16/32-bit or float image -> uint8 (H, W).

    PIL's own convert('L') clips these instead of scaling, which would turn a
    normal 16-bit photo white. file_format: the file's (PIL's img.format), read
    before any transpose (whose copy drops it): Pillow scales a 16-bit PGM/PPM
    to 0..65535 whatever its maximum, so a dark one is not 8-bit data.
    """
    values = np.asarray(img, dtype=np.float64)
    if img.mode == 'F':
        top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
    elif (img.mode.startswith('I;16') or file_format == 'PPM'
          or values.max(initial=0.0) > 255):
        top = 65535.0
    else:
        top = 255.0
    return np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL image -> uint8 (H, W, 3) RGB, honouring the EXIF orientation.

    Grayscale is replicated to three channels, CMYK/YCbCr/LAB are converted,
    palette images are expanded, transparency is composited over white (the
    colour hidden under alpha 0 is arbitrary, often black), and 16-bit or float
    single-channel images are scaled (not clipped) to 8 bits.
    """
    file_format = img.format
    img = ImageOps.exif_transpose(img)
    if img.mode in ('I', 'F') or img.mode.startswith('I;16'):
        gray = _sixteen_bit_to_uint8(img, file_format)
        return np.repeat(gray[:, :, None], 3, axis=2)
    has_alpha = img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or (
        img.mode == 'P' and 'transparency' in img.info)
    if has_alpha:
        rgba = img.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert('RGB'), dtype=np.uint8)


def decode_image(data: bytes, name: str = '<bytes>') -> np.ndarray:
    """Encoded image bytes -> uint8 (H, W, 3) RGB.

    Raises ImageDecodeError naming `name` when the bytes are empty, not an image,
    truncated or otherwise undecodable (PIL raises on truncation by default; the
    full decode happens here, not lazily later).
    """
    if not data:
        raise ImageDecodeError(f'{name}: empty file (0 bytes)')
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            pixels = to_rgb(img)
    except ImageDecodeError:
        raise
    except Exception as e:  # PIL raises many types for bad files.
        raise ImageDecodeError(f'{name}: cannot decode image ({type(e).__name__}: {e})') from e
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ImageDecodeError(f'{name}: image has zero size {pixels.shape[:2]}')
    return pixels


def resized_shape(height: int, width: int, resize: ResizeSpec, min_side: int = 0, *,
                  max_pixels: Optional[int] = None, name: str = '<image>') -> tuple[int, int]:
    """The (height, width) an image of the given size gets from `resize`.

    After the spec is applied, an image whose shorter side is below `min_side`
    (the crop size) is scaled up, keeping its aspect ratio, so a crop fits.
    Raises ImageDecodeError naming `name` and the sizes when the result has more
    pixels than the image and than `max_pixels` (None: PIL's Image.MAX_IMAGE_PIXELS;
    0: no limit), as a thin strip scaled up to `min_side` does.
    """
    if resize is None:
        out_h, out_w = height, width
    elif isinstance(resize, int):
        scale = resize / min(height, width)
        out_h, out_w = max(1, round(height * scale)), max(1, round(width * scale))
    else:
        out_h, out_w = int(resize[0]), int(resize[1])
    if min(out_h, out_w) < min_side:
        scale = min_side / min(out_h, out_w)
        out_h = max(min_side, round(out_h * scale))
        out_w = max(min_side, round(out_w * scale))
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if limit and out_h * out_w > max(limit, height * width):
        raise ImageDecodeError(
            f'{name}: resized image over the pixel limit ({height}x{width} to {out_h}x{out_w}, '
            f'height x width: {out_h * out_w} pixels > {limit})')
    return out_h, out_w


def resize_image(pixels: np.ndarray, resize: ResizeSpec, min_side: int = 0, *,
                 max_pixels: Optional[int] = None, name: str = '<image>') -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (h, w, 3) per `resized_shape` (ImageDecodeError from it).

    Bilinear with PIL's area-aware filter, as torchvision's PIL Resize does, so
    downscaled KonIQ images match what the released checkpoints saw.
    """
    h, w = resized_shape(pixels.shape[0], pixels.shape[1], resize, min_side,
                         max_pixels=max_pixels, name=name)
    if (h, w) == pixels.shape[:2]:
        return pixels
    img = Image.fromarray(pixels).resize((w, h), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def random_crop_offset(height: int, width: int, crop: int,
                       rng: np.random.Generator) -> tuple[int, int]:
    """Uniform top-left (y, x) of a crop x crop window inside height x width."""
    return (int(rng.integers(0, height - crop + 1)),
            int(rng.integers(0, width - crop + 1)))


def center_crop_offset(height: int, width: int, crop: int) -> tuple[int, int]:
    """Top-left (y, x) of the centred crop (torchvision rounding)."""
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def grid_crop_offsets(height: int, width: int, crop: int,
                      count: int) -> list[tuple[int, int]]:
    """`count` top-left (y, x) offsets on an evenly spaced rows x cols grid.

    rows x cols = count with rows the largest divisor <= sqrt(count) (20 -> 4x5;
    a prime count gives one row). The grid spans the image from edge to edge; an axis
    with a single position has it centred (as `center_crop_offset`).
    """
    rows = max(r for r in range(1, int(math.isqrt(count)) + 1) if count % r == 0)
    cols = count // rows
    if height > width:  # put the longer grid side along the longer image side
        rows, cols = cols, rows

    def positions(length: int, n: int) -> list[int]:
        if n == 1:
            return [int(round((length - crop) / 2.0))]
        return [int(v) for v in np.linspace(0, length - crop, n).round()]
    return [(y, x) for y in positions(height, rows) for x in positions(width, cols)]


def jpeg_aligned_offset(offset: tuple[int, int], height: int, width: int,
                        crop: int) -> tuple[int, int]:
    """Moves a crop's top-left (y, x) to 2 past a multiple of 4, the nearest such place below.

    In a JPEG used at its stored size the 8x8 block edges (16x16 for subsampled colour)
    then lie between the 2nd and 3rd pixel of every other one of Swin's 4x4 patches,
    in every crop and after any flip or quarter turn of it, so the patch embedding sees
    the blocking at one fixed place instead of at any of four, or on a patch border,
    where no single patch shows it. An axis with no such position in range (an image
    less than 3 pixels larger than the crop) keeps its offset.
    """
    def align(value: int, room: int) -> int:
        aligned = value - (value - 2) % 4
        if aligned < 0:
            aligned += 4
        return aligned if aligned <= room else value

    return align(offset[0], height - crop), align(offset[1], width - crop)


def crop(pixels: np.ndarray, offset: tuple[int, int], size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3) view at top-left `offset`."""
    y, x = offset
    if y < 0 or x < 0 or y + size > pixels.shape[0] or x + size > pixels.shape[1]:
        raise ValueError(f'crop {size} at {offset} does not fit image {pixels.shape[:2]}')
    return pixels[y:y + size, x:x + size]


def color_jitter(pixels: np.ndarray, rng: np.random.Generator,
                 brightness: float = 0.1, contrast: float = 0.1,
                 saturation: float = 0.1, hue: float = 0.05) -> np.ndarray:
    """torchvision-style ColorJitter on uint8 (H, W, 3), in a random order.

    Brightness/contrast/saturation factors are uniform in [1-a, 1+a]; hue shifts
    by a uniform fraction of the colour circle in [-hue, hue]. SPEC 2's optional
    jitter is (0.1, 0.1, 0.1, 0.05), the defaults here.
    """
    img = Image.fromarray(pixels)

    def adjust_hue(im: Image.Image, shift: float) -> Image.Image:
        h, s, v = im.convert('HSV').split()
        # PIL's uint8 hue wraps around the circle, like torchvision's PIL path.
        shifted = np.asarray(h, np.int16) + int(round(shift * 255))
        h = Image.fromarray(shifted.astype(np.uint8), 'L')
        return Image.merge('HSV', (h, s, v)).convert('RGB')

    ops = [
        lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(1 - brightness, 1 + brightness)),
        lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(1 - contrast, 1 + contrast)),
        lambda im: ImageEnhance.Color(im).enhance(rng.uniform(1 - saturation, 1 + saturation)),
        lambda im: adjust_hue(im, rng.uniform(-hue, hue)),
    ]
    for i in rng.permutation(len(ops)):
        img = ops[i](img)
    return np.asarray(img, dtype=np.uint8)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) 0..255 -> float32 (..., 3): (x/255 - ImageNet mean) / std."""
    return ((pixels.astype(np.float32) / 255.0) - IMAGENET_MEAN) / IMAGENET_STD


def denormalize(images: np.ndarray) -> np.ndarray:
    """Inverse of `normalize`: float32 (..., 3) -> uint8 (..., 3)."""
    values = (np.asarray(images, np.float32) * IMAGENET_STD + IMAGENET_MEAN) * 255.0
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


def parse_resize(value: Union[str, int, Sequence[int], None]) -> ResizeSpec:
    """Config value -> ResizeSpec: 'koniq' | 'none' | 'HxW' | int | (h, w) | None."""
    if value is None or value == 'none':
        return None
    if value == 'koniq':
        return KONIQ_RESIZE
    if isinstance(value, str):
        if 'x' in value:
            h, w = value.lower().split('x')
            return int(h), int(w)
        return int(value)
    if isinstance(value, int):
        return value
    h, w = value
    return int(h), int(w)
