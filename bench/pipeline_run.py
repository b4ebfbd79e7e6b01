"""Wall time and peak memory of one whole pipeline run (the end-to-end target of the README).

    python -m bench.pipeline_run --conf conf/ml1m_natm.yaml --set warehouse=/tmp/wh_pipe [--set ...]

Runs ``python -m jobs.pipeline`` in a child process with the given arguments, samples the
resident memory of the whole process tree (Python driver, Spark's JVM, Python workers, training)
every half second, then prints the pipeline's own output, the wall time and the peak RSS.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench._machine import describe, watch_peak_rss

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    args = sys.argv[1:]
    t = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.pipeline", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    peak, th = watch_peak_rss(proc)
    out, _ = proc.communicate()
    th.join()
    wall = time.time() - t
    print(out)
    print(f"pipeline {' '.join(args)}: exit {proc.returncode}, wall {wall:.0f} s ({wall / 60:.1f} min), "
          f"peak RSS of the process tree {peak[0] / 2**30:.2f} GiB; machine: {describe()}")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
