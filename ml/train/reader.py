"""Delta-snapshot reader: the files of one table version → shuffled torch batches for DDP workers.

Why not petastorm: petastorm 0.13.1 (its last release; no longer maintained) imports only with
pyarrow ≤ 14.0.2 because it needs ``pyarrow.filesystem``, removed in pyarrow 16, and PySpark 4's
Arrow path needs pyarrow ≥ 18. What we used from it — ``make_batch_reader`` over Parquet with
``cur_shard``/``shard_count`` — is small enough to own: delta-rs gives the files of a pinned
version, pyarrow reads their row groups, numpy shuffles, torch gets tensors. No Spark, no JVM.

How a table becomes batches:

* :func:`snapshot_files` pins a version and lists its data files. Partition values live in the
  Delta log, not in the Parquet files, so they are read from the log's add actions and attached
  as constant columns of every row of that file.
* The unit of work is one Parquet row group of one file (under DDP, when the table has fewer than
  ``UNITS_PER_RANK`` row groups per rank or one row group larger than twice a unit's fair share, a
  strided piece of one: a row group cut into ``p`` pieces, in proportion to its rows, gives piece
  ``i`` its rows ``i, i + p, i + 2p, ...``, so ranks get similar row counts and every piece spans
  the whole row group). The units of the snapshot are put in a fixed order, permuted by a
  generator seeded with ``(seed, epoch)`` — the same permutation on every process — and dealt by
  rows to the ``world_size × num_workers`` shards (shard ``rank * num_workers + worker_id``): each
  unit in turn to the shard with the fewest rows so far, so shards differ by at most one unit. A
  shard reads its units in the permutation's order, its pieces of one row group one after the other
  (the row group is decoded once per shard, not once per piece).
* Inside a shard, rows pass through a shuffle buffer of ``shuffle_buffer`` rows, shuffled by a
  generator seeded with ``(seed, epoch, shard)``, and leave it as batches of ``batch_size``.

Guarantees, for a fixed snapshot version:

* **Exactly once.** With ``drop_last=False`` every row of the snapshot is in exactly one batch of
  exactly one shard per epoch, across all ranks and DataLoader workers (the shards' unit sets
  partition the units, and a shard emits every row it reads). With ``drop_last=True`` each shard
  drops fewer than ``batch_size`` rows and duplicates none.
* **Determinism.** The batches a shard yields depend only on the snapshot, the columns,
  ``seed``, ``epoch``, ``batch_size``, ``shuffle_buffer`` and the shard layout
  (``rank``, ``world_size``, ``num_workers``). A new epoch (:meth:`DeltaBatchDataset.set_epoch`)
  gives a new order of the same rows. Changing the number of ranks or workers changes the order,
  never the set of rows.
* **Uneven streams.** Shards get whole units, so ranks may get different numbers of rows and
  batches in an epoch (:meth:`DeltaBatchDataset.batches_per_epoch` gives the longest rank's
  count exactly, to size a schedule). DDP training must wrap its loop in
  :class:`torch.distributed.algorithms.join.Join` so ranks that run out early shadow the
  collectives of those still training (the training loop does this).

Not supported (each raises rather than returning wrong rows): tables with deletion vectors in use,
tables with column mapping, null values in a selected column, variable-length list columns.
"""
from __future__ import annotations

import heapq
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from deltalake import DeltaTable
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ml.data.delta_files import check_readable, data_files
from ml.data.files import arrow_uri
from ml.errors import InvalidInput, MissingInput
from ml.train.distributed import rank0_value

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Snapshot:
    """One pinned version: its data files, schema and the partition values of each file."""

    version: int
    files: list[str]  # data file URIs, sorted
    schema: pa.Schema  # logical table schema, partition columns included
    partition_columns: list[str]
    partition_values: dict[str, dict[str, Any]]  # file URI → {partition column: value}


@dataclass(frozen=True)
class _WorkUnit:
    """Rows ``start, start + stride, ...`` (``num_rows`` of them) of one row group of one data file:
    the unit that is shuffled and dealt to shards (a whole row group unless the table has too few
    for the ranks)."""

    file: str
    row_group: int
    num_rows: int
    start: int = 0
    stride: int = 1


