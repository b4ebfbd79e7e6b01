"""Small side tables a trainer needs, read from Delta snapshots with delta-rs (no Spark).

* the item vocabulary: BIGINT item ids -> contiguous indices 1..V (0 = padding), sorted by id so
  the mapping is deterministic and invertible with ``searchsorted``;
* the neighbour lookup of NATM (``item_graph`` rows as index tensors) and item categories.

These are per-item tables (sized by the training items, not the actions): at 10^8 items the vocabulary is
0.8 GB of int64 per trainer process and NATM's neighbour tables 14 GB; the model's dense id tables
are larger still (README, "Memory at catalogue scale": about 10^7 items is the practical bound).
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from deltalake import DeltaTable

from ml.data.delta_files import check_readable, is_uri
from ml.data.files import arrow_filesystem, local_path
from ml.errors import InvalidInput, MissingInput

log = logging.getLogger(__name__)


_PINNED: Dict[str, int] = {}


@contextmanager
def pinned_versions(versions: Mapping[str, int]):
    """Within the block, :func:`read_columns` reads each of these tables (by path, as given) at its
    version: every DDP rank builds its vocabulary and neighbour tables from the same snapshots."""
    _PINNED.update(versions)
    try:
        yield
    finally:
        for path in versions:
            _PINNED.pop(path, None)


def agreed_versions(paths: Sequence[str]) -> Dict[str, int]:
    """The current version of each existing table among ``paths``, as rank 0 sees it, on every rank
    (a commit landing between two ranks' reads would otherwise give them different vocabularies)."""
    from ml.train.distributed import rank0_value

    return rank0_value(lambda: {p: DeltaTable(p).version() for p in paths if DeltaTable.is_deltatable(p)})


def read_columns(path: str, columns: list, version: Optional[int] = None,
                 partitions: Optional[list | dict] = None, rows: Optional["pc.Expression"] = None) -> pa.Table:
    """The given columns of a Delta snapshot (``version``, else the one pinned by
    :func:`pinned_versions`, else the latest); ``partitions`` (``[("model", "=", "natm")]``, or
    ``{"model": ["natm"]}`` as :func:`ml.data.io.read_table` takes it) reads only the files of those
    partitions; ``rows`` (an Arrow expression) keeps only the rows it holds for, as the files are
    scanned (what is held in memory is those rows, not the table)."""
    if not DeltaTable.is_deltatable(path):
        raise MissingInput(f"no Delta table at {path} (has its producing job run?)")
    version = _PINNED.get(path) if version is None else version
    dt = DeltaTable(path, version=version) if version is not None else DeltaTable(path)
    check_readable(dt, path)  # column mapping on the older protocol read as all nulls here
    if isinstance(partitions, dict):
        partitions = [(k, "in", list(v)) for k, v in partitions.items()]
    # delta-rs's filters prune the files by their partition values (its `partitions` is deprecated)
    filters = partitions or None
    if rows is not None:
        filters = rows if filters is None else pq.filters_to_expression(filters) & rows
    return pa.table(dt.to_pyarrow_table(columns=columns, filters=filters, filesystem=table_filesystem(path)))


def table_filesystem(path: str) -> pafs.FileSystem:
    """Arrow's own filesystem rooted at the table, for delta-rs to read its files through.

    delta-rs's default (its object store, wrapped as a Python filesystem) leaves threads that abort
    the process at exit, after a successful read ("terminate called without an active exception",
    exit 134): 12 of 20 fresh processes reading one table with deltalake 1.6.6 and pyarrow 26, and
    none through Arrow's filesystem. A training process or a user's script that reads a table must
    not fail after its work is done. URIs go through the same filesystems as the training reader's.
    """
    if path.startswith("file:"):  # file:/x (Spark's spelling) and file:///x, percent-decoded as delta-rs does
        path = unquote(urlparse(path).path)
    local = local_path(path)
    if local is None and is_uri(path):
        fs, base = arrow_filesystem(path)
        return pafs.SubTreeFileSystem(base, fs)
    return pafs.SubTreeFileSystem(os.path.abspath(local or path), pafs.LocalFileSystem())


@dataclass
class Vocab:
    ids: torch.Tensor  # (V,) sorted BIGINT item ids; index = position + 1

    @property
    def size(self) -> int:
        return int(self.ids.numel())

    def index(self, item_ids: torch.Tensor) -> torch.Tensor:
        """BIGINT ids -> indices 1..V; unknown ids -> 0 (padding)."""
        pos = torch.searchsorted(self.ids, item_ids)
        pos_c = pos.clamp(max=max(self.size - 1, 0))
        found = (pos < self.size) & (self.ids[pos_c] == item_ids)
        return torch.where(found, pos_c + 1, torch.zeros_like(pos))

    def item_ids(self, index: torch.Tensor) -> torch.Tensor:
        return self.ids[index - 1]


def check_known(index: torch.Tensor, ids: torch.Tensor, where: str, what: str, vocabulary: str) -> None:
    """Every id of a sample must be in the vocabulary: index 0 is padding, and an unknown id would
    train as the padding row (or, in NATM's exact softmax, as the last item)."""
    if not bool((index > 0).all()):
        raise InvalidInput(f"{where} holds {what} the vocabulary ({vocabulary}) does not know, e.g. "
                           f"{ids[index == 0].flatten()[:3].tolist()}: rerun jobs.samples")


def build_vocab(ids) -> Vocab:
    """The sorted distinct ids (one table's: the training items, or the users)."""
    return Vocab(torch.from_numpy(np.unique(np.asarray(ids, dtype=np.int64))))


def load_vocab(noise_q_path: str) -> Vocab:
    """The training items (``noise_q``: every item of the training sequences), exactly what
    ``samples.max_items`` checked. Catalogue items without a training action (``items`` rows of
    held-out targets, of behaviours or users the sequences leave out) get no id row: nothing would
    train it, the embed job gives vectors to the training items only, and at 10⁸ catalogue items
    those rows alone would be gigabytes in every rank and executor."""
    return build_vocab(read_columns(noise_q_path, ["item_id"]).column("item_id").to_numpy())


def load_graph(graph_path: str, vocab: Vocab, max_rank: Optional[int] = None):
    """``item_graph`` -> (item index, neighbour index, weight, rank) tensors, unknown ids dropped;
    ``max_rank``: only the edges of rank 1..max_rank are read (the neighbours the model takes).
    Each column is converted and its Arrow copy let go before the next: at 10⁷ items × 9 edges the
    table is 2.5 GB, and the tensors of all four beside it were as much again in every rank."""
    rows = pc.field("rank") <= max_rank if max_rank is not None else None
    t = read_columns(graph_path, ["item_id", "neighbor_id", "weight", "rank"], rows=rows)
    cols = {}
    for name in ("item_id", "neighbor_id", "weight", "rank"):
        cols[name] = torch.from_numpy(t.column(name).to_numpy().astype(np.float32 if name == "weight" else np.int64))
        t = t.drop_columns([name])
    del t
    pa.default_memory_pool().release_unused()  # the allocator's freed pages back to the system
    item, nbr = vocab.index(cols.pop("item_id")), vocab.index(cols.pop("neighbor_id"))
    keep = (item > 0) & (nbr > 0)
    dropped = int((~keep).sum())
    if dropped:  # item_graph from other sequences than noise_q (a stage rerun on its own, or killed between)
        log.warning("item_graph: %d of %d edges name items not in noise_q (the training items) and are left "
                    "out; rerun jobs.graph and jobs.samples on the same sequences", dropped, len(keep))
    return item[keep], nbr[keep], cols["weight"][keep], cols["rank"][keep]


def load_categories(items_path: Optional[str], vocab: Vocab):
    """(V+1,) category index per item index (0 = unknown) and the number of categories.

    The categories are those of the vocabulary's items: a category held only by catalogue items
    without a training action would be an embedding row that nothing trains."""
    if not items_path or not DeltaTable.is_deltatable(items_path):
        return None, 0
    # only the vocabulary's rows are kept as the table is scanned: ``items`` lists the whole catalogue
    # (held-out targets, other behaviours, short users' items), which samples.max_items does not bound,
    # and every training rank reads it
    t = read_columns(items_path, ["item_id", "category_id"], rows=pc.field("item_id").isin(vocab.ids.numpy()))
    idx = vocab.index(torch.from_numpy(t.column("item_id").to_numpy().copy())).numpy()  # all known (the filter)
    col = t.column("category_id")
    has = ~col.is_null().to_numpy(zero_copy_only=False)  # negative ids are ids (hashed keys are signed)
    cats = col.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    # an item listed twice (an items table not written by ingest) keeps its smallest category, as the
    # evaluation's per-category figures do, not whichever row the scan met last
    first = np.lexsort((cats, ~has, idx))
    first = first[np.unique(idx[first], return_index=True)[1]]
    idx, has, cats = idx[first], has[first], cats[first]
    known = np.unique(cats[has])
    cat_index = np.searchsorted(known, cats) + 1  # 1..C
    cat_index[~has] = 0
    out = torch.zeros(vocab.size + 1, dtype=torch.long)
    out[torch.from_numpy(idx)] = torch.from_numpy(cat_index)
    return out, int(len(known))
