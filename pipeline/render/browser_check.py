"""Open an HTML report in a real browser (headless Chromium) and keep a screenshot.

A report that parses is not yet a report that shows: a browser may refuse an SVG that an
XML parser takes, or lay a plot out off the page. This loads the file as a reader's browser
would (``file://``, no network), reads back the DOM Chromium built, checks that every plot
is in it, and writes a PNG screenshot (docs/report.png is made this way).

    python scripts/check_html_report.py REPORT.html [--screenshot OUT.png] [--size 1280x2000]

Chromium comes from the distribution (``apt-get install chromium``); without it this exits 2
and says so. Exit codes: 0 the report opened with its plots, 1 it did not, 2 bad usage.
"""

from __future__ import annotations

import argparse
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.render import svg

# A page whose plots were drawn shows at least this many pixels of PLOT_RGB (one bar of
# the op histogram alone is ~100x7).
MIN_DRAWN = 200
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# Headless, no sandbox (containers run as root), no GPU, nothing fetched in the background.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--hide-scrollbars",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-extensions",
)
# svg.COLOURS["after"] (#2b6cb0): bars and dots of the optimized model; a page whose plots
# were parsed but not drawn has none of it.
PLOT_RGB = tuple(bytes.fromhex(svg.COLOURS["after"].lstrip("#")))
SVG_TITLE = re.compile(r"<svg\b[^>]*>\s*<title>([^<]*)</title>")


@dataclass
class BrowserView:
    """What the browser made of the report."""

    plots: list[str]  # the titles of the SVG plots in the DOM Chromium built
    screenshot: Path
    width: int
    height: int
    drawn: int  # pixels of the screenshot in the plots' colour for the optimized model


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def _chunks(data: bytes):
    at = 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        yield data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        at += 12 + length


def _unfilter_slow(kind: int, line: bytearray, previous: bytes, channels: int) -> None:
    """PNG filters 3 (average) and 4 (Paeth), in place: each byte needs the one before it."""
    for x in range(len(line)):
        left = line[x - channels] if x >= channels else 0
        up, corner = previous[x], previous[x - channels] if x >= channels else 0
        if kind == 3:
            line[x] = (line[x] + (left + up) // 2) & 255
            continue
        guess = left + up - corner
        near = min(
            (abs(guess - left), 0, left), (abs(guess - up), 1, up), (abs(guess - corner), 2, corner)
        )
        line[x] = (line[x] + near[2]) & 255


def png_pixels(path: Path) -> np.ndarray:
    """The pixels (height, width, RGB or RGBA) of an 8-bit, non-interlaced PNG such as
    Chromium's screenshots; ValueError for anything else. Enough to look at the colours
    without an imaging library."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG image")
    chunks = list(_chunks(data))
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    channels = {2: 3, 6: 4}.get(colour)
    if chunks[0][0] != b"IHDR" or depth != 8 or channels is None or interlace:
        raise ValueError(f"{path}: not an 8-bit RGB/RGBA PNG")
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = width * channels
    image = np.zeros((height, stride), dtype=np.uint8)
    previous = np.zeros(stride, dtype=np.int64)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int64)
        if kind == 1:  # sub: a running sum along the row, per channel
            line = line.reshape(width, channels).cumsum(axis=0).reshape(-1)
        elif kind == 2:  # up
            line = line + previous
        elif kind in (3, 4):
            buffer = bytearray(line.astype(np.uint8).tobytes())
            _unfilter_slow(kind, buffer, previous.astype(np.uint8).tobytes(), channels)
            line = np.frombuffer(bytes(buffer), np.uint8).astype(np.int64)
        image[y] = line % 256
        previous = image[y].astype(np.int64)
    return image.reshape(height, width, channels)


def count_colour(path: Path, rgb: tuple[int, int, int], tolerance: int = 12) -> int:
    """Pixels of the screenshot within ``tolerance`` of ``rgb`` on every channel."""
    pixels = png_pixels(path)[..., :3].astype(np.int16)
    return int((np.abs(pixels - np.array(rgb)) <= tolerance).all(axis=-1).sum())


def open_in_browser(
    report: Path, screenshot: Path, size: tuple[int, int] = (1280, 2000), timeout: float = 120
) -> BrowserView:
    """Load ``report`` in headless Chromium: the plots in its DOM and a screenshot."""
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium found (apt-get install chromium)")
    url = report.resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="ovo-chromium-") as profile:
        common = [browser, *FLAGS, f"--user-data-dir={profile}"]
        dom = subprocess.run(
            [*common, "--dump-dom", url], capture_output=True, text=True, timeout=timeout
        )
        subprocess.run(
            [
                *common,
                f"--screenshot={screenshot.resolve()}",
                f"--window-size={size[0]},{size[1]}",
                url,
            ],
            capture_output=True,
            timeout=timeout,
        )
    if dom.returncode != 0 or "<html" not in dom.stdout:
        raise RuntimeError(f"Chromium did not load {report}: {dom.stderr.strip()[-300:]}")
    height, width, _ = png_pixels(screenshot).shape
    drawn = count_colour(screenshot, PLOT_RGB)
    return BrowserView(SVG_TITLE.findall(dom.stdout), screenshot, width, height, drawn)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="the HTML report (optimize.py --report r.html)")
    parser.add_argument(
        "--screenshot", type=Path, help="where to write the PNG (default: beside the report)"
    )
    parser.add_argument(
        "--min-plots", type=int, default=1, help="fail when the DOM holds fewer plots (default 1)"
    )
    parser.add_argument(
        "--size", default="1280x2000", help="browser window WIDTHxHEIGHT (default 1280x2000)"
    )
    args = parser.parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size expects WIDTHxHEIGHT, got {args.size!r}")
    if not args.report.is_file():
        print(f"error: report not found: {args.report}", file=sys.stderr)
        return 2
    screenshot = args.screenshot or args.report.with_suffix(".png")
    try:
        view = open_in_browser(args.report, screenshot, (width, height))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    for title in view.plots:
        print(f"plot: {title}")
    print(f"screenshot: {view.screenshot} ({view.width}x{view.height}, {view.drawn} plot pixels)")
    if len(view.plots) < args.min_plots or view.drawn < MIN_DRAWN:
        print(
            f"failed: {len(view.plots)} plot(s) in the page (expected {args.min_plots}+), "
            f"{view.drawn} pixels drawn in the plots' colour (expected {MIN_DRAWN}+)"
        )
        return 1
    return 0
