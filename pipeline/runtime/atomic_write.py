"""One way to write a small text file (report.json, bench results, the CI baseline, the
kernel timing store) so that a reader, or a crash, sees the old file or the new one and
never half of one: a temp file in the same folder, then a rename on the same file system."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str, prefix: str = ".tmp-") -> None:
    """Replace ``path`` with ``text``; the temp file is removed when anything fails and the
    error (``OSError`` for a full disk or a missing folder) goes to the caller."""
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a report is a normal file
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable_folder(folder: Path) -> None:
    """Raise ``OSError`` unless a file can really be made in ``folder``: root passes
    ``os.access`` everywhere, while /proc and read-only mounts refuse a real write."""
    # Not ".tmp-": that prefix is the save's staging folder (crash tests look for it).
    os.rmdir(tempfile.mkdtemp(prefix=".ovo-write-probe-", dir=folder))
