#!/usr/bin/env python3
"""The CI optimization job: export, optimize, gate against docs/baseline.json.

Run it with ``--help``; the options and the rules live in ``pipeline.ci_gate``.
"""

import sys

from pipeline.ci_gate import main

if __name__ == "__main__":
    sys.exit(main())
