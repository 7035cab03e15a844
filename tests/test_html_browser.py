"""The HTML report in a real browser (issue 16): headless Chromium loads it from disk, its
DOM holds every plot, and the screenshot shows them drawn. Skipped where Chromium is not
installed (``apt-get install chromium``); the HTML's structure is checked without a browser
in test_reports.py."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest

from pipeline.render import browser_check
from tests.test_cli import SMALL_MODEL, run_cli


def _png(path: Path, image: np.ndarray) -> None:
    """Write ``image`` (h, w, 3 uint8) as a PNG whose rows use every filter type in turn,
    filtered here independently of the decoder under test."""
    height, width, channels = image.shape
    rows, previous = [], [0] * (width * channels)
    for y in range(height):
        line, kind = [int(v) for v in image[y].reshape(-1)], y % 5
        out = []
        for x, value in enumerate(line):
            a = line[x - channels] if x >= channels else 0
            b, c = previous[x], previous[x - channels] if x >= channels else 0
            p = a + b - c
            paeth = (
                a
                if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c)
                else (b if abs(p - b) <= abs(p - c) else c)
            )
            out.append((value - [0, a, b, (a + b) // 2, paeth][kind]) % 256)
        rows.append(bytes([kind, *out]))
        previous = line

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )


def test_png_reader_undoes_every_filter(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 9, 3), dtype=np.uint8)
    image[10:] = rng.integers(0, 6, (30, 9, 3))  # few values: Paeth's ties, which order breaks
    image[2:5, 1:4] = browser_check.PLOT_RGB
    _png(tmp_path / "a.png", image)
    assert np.array_equal(browser_check.png_pixels(tmp_path / "a.png"), image)
    assert browser_check.count_colour(tmp_path / "a.png", browser_check.PLOT_RGB, 0) >= 9


@pytest.mark.skipif(browser_check.find_browser() is None, reason="Chromium is not installed")
def test_html_report_opens_in_headless_chromium_with_its_plots(tmp_path: Path) -> None:
    model = tmp_path / "small.onnx"
    onnx.save(onnx.parser.parse_model(SMALL_MODEL), model)
    report = tmp_path / "r.html"
    assert run_cli(model, "-o", tmp_path / "out.onnx", "--report", report).returncode == 0
    view = browser_check.open_in_browser(report, tmp_path / "shot.png", size=(1000, 1400))
    assert view.plots == [
        "Latency per round, original vs optimized",
        "Op counts before and after",
        "Max absolute error per output",
    ]
    assert (view.width, view.height) == (1000, 1400)
    assert view.drawn >= browser_check.MIN_DRAWN  # the plots were drawn, not just parsed
    code = browser_check.main(
        [str(report), "--screenshot", str(tmp_path / "b.png"), "--min-plots", "3"]
    )
    assert code == 0
    assert browser_check.main([str(report), "--min-plots", "9"]) == 1
    assert browser_check.main([str(tmp_path / "missing.html")]) == 2
