"""Offline ONNX optimization pipeline: load, verified graph passes, compare, report, save."""

from __future__ import annotations

__version__ = "0.1.0"
