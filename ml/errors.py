"""Errors a user can act on: bad input, config or state, with a message that names the key, column or
table and what was expected. The jobs' command line prints them as one line, without a traceback
(``jobs._cli.command``); any other exception is a bug and keeps its traceback."""
from __future__ import annotations


class InputError(Exception):
    """Base of the errors a user can fix (see the module docstring)."""


class InvalidInput(InputError, ValueError):
    """A value, schema, table content or state that is not what a job expects."""


class UnreadableFile(InvalidInput):
    """A file of an input Spark could not read as the others (another column type, another CSV
    header): Spark's own message, without its Java stack."""


class MissingInput(InputError, FileNotFoundError):
    """A table, model or file a job reads is not there (its producing job has not run)."""


class UnsupportedTable(InputError, NotImplementedError):
    """A Delta table uses a feature this reader does not handle (column mapping, deletion vectors):
    what to do about it, as one line like the other input errors."""
