"""A benchmark's scratch folder: the one given on the command line, kept; else a temporary one, removed at the end."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def scratch_dir(given: Path | None, prefix: str) -> Iterator[Path]:
    """`given` as it is (left for a look afterwards), else a new temporary folder `<prefix>*`, removed on exit
    (after an error too)."""
    if given is not None:
        yield given
        return
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
