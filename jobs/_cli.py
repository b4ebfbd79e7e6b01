"""Shared command-line plumbing: ``--conf FILE [--set key=value ...]``, logging, the session."""
from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import sys
from typing import Callable, Optional, Sequence

from ml.config import Config, ConfigError, load_config
from ml.errors import InputError, UnreadableFile

log = logging.getLogger("jobs")

# What a job raises for bad input, config or state, with a message that names the key, column or
# table (ml.errors): printed as one line. Anything else (a bug) keeps its traceback.
USER_ERRORS = (InputError,)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("py4j", "py4j.clientserver", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _prog() -> str:
    """The command as typed: ``python -m jobs.pipeline`` (argparse's default names the file,
    ``pipeline.py``), or the console script's name (``i2i-pipeline``)."""
    path = sys.argv[0] if sys.argv else ""
    name = os.path.basename(path)
    if name.endswith(".py") and os.path.basename(os.path.dirname(os.path.abspath(path))) == "jobs":
        return f"python -m jobs.{name[:-3]}"
    return name or "i2i"


def parser(description: str) -> argparse.ArgumentParser:
    # the docstring as written: its example commands on their own lines
    p = argparse.ArgumentParser(prog=_prog(), description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conf", help="YAML config (conf/*.yaml); defaults apply when omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set warehouse=/tmp/wh --set spark.master=local[4]")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARN", "WARNING", "ERROR"],
                   help="the jobs' own log (Spark's is spark.log_level); any case")
    return p


def parse(description: str, argv: Optional[Sequence[str]] = None,
          extra: Optional[Callable[[argparse.ArgumentParser], None]] = None):
    p = parser(description)
    if extra:
        extra(p)
    args = p.parse_args(argv)
    setup_logging(args.log_level)
    try:
        cfg = load_config(args.conf, args.overrides)
    except ConfigError as e:
        exit_with(e)
    return cfg, args


def exit_with(e: InputError) -> None:
    """Print a user error as one line, ``error: <type>: <message>``, and exit: 2 for a config error,
    1 otherwise. ``--log-level DEBUG`` logs the traceback before it."""
    log.debug("traceback of the error below", exc_info=e)
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(2 if isinstance(e, ConfigError) else 1)


def command(main: Callable[..., None]) -> Callable[..., None]:
    """Decorates a job's ``main(argv=None)`` (the module's ``__main__``, its console script and
    spark-submit's entry all call it): a user error (:data:`USER_ERRORS`) prints ``error: <message>``
    and exits 2 for a config error, 1 otherwise, without a traceback (``--log-level DEBUG`` logs
    it). Anything else, a plain ValueError from a bug included, propagates with its traceback."""
    @functools.wraps(main)
    def run_command(argv: Optional[Sequence[str]] = None) -> None:
        try:
            main(argv)
        except USER_ERRORS as e:
            exit_with(e)
        except Exception as e:  # noqa: BLE001 - Py4JJavaError and Spark's own exceptions
            unreadable = unreadable_file(e)
            if unreadable is None:
                raise
            unreadable.__cause__ = e  # --log-level DEBUG logs Spark's trace with it
            exit_with(unreadable)
    return run_command


# Spark's error class for a file it cannot read as the others, and the cause it gives
_READ_FAILURE = re.compile(r"\[FAILED_READ_FILE\.(\w+)\] (.+?)(?:\s+SQLSTATE: \w+)?\s*$", re.M)
_CAUSE = re.compile(r"^Caused by: ([\w.$]+)(?:: (.*?))?\s*$", re.M)


def unreadable_file(e: BaseException) -> Optional[UnreadableFile]:
    """A Spark job that failed on one file of its input (a Parquet file with another column type, a
    CSV file with another header) as a user error naming the file, or None for any other error."""
    text = str(e)
    found = _READ_FAILURE.search(text)
    if not found:
        return None
    kind, msg = found.group(1), found.group(2).strip()
    cause = _CAUSE.search(text)  # the first: the error Spark's names the file of
    if kind == "NO_HINT" and cause:  # the message names the file only: the cause says why
        msg += f" {cause.group(2) or cause.group(1)}"
    if kind == "PARQUET_COLUMN_DATA_TYPE_MISMATCH" or "CSV header does not conform" in msg:
        advice = "the files of one input must have the same columns and types (for CSV, the same header)"
    else:
        advice = "Spark could not read that file (damaged, removed or unlike the others?)"
    return UnreadableFile(f"{msg.rstrip('.')}: {advice}; fix or move that file and rerun (--log-level DEBUG shows "
                          f"Spark's trace)")


def print_tables(cfg: Config, names: Sequence[str]) -> None:
    """Tell the user where the job's output tables are."""
    width = max([18, *map(len, names)])
    for n in names:
        print(f"  {n:<{width}} {cfg.table_path(n)}")
