"""Describe the machine a benchmark ran on (printed with every result)."""
from __future__ import annotations

import os
import platform
import subprocess


def describe() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(l.split()[1] for l in f if l.startswith("MemTotal")))
            mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, StopIteration):
        pass
    java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()[:1]
    import pyspark

    return (f"{os.cpu_count()} cores ({cpu}), {mem} RAM, Python {platform.python_version()}, "
            f"pyspark {pyspark.__version__}, {java[0] if java else 'java ?'}")
