"""Decoding of awkward images, resize rules, crop positions, normalisation."""

import io

import numpy as np
import pytest
from PIL import Image

from smartiqa_jax import preprocess


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def gradient(h=40, w=60) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 4, y * 6, np.full_like(x, 100)], -1).astype(np.uint8)


def test_rgb_png_roundtrip():
    pixels = gradient()
    out = preprocess.decode_image(encode(Image.fromarray(pixels), 'PNG'))
    assert out.dtype == np.uint8 and out.shape == (40, 60, 3)
    np.testing.assert_array_equal(out, pixels)


def test_grayscale_becomes_three_equal_channels():
    gray = Image.fromarray(gradient()[:, :, 0])
    out = preprocess.decode_image(encode(gray, 'PNG'))
    assert out.shape == (40, 60, 3)
    np.testing.assert_array_equal(out[:, :, 0], np.asarray(gray))
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])


def test_cmyk_jpeg_is_converted_to_rgb():
    rgb = Image.new('RGB', (32, 24), (200, 40, 40))
    out = preprocess.decode_image(encode(rgb.convert('CMYK'), 'JPEG', quality=100))
    assert out.shape == (24, 32, 3)
    assert np.abs(out.astype(int).mean((0, 1)) - [200, 40, 40]).max() < 12


def test_rgba_is_composited_over_white():
    pixels = np.zeros((10, 10, 4), np.uint8)
    pixels[..., 0] = 255
    pixels[:5, :, 3] = 255  # top half opaque red, bottom half transparent
    out = preprocess.decode_image(encode(Image.fromarray(pixels, 'RGBA'), 'PNG'))
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[9, 9], [255, 255, 255])


def test_palette_image_is_expanded():
    img = Image.fromarray(gradient()).convert('P', palette=Image.ADAPTIVE, colors=16)
    out = preprocess.decode_image(encode(img, 'PNG'))
    np.testing.assert_array_equal(out, np.asarray(img.convert('RGB')))


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    values = np.array([[0, 32896, 65535]], np.uint16)  # 0, 128*257, 255*257
    img = Image.fromarray(values)
    assert img.mode.startswith('I;16')
    out = preprocess.decode_image(encode(img, 'PNG'))
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255])
    # A dark 16-bit PGM (maxval 65535, values under 256): Pillow reads it as mode 'I',
    # already on 0..65535; it must not be taken for 8-bit data.
    dark = np.array([[0, 128, 200, 255]], '>u2')
    pgm = b'P5 4 1 65535\n' + dark.tobytes()
    np.testing.assert_array_equal(preprocess.decode_image(pgm)[0, :, 0], [0, 0, 1, 1])


def test_exif_orientation_is_applied():
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white
    img = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs 90 degrees clockwise
    out = preprocess.decode_image(encode(img, 'JPEG', exif=exif, quality=95))
    assert out.shape == (40, 20, 3)
    assert out[:20].mean() > 200 and out[20:].mean() < 50  # left became top


@pytest.mark.parametrize('data, match', [
    (b'', 'empty file'),
    (b'this is not an image', 'cannot decode'),
], ids=['empty', 'text'])
def test_undecodable_bytes_raise_naming_the_file(data, match):
    with pytest.raises(preprocess.ImageDecodeError, match=f'bad.jpg: {match}'):
        preprocess.decode_image(data, 'bad.jpg')


