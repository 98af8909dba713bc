"""Writing an output file (a report, a JSON export) so that it is never half-written."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(target: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write via a temp file in the same folder and os.replace it over the target.

    The rename is atomic within one file system, so readers see the old report or the
    whole new one, and a failure part-way leaves no half-written report behind. A
    symbolic link is followed: the file it names is replaced, the link stays. A target
    that exists and is not a regular file (/dev/stdout, a named pipe, a device) is
    written in place, as the stream it is: renaming a file over it would replace the
    device with a file.
    """
    if is_stream(target):
        with open(target, "wb") as fh:
            write(fh)
        return target
    real = Path(os.path.realpath(target))
    fd, tmp_name = tempfile.mkstemp(dir=real.parent, prefix=f".{real.name}.",
                                    suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp makes the file 0600; a report is an ordinary, shareable document
        tmp.chmod(0o644)
        os.replace(tmp, real)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def is_stream(target: Path) -> bool:
    """Whether `target` (its links followed) exists and is not a regular file: a device
    such as /dev/stdout (a link to a pipe, whose name does not resolve to a path) or a
    named pipe."""
    try:
        return not stat.S_ISREG(os.stat(target).st_mode)
    except OSError:  # not there (yet), or a dangling link: a file will be created
        return False