# Under DDP, a table with fewer than this many row groups per rank has its row groups cut into
# pieces, so that ranks get similar row counts (a 2-row-group table of 846k and 129k rows gave one
# rank 6.5x the other's batches: the schedule ended early and the other rank idled).
UNITS_PER_RANK = 8


def _split_units(units: list[_WorkUnit], pieces_total: int) -> list[_WorkUnit]:
    """Cut each row group into strided pieces of about ``total rows / pieces_total`` rows each.

    Strided, not contiguous: samples tables keep their writer's row order (NATM's, the sequences'
    user order), and a contiguous range (60k of an 846k-row group) mixed in the shuffle buffer with
    little else, so a batch came from a narrow band of users (86 distinct 1000-row blocks per 1024-row
    batch with 2 ranks against 369 in one process)."""
    total = sum(u.num_rows for u in units)
    out = []
    for u in units:
        pieces = max(1, min(u.num_rows, math.ceil(pieces_total * u.num_rows / max(total, 1))))
        out += [_WorkUnit(u.file, u.row_group, len(range(i, u.num_rows, pieces)), i, pieces) for i in range(pieces)]
    return out


def _open_snapshot(table_path: str, version: Optional[int]) -> _Snapshot:
    if not DeltaTable.is_deltatable(table_path):
        raise MissingInput(f"no Delta table at {table_path} (has its producing job run?)")
    try:
        dt = DeltaTable(table_path, version=version)
    except Exception as e:  # delta-rs raises its own error types for a missing version
        raise MissingInput(f"Delta table {table_path} has no readable version {version}: {e}") from e
    check_readable(dt, table_path)
    files = data_files(dt, table_path)
    return _Snapshot(version=dt.version(), files=[f for f, _ in files], schema=pa.schema(dt.schema().to_arrow()),
                     partition_columns=list(dt.metadata().partition_columns),
                     partition_values=dict(files))


def snapshot_files(table_path: str, version: Optional[int] = None) -> tuple[int, list[str]]:
    """The data files of one version of a Delta table.

    Args:
        table_path: local path or URI of the table.
        version: version to read; ``None`` means the latest.

    Returns:
        ``(version, files)``: the resolved version and its data file URIs, sorted.

    Raises:
        FileNotFoundError: no Delta table at ``table_path``, or it has no such version.
    """
    snap = _open_snapshot(table_path, version)
    return snap.version, snap.files


def _open_parquet(uri: str) -> pq.ParquetFile:
    """Open a data file given as a local path or a URI (s3://, gs://, abfss://, file://)."""
    if "://" not in uri:
        return pq.ParquetFile(uri)
    fs, path = pafs.FileSystem.from_uri(arrow_uri(uri))
    return pq.ParquetFile(path, filesystem=fs)


def _scalar_dtype(t: pa.DataType) -> Optional[np.dtype]:
    """numpy dtype a scalar Arrow type becomes, or None when it has no tensor form."""
    if pa.types.is_integer(t):
        return np.dtype(np.int64)
    if pa.types.is_floating(t):
        return np.dtype(np.float32)
    if pa.types.is_boolean(t):
        return np.dtype(np.bool_)
    return None


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _tensor_dtype(t: pa.DataType) -> Optional[np.dtype]:
    """numpy dtype of the tensor a column of type ``t`` becomes (lists: of their elements)."""
    return _scalar_dtype(t.value_type) if _is_list(t) else _scalar_dtype(t)