def test_truncated_jpeg_raises():
    data = encode(Image.fromarray(gradient(200, 200)), 'JPEG')
    with pytest.raises(preprocess.ImageDecodeError, match='x.jpg'):
        preprocess.decode_image(data[:len(data) // 2], 'x.jpg')


def test_resize_specs():
    assert preprocess.resized_shape(768, 1024, (512, 384)) == (512, 384)  # KonIQ squash
    assert preprocess.resized_shape(3000, 4000, 512) == (512, 683)      # shorter side
    assert preprocess.resized_shape(100, 150, None) == (100, 150)
    # Smaller than the crop: scaled up keeping the aspect ratio.
    assert preprocess.resized_shape(100, 150, None, min_side=224) == (224, 336)
    out = preprocess.resize_image(gradient(100, 150), None, min_side=224)
    assert out.shape == (224, 336, 3) and out.dtype == np.uint8
    assert preprocess.parse_resize('koniq') == (512, 384)
    assert preprocess.parse_resize('512x384') == (512, 384)
    assert preprocess.parse_resize(256) == 256 and preprocess.parse_resize('none') is None


def test_a_resize_to_more_pixels_than_the_limit_is_refused_naming_the_sizes():
    # A 1 x 400000 strip (1.2 KB as PNG) scaled up to the crop: 224 x 89.6M pixels.
    with pytest.raises(preprocess.ImageDecodeError, match=r'^line.png: resized image over the '
                       r'pixel limit \(1x400000 to 224x89600000, height x width'):
        preprocess.resized_shape(1, 400000, None, min_side=224, name='line.png')
    with pytest.raises(preprocess.ImageDecodeError, match=r'x.png: .* pixels > 1000\)$'):
        preprocess.resize_image(gradient(2, 100), 32, max_pixels=1000, name='x.png')
    # Within the limit, not growing the image, or no limit (0): as before.
    assert preprocess.resized_shape(100, 150, None, min_side=224,
                                    max_pixels=224 * 336) == (224, 336)
    assert preprocess.resized_shape(100, 150, (50, 60), max_pixels=1000) == (50, 60)
    assert preprocess.resized_shape(100, 150, None, max_pixels=1000) == (100, 150)
    assert preprocess.resized_shape(1, 400000, None, 224, max_pixels=0) == (224, 89600000)


def test_crop_offsets():
    assert preprocess.center_crop_offset(512, 384, 224) == (144, 80)
    grid = preprocess.grid_crop_offsets(512, 384, 224, 20)
    assert len(grid) == 20 and len(set(grid)) == 20
    assert grid[0] == (0, 0) and grid[-1] == (512 - 224, 384 - 224)
    # One position along an axis is the centred one, not the top or left edge.
    assert preprocess.grid_crop_offsets(512, 384, 224, 1) == [(144, 80)]
    assert preprocess.grid_crop_offsets(512, 384, 224, 5) == [
        (y, 80) for y in (0, 72, 144, 216, 288)]
    rng = np.random.default_rng(0)
    for _ in range(50):
        y, x = preprocess.random_crop_offset(300, 250, 224, rng)
        assert 0 <= y <= 76 and 0 <= x <= 26
    with pytest.raises(ValueError):
        preprocess.crop(np.zeros((100, 100, 3), np.uint8), (0, 0), 224)


def test_jpeg_aligned_offsets_put_block_edges_inside_patches():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(226, 400, 2))   # room to move
        offset = preprocess.random_crop_offset(h, w, 224, rng)
        y, x = preprocess.jpeg_aligned_offset(offset, h, w, 224)
        assert 0 <= y <= h - 224 and 0 <= x <= w - 224
        for value, moved in ((offset[0], y), (offset[1], x)):
            assert moved % 4 == 2 and abs(moved - value) < 4       # the nearest place below,
            assert moved <= value or value < 2                     # or above near the edge
        # The 8x8 grid of the stored JPEG, in crop coordinates: every edge (between
        # pixels e-1 and e) lies between a patch's 2nd and 3rd pixel, also after a flip.
        edges = [e - x for e in range(8, w, 8) if 0 < e - x < 224]
        assert edges and all(e % 4 == 2 for e in edges)
        assert all((224 - e) % 4 == 2 for e in edges)
    assert preprocess.jpeg_aligned_offset((0, 1), 224, 225, 224) == (0, 1)   # no room: kept
    assert preprocess.jpeg_aligned_offset((0, 1), 226, 226, 224) == (2, 2)   # moved up
    assert preprocess.jpeg_aligned_offset((7, 5), 240, 320, 224) == (6, 2)   # moved down


def test_normalize_and_back():
    pixels = np.array([[[124, 116, 104]]], np.uint8)  # ~ the ImageNet mean
    out = preprocess.normalize(pixels)
    assert out.dtype == np.float32 and np.abs(out).max() < 0.02
    white = preprocess.normalize(np.full((1, 1, 3), 255, np.uint8))
    expected = (1 - preprocess.IMAGENET_MEAN) / preprocess.IMAGENET_STD
    np.testing.assert_allclose(white[0, 0], expected, rtol=1e-6)
    roundtrip = preprocess.denormalize(preprocess.normalize(gradient()))
    np.testing.assert_array_equal(roundtrip, gradient())


def test_color_jitter_is_small_and_seeded():
    pixels = gradient()
    a = preprocess.color_jitter(pixels, np.random.default_rng(1))
    b = preprocess.color_jitter(pixels, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert a.shape == pixels.shape and a.dtype == np.uint8
    assert np.abs(a.astype(int) - pixels).mean() < 40
