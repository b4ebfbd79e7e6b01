"""Plain files beside the Delta tables (model artifacts, training metrics, the report), wherever the
warehouse is: a local or mounted path, or a URI through Arrow's filesystems (s3://, s3a://, gs://,
abfss://, hdfs://, file://), the same credentials the training reader uses.

Writers fill a local folder and copy it to the URI when they are done (:func:`staged_dir`): an
object store has no appends or renames, and a reader never sees half a model. ``dbfs:/x`` is read
and written at ``/dbfs/x``, Databricks' mount of it on the driver and the workers.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator, Optional
from urllib.parse import quote

import pyarrow.fs as pafs

from ml.data.delta_files import is_uri
from ml.errors import InvalidInput, MissingInput

_URI_SAFE = ":/?#[]@!$&'()*+,;=~"
# Hadoop's S3 schemes (what Spark on EMR / YARN is given) name the same objects as Arrow's s3://
_ARROW_SCHEMES = {"s3a": "s3", "s3n": "s3"}


def arrow_uri(uri: str) -> str:
    """``uri`` with a scheme Arrow's filesystems know (s3a:// and s3n:// -> s3://), percent-encoded:
    the URI names the stored key itself (decoded, see ml.data.delta_files), and Arrow decodes
    percent-escapes, so a Hive directory "s=a%20b" must reach it as "s=a%2520b"."""
    scheme, sep, rest = uri.partition("://")
    return quote(_ARROW_SCHEMES.get(scheme.lower(), scheme) + sep + rest, safe=_URI_SAFE)


def local_path(path: str) -> Optional[str]:
    """The local (or mounted) path for ``path``; None for a URI that only Arrow's filesystems reach."""
    if path.startswith("dbfs:"):
        return "/dbfs/" + path[len("dbfs:"):].lstrip("/")
    return None if is_uri(path) else path


def arrow_filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """Arrow's filesystem for the URI ``path``, or :class:`InvalidInput` naming it when Arrow has
    none for its scheme or cannot reach it (wasbs://, viewfs://, hdfs:// without libhdfs)."""
    try:
        return pafs.FileSystem.from_uri(arrow_uri(path.rstrip("/")))
    except (ValueError, OSError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise InvalidInput(f"{path}: the model files and the report are written through Arrow's filesystems "
                           f"(s3://, s3a://, gs://, abfss://, hdfs://, file://), which cannot open it: {e}. Use a "
                           "warehouse Arrow reaches, or a mounted path") from e


def check_reachable(path: str) -> None:
    """Raise :class:`InvalidInput` now, rather than after hours of training, when ``path`` is a URI
    that Arrow's filesystems cannot open."""
    if local_path(path) is None:
        arrow_filesystem(path)


def exists(path: str) -> bool:
    local = local_path(path)
    if local is not None:
        return os.path.exists(local)
    fs, p = arrow_filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def _arrow_file(path: str) -> tuple[pafs.FileSystem, str]:
    """:func:`arrow_filesystem` for a file that must exist (:class:`MissingInput` otherwise)."""
    fs, p = arrow_filesystem(path)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        raise MissingInput(path)
    return fs, p


def read_bytes(path: str) -> bytes:
    local = local_path(path)
    if local is not None:
        with open(local, "rb") as f:
            return f.read()
    fs, p = _arrow_file(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def copy_to_local(path: str, dest: str) -> None:
    """Copy the file at ``path`` (local or URI) to the local file ``dest``."""
    local = local_path(path)
    if local is not None:
        shutil.copyfile(local, dest)
        return
    fs, p = _arrow_file(path)
    pafs.copy_files(p, os.path.abspath(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


@contextlib.contextmanager
def staged_dir(path: str, upload: bool = True, local_dir: Optional[str] = None) -> Iterator[str]:
    """A local folder to write ``path``'s files into. For a local or mounted ``path`` it is ``path``
    itself. For a URI it is ``local_dir`` (kept afterwards: a resumed run finds its files there) or
    a temporary folder (removed afterwards), and its files are copied to ``path`` when the block ends
    without an error (and ``upload``). Files already at the URI and not rewritten stay."""
    local = local_path(path)
    if local is not None:
        os.makedirs(local, exist_ok=True)
        yield local
        return
    fs, p = arrow_filesystem(path) if upload else (None, None)
    tmp = local_dir or tempfile.mkdtemp(prefix="spark-i2i-")
    os.makedirs(tmp, exist_ok=True)
    try:
        yield tmp
        if upload:
            fs.create_dir(p, recursive=True)
            pafs.copy_files(tmp, p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    finally:
        if local_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
