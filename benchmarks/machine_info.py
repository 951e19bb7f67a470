"""The machine a benchmark ran on, for the header of its results table."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_line() -> str:
    """e.g. 'Intel(R) Xeon(R) ..., 2 cores, torch 2.13.0+cpu'."""
    import torch
    return f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}"
