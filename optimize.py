#!/usr/bin/env python3
"""``python optimize.py IN.onnx -o OUT.onnx [options]``: see ``--help`` and the README."""

from pipeline.cli import main

if __name__ == "__main__":
    main()
