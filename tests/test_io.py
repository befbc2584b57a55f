from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidscan.data import io as cio
from covidscan.errors import ImageReadError

GRADIENT = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (32, 1))  # 32 x 64


@pytest.mark.parametrize(
    "mode,suffix",
    [("L", ".png"), ("LA", ".png"), ("P", ".png"), ("RGB", ".png"), ("RGBA", ".png"), ("RGB", ".jpg"), ("CMYK", ".jpg"), ("L", ".jpg")],
)
def test_every_8bit_mode_reads_as_the_same_gray(tmp_path: Path, mode: str, suffix: str) -> None:
    path = tmp_path / f"img{suffix}"
    Image.fromarray(GRADIENT, "L").convert(mode).save(path)
    data = cio.read_image(path)
    assert data.pixels.dtype == np.float32 and data.pixels.shape == (32, 64)
    assert 0.0 <= data.pixels.min() and data.pixels.max() <= 1.0
    tolerance = 3 / 255 if suffix == ".jpg" else 1 / 255
    np.testing.assert_allclose(data.pixels, GRADIENT / 255.0, atol=tolerance + (2 / 255 if mode == "CMYK" else 0))
    assert data.meta["mode"] == mode and data.meta["width"] == 64 and data.meta["height"] == 32


def test_transparent_rgba_composites_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, :4, 3] = 255  # left half opaque, right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    pixels = cio.read_image(tmp_path / "a.png").pixels
    assert pixels[:, :4].mean() == pytest.approx(200 / 255, abs=1e-3)
    assert pixels[:, 4:].max() == 0.0


def test_16_bit_png_keeps_its_range(tmp_path: Path) -> None:
    values = np.array([[0, 1000, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    data = cio.read_image(tmp_path / "deep.png")
    np.testing.assert_allclose(data.pixels, values / 65535.0, atol=1e-6)
    assert data.meta["bit_depth"] == 16


def test_resize_to_uint8(tmp_path: Path) -> None:
    Image.fromarray(GRADIENT, "L").save(tmp_path / "g.png")
    out = cio.load_resized(tmp_path / "g.png", 16)
    assert out.shape == (16, 16) and out.dtype == np.uint8
    assert out[:, 0].mean() < out[:, -1].mean()


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(GRADIENT, "L").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name,content,problem",
    [
        ("empty.png", b"", "empty"),
        ("text.png", b"this is not an image at all", "not a readable image"),
        ("truncated.png", _png_bytes()[:60], "corrupt or truncated"),
        ("notes.txt", b"hello", "unsupported file type"),
    ],
)
def test_bad_files_raise_one_clear_error_naming_the_file(tmp_path: Path, name: str, content: bytes, problem: str) -> None:
    path = _write(tmp_path, name, content)
    with pytest.raises(ImageReadError) as info:
        cio.read_image(path)
    assert str(path) in str(info.value) and problem in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="does not exist"):
        cio.read_image(tmp_path / "nope.png")


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    Image.new("L", (3000, 3000)).save(path)  # 9 Mpx, tiny on disk
    with pytest.raises(ImageReadError, match="decompression bomb"):
        cio.read_image(path, max_pixels=1_000_000)
