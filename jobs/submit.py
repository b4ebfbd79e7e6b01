"""Entry file for ``spark-submit``: run one job module with its usual arguments.

    spark-submit [spark options] jobs/submit.py pipeline --conf conf/synthetic.yaml --set warehouse=...

spark-submit needs a Python *file*; this one runs ``jobs.<name>`` as ``python -m jobs.<name>``
would, from the installed package (the wheel in the packed environment or on ``--py-files``), so
the same module code serves the CLI, spark-submit and notebooks.
"""
from __future__ import annotations

import os
import runpy
import sys

JOBS = ("generate", "ingest", "sequences", "graph", "baseline", "evaluate", "samples", "train", "embed", "topk",
        "recent", "pipeline", "vacuum")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in JOBS:
        raise SystemExit(f"usage: spark-submit ... {os.path.basename(__file__)} JOB [job options]; "
                         f"JOB is one of {', '.join(JOBS)} (got {argv[0] if argv else 'nothing'!r})")
    here = os.path.dirname(os.path.abspath(__file__))
    # run as a script, this file's folder is sys.path[0]: drop it so ``jobs`` resolves to the package
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.argv = [f"jobs.{argv[0]}", *argv[1:]]
    runpy.run_module(f"jobs.{argv[0]}", run_name="__main__", alter_sys=True)
    report_executors()


def _where(_):
    import platform
    import sys as _sys

    import ml

    yield f"{_sys.executable} (Python {platform.python_version()}), ml from {os.path.dirname(ml.__file__)}"


def report_executors() -> None:
    """Print which Python and which copy of the code the executors ran: the first thing to check
    when a packed environment or --py-files did not take."""
    from pyspark.sql import SparkSession

    spark = SparkSession.getActiveSession()
    if spark is None:
        return
    n = max(1, spark.sparkContext.defaultParallelism)
    seen = sorted(set(spark.sparkContext.parallelize(range(n), n).mapPartitions(_where).collect()))
    print(f"driver: {next(_where(None))}")  # in client mode, the submitting machine's environment
    for line in seen:
        print(f"executors: {line}")
    # the settings the jobs leave to the cluster unless the config names them
    partitions = spark.conf.get("spark.sql.shuffle.partitions")
    ui = spark.sparkContext.getConf().get("spark.ui.enabled", "true")
    print(f"session: spark.sql.shuffle.partitions={partitions}, spark.ui.enabled={ui}")


if __name__ == "__main__":
    main()