def _resolve_rank(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        default_rank, default_world = dist.get_rank(), dist.get_world_size()
    else:
        default_rank = int(os.environ.get("RANK", "0"))
        default_world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def _agreed_version(table_path: str, version: Optional[int]) -> Optional[int]:
    """With several ranks and no pinned version, every rank must read the version rank 0 sees:
    a commit landing between two ranks' lookups would otherwise break exactly-once."""
    if version is not None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return version
    return rank0_value(lambda: DeltaTable(table_path).version() if DeltaTable.is_deltatable(table_path) else None)


class DeltaBatchDataset(IterableDataset):
    """Batches of tensors from one pinned version of a Delta table, sharded by rank and worker.

    Each item is a ``dict[str, torch.Tensor]`` with one entry per column, in ``columns`` order:
    integers → ``int64`` ``(B,)``, floats → ``float32`` ``(B,)``, booleans → ``bool`` ``(B,)``,
    lists of numbers with one length ``L`` for every row → ``(B, L)``. ``B`` is ``batch_size``
    except for a shard's last batch (dropped when ``drop_last``). See the module docstring for
    the exactly-once and determinism guarantees; call :meth:`set_epoch` before each epoch.

    Construction reads the Parquet footers of the snapshot (row-group sizes). When
    ``torch.distributed`` is initialised with several ranks and ``version`` is ``None``, it is a
    collective: rank 0's latest version is broadcast so that all ranks read the same snapshot.
    """

    def __init__(self, table_path: str, columns: Optional[list[str]] = None, batch_size: int = 256,
                 shuffle_buffer: int = 10000, seed: int = 0, version: Optional[int] = None,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 drop_last: bool = False) -> None:
        """
        Args:
            table_path: local path or URI of the Delta table.
            columns: columns to read; ``None`` means every column with a tensor form (strings,
                binary, dates, structs... are skipped, and the skip is logged).
            batch_size: rows per batch.
            shuffle_buffer: rows mixed together before a batch leaves a shard; 0 keeps the rows
                of each row group in file order (row groups are still shuffled).
            seed: seed of every shuffle; non-negative.
            version: table version to read; ``None`` means the latest (resolved once, here).
            rank, world_size: this process's place among the DDP ranks; default to
                ``torch.distributed``'s when initialised, else env ``RANK``/``WORLD_SIZE``,
                else 0 and 1.
            drop_last: drop each shard's last batch when it is smaller than ``batch_size``.

        Raises:
            FileNotFoundError: no Delta table at ``table_path`` or no such version.
            ValueError: bad arguments, an unknown column, or a column with no tensor form.
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.table_path = table_path
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.rank, self.world_size = _resolve_rank(rank, world_size)
        snap = _open_snapshot(table_path, _agreed_version(table_path, version))
        self.version = snap.version
        self.columns = self._select_columns(snap.schema, columns)
        self._partition_values = {
            f: {c: v for c, v in values.items() if c in self.columns}
            for f, values in snap.partition_values.items()}
        self._file_columns = [c for c in self.columns if c not in snap.partition_columns]
        self._dtypes = {c: _tensor_dtype(snap.schema.field(c).type) for c in self.columns}
        self._units = self._list_units(snap.files)
        self._deals: dict = {}
        target = UNITS_PER_RANK * self.world_size
        total = sum(u.num_rows for u in self._units)
        # too few units to deal evenly, or one larger than a unit's fair share (one 10M-row group among
        # many small ones went whole to one rank): cut them, each in proportion to its rows
        if self.world_size > 1 and self._units and (
                len(self._units) < target or max(u.num_rows for u in self._units) > 2 * total / target):
            self._units = _split_units(self._units, target)
        logger.info("Delta table %s version %d: %d files, %d row groups, %d rows; columns %s; "
                    "rank %d of %d", table_path, self.version, len(snap.files), len(self._units),
                    self.num_rows(), self.columns, self.rank, self.world_size)

    @staticmethod
    def _select_columns(schema: pa.Schema, columns: Optional[list[str]]) -> list[str]:
        if columns is None:
            chosen = [f.name for f in schema if _tensor_dtype(f.type) is not None]
            skipped = [f"{f.name} ({f.type})" for f in schema if _tensor_dtype(f.type) is None]
            if skipped:
                logger.info("skipping columns with no tensor form: %s", ", ".join(skipped))
            if not chosen:
                raise InvalidInput(f"no column of {schema.names} has a tensor form")
            return chosen
        if len(set(columns)) != len(columns):
            raise InvalidInput(f"columns has duplicates: {columns}")
        for name in columns:
            if name not in schema.names:
                raise InvalidInput(f"unknown column {name!r}; the table has {schema.names}")
            t = schema.field(name).type
            if _tensor_dtype(t) is None:
                raise InvalidInput(
                    f"column {name!r} has type {t}, which has no tensor form: only integers, floats, "
                    "booleans and fixed-length lists of them are read (map strings to integer ids "
                    "upstream, or leave the column out)")
        return list(columns)

    def _list_units(self, files: list[str]) -> list[_WorkUnit]:
        """Each file's non-empty row groups, in the files' order. The footers are read by a few threads:
        one after another, thousands of files on object storage were minutes of every rank's start."""
        def footer(f: str) -> list[_WorkUnit]:
            with _open_parquet(f) as pf:
                missing = [c for c in self._file_columns if c not in pf.schema_arrow.names]
                if missing:
                    raise InvalidInput(f"data file {f} lacks columns {missing} (written before a schema "
                                       "change?); rewrite the table before training on it")
                md = pf.metadata
                return [_WorkUnit(f, i, md.row_group(i).num_rows)
                        for i in range(md.num_row_groups) if md.row_group(i).num_rows > 0]

        if len(files) < 4:
            return [u for f in files for u in footer(f)]
        with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
            return [u for units in pool.map(footer, files) for u in units]  # map keeps the files' order

    def set_epoch(self, epoch: int) -> None:
        """Use the shuffles of ``epoch`` from the next ``iter()`` on (call it on every rank)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def num_rows(self) -> int:
        """Rows in the snapshot, over all shards (from the Parquet footers)."""
        return sum(u.num_rows for u in self._units)

    def batches_per_epoch(self, epoch: int, num_workers: int = 0) -> int:
        """Batches the longest rank yields in ``epoch`` (an optimizer step each, under ``Join``):
        the deal of the units is deterministic, so this is exact, not an estimate."""
        workers = max(num_workers, 1)
        count = (lambda n: n // self.batch_size) if self.drop_last else (lambda n: -(-n // self.batch_size))
        return max(sum(count(sum(u.num_rows for u in self._shard_units(r * workers + w, self.world_size * workers,
                                                                         epoch)))
                       for w in range(workers)) for r in range(self.world_size))

    def _deal(self, epoch: int, shard_count: int) -> list[tuple[int, int]]:
        """(unit index, shard) in the epoch's permutation order. Dealt by rows, not by count: each unit
        goes to the shard with the fewest rows so far (ties: the lower shard), so shards differ by at
        most one unit's rows (dealt alternately, units of unequal sizes left one rank with twice the
        other's rows). The same on every rank: a function of the seed, the epoch and the units."""
        key = (epoch, shard_count)
        if key not in self._deals:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self._units))
            heap = [(0, k) for k in range(shard_count)]
            out = []
            for i in order:
                load, to = heapq.heappop(heap)
                out.append((int(i), to))
                heapq.heappush(heap, (load + self._units[i].num_rows, to))
            self._deals = {key: out}  # one epoch's deal at a time
        return self._deals[key]

    def _shard_units(self, shard: int, shard_count: int, epoch: Optional[int] = None) -> list[_WorkUnit]:
        """The shard's units in the order read: that of the permutation, except that the pieces of
        a row group follow its first one, so the shard decodes it once (:meth:`_read_unit`)."""
        epoch = self.epoch if epoch is None else epoch
        units = [self._units[i] for i, to in self._deal(epoch, shard_count) if to == shard]
        first: dict[tuple[str, int], int] = {}
        for u in units:
            first.setdefault((u.file, u.row_group), len(first))
        return sorted(units, key=lambda u: first[(u.file, u.row_group)])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shard = self.rank * num_workers + worker_id
        shard_count = self.world_size * num_workers
        units = self._shard_units(shard, shard_count)
        if not units:
            logger.warning("shard %d of %d has no row groups this epoch (table %s has %d)",
                           shard, shard_count, self.table_path, len(self._units))
        rng = np.random.default_rng([self.seed, self.epoch, shard])
        # With DataLoader workers, parallelism comes from the workers; keep each one single-threaded.
        use_threads = info is None
        widths: dict[str, int] = {}
        threshold = max(self.shuffle_buffer, self.batch_size)
        pool: Optional[dict[str, np.ndarray]] = None
        decoded: dict[tuple[str, int], pa.Table] = {}
        for unit in units:
            chunk = self._read_unit(unit, widths, use_threads, decoded)
            pool = chunk if pool is None else {c: np.concatenate([pool[c], chunk[c]]) for c in self.columns}
            n = len(pool[self.columns[0]])
            if n < threshold:
                continue
            # Emit whole batches and keep between threshold - batch_size and threshold rows
            # to mix with the rows of the next row groups.
            order = self._order(n, rng)
            k = ((n - threshold) // self.batch_size + 1) * self.batch_size
            yield from self._batches(pool, order[:k])
            pool = {c: pool[c][order[k:]] for c in self.columns}
        if pool is not None:
            n = len(pool[self.columns[0]])
            order = self._order(n, rng)
            if self.drop_last:
                order = order[: n - n % self.batch_size]
            yield from self._batches(pool, order)

    def _order(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.permutation(n) if self.shuffle_buffer > 0 else np.arange(n)

    def _batches(self, pool: dict[str, np.ndarray], order: np.ndarray) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            # Fancy indexing copies, so each batch owns its memory: a view into the pool would
            # make a DataLoader worker ship the whole pool through shared memory with every batch.
            yield {c: torch.from_numpy(pool[c][idx]) for c in self.columns}

    def _read_unit(self, unit: _WorkUnit, widths: dict[str, int], use_threads: bool,
                   decoded: dict[tuple[str, int], pa.Table]) -> dict[str, np.ndarray]:
        """One unit as numpy arrays, partition values attached as constant columns. ``decoded``
        holds the last row group read, for the next piece of it (decoding it once per piece read a
        row group cut into 16 pieces 16 times)."""
        table = None
        if self._file_columns:
            key = (unit.file, unit.row_group)
            table = decoded.get(key)
            if table is None:
                decoded.clear()  # at most one decoded row group held
                with _open_parquet(unit.file) as pf:
                    table = pf.read_row_group(unit.row_group, columns=self._file_columns, use_threads=use_threads)
                decoded[key] = table
            if unit.stride > 1:  # a piece of the row group
                table = table.take(np.arange(unit.start, table.num_rows, unit.stride))
        out: dict[str, np.ndarray] = {}
        for c in self.columns:
            if table is None or c not in self._file_columns:
                value = self._partition_values[unit.file][c]
                if value is None:
                    raise InvalidInput(f"partition column {c!r} is null for file {unit.file}; "
                                       "fill it upstream or leave the column out")
                out[c] = np.full(unit.num_rows, value, dtype=self._dtypes[c])
            else:
                out[c] = self._to_numpy(c, table.column(c).combine_chunks(), unit, widths)
        return out

    def _to_numpy(self, name: str, arr: pa.Array, unit: _WorkUnit, widths: dict[str, int]) -> np.ndarray:
        if arr.null_count:
            raise InvalidInput(f"column {name!r} has {arr.null_count} nulls in {unit.file} (row group "
                               f"{unit.row_group}); fill or drop them upstream")
        dtype = self._dtypes[name]
        if not _is_list(arr.type):
            return arr.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        width = int(lengths[0]) if len(lengths) else 0
        seen = widths.setdefault(name, width)
        if len(lengths) and (np.any(lengths != width) or width != seen):
            found = sorted({seen, *np.unique(lengths).tolist()})
            raise InvalidInput(f"list column {name!r} is variable-length (lengths {found[:5]} in "
                               f"{unit.file}): pad or truncate it to one length upstream")
        values = pc.list_flatten(arr)
        if values.null_count:
            raise InvalidInput(f"list column {name!r} has null elements in {unit.file}; fill them upstream")
        return values.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(len(arr), width)


def make_loader(dataset: DeltaBatchDataset, num_workers: int = 0) -> DataLoader:
    """A DataLoader over an already-batching :class:`DeltaBatchDataset`.

    ``batch_size=None`` passes the dataset's batches through unchanged. Workers are not
    persistent, so each epoch's workers receive a fresh copy of the dataset with the epoch set
    by :meth:`DeltaBatchDataset.set_epoch`. Each worker is its own shard, so ranks' streams can
    differ in length: DDP training must run its loop under
    :class:`torch.distributed.algorithms.join.Join`.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False)
