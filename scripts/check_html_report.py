#!/usr/bin/env python3
"""Open an HTML report in headless Chromium, check its plots, keep a screenshot.

Run it with ``--help``; the check lives in ``pipeline.render.browser_check``.
"""

import sys

from pipeline.render.browser_check import main

if __name__ == "__main__":
    sys.exit(main())
