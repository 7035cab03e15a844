#!/usr/bin/env python3
"""Export the model zoo to ONNX in parallel and resumably (models/batch.py).

Run it with ``--help``; the options and the export engine live in ``models.batch``.
"""

import sys

from models.batch import main

if __name__ == "__main__":
    sys.exit(main())
