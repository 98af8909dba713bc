"""What the benchmarks read of the machine itself."""

from __future__ import annotations

import os
from pathlib import Path


def busy_cpu_s() -> float | None:
    """CPU seconds every process on this machine has used (/proc/stat: all but idle)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
