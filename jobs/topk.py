"""``item_embeddings`` -> ``i2i_topk`` with Faiss (exact for small catalogues, IVF for large);
for DAT / two-tower also ``user_embeddings`` -> ``u2i_topk`` against the same item index.

    python -m jobs.topk --conf conf/ml1m_natm.yaml [--set baseline.k=100]

The index is built once from the model's candidate vectors, written to a file and shipped to the
executors; query items are sharded across Spark tasks, each searching the full index, excluding
the item itself (i2i), ties broken by the smaller item id. Rerunning one model replaces its partition.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ml import schemas as S
from ml.config import Config
from ml.data import io
from ml.data.session import get_spark, ship_path, tasks_for
from ml.errors import InvalidInput
from ml.index.spark_topk import check_finite, search_partitions
from ml.index.topk import build_index
from ml.train.tables import read_columns

from jobs._cli import command, parse, print_tables
from jobs.baseline import BASELINES
from jobs.embed import T_ITEM_EMBEDDINGS, T_USER_EMBEDDINGS, USER_MODELS

log = logging.getLogger("jobs.topk")
QUERIES_PER_TASK = 20_000  # items (or users) searched per task, at least: as jobs.embed embeds them


@io.job_run
def run(cfg: Config, spark=None, k: Optional[int] = None) -> dict:
    import faiss

    if cfg.model in BASELINES:
        raise InvalidInput(f"model={cfg.model!r} is a baseline: its i2i_topk rows come from "
                           f"`python -m jobs.baseline --model {cfg.model}`, not from embeddings")
    spark = spark or get_spark(cfg.spark)
    mode, k = cfg.io.delta_mode, k or cfg.baseline.k
    # The index needs every candidate vector in one place: read the model's partition (only its
    # files) with delta-rs, one vector column (n x dim x 4 bytes on the driver, the index as much again).
    # Every read of the item vectors (the index, the run check, the queries) at one version: an embed
    # committing meanwhile would give the index one run's vectors and the queries another's.
    emb = cfg.table_path(T_ITEM_EMBEDDINGS)
    version = io.table_version(emb) if io.table_exists(emb) else None  # absent: read_columns says so
    part = [(S.MODEL, "=", cfg.model)]
    t = read_columns(emb, ["item_id", "candidate_vector"], version=version, partitions=part)
    if t.num_rows and t.column("candidate_vector").null_count == t.num_rows:  # one vector per item (symmetric)
        t = read_columns(emb, ["item_id", "vector"], version=version, partitions=part)
    if t.num_rows == 0:
        raise InvalidInput(f"item_embeddings has no rows for model={cfg.model!r}: run jobs.embed first")
    users = None
    if cfg.model in USER_MODELS:
        # the run ids by Spark, not in the driver's read: a string per item (0.4 GB at 10^7 items) for one value
        run_ids = sorted(r[0] for r in io.read_table(spark, emb, version=version, delta_mode=mode,
                                                     partitions={S.MODEL: [cfg.model]})
                         .select("run_id").distinct().limit(2).collect())
        if not io.table_exists(cfg.table_path(T_USER_EMBEDDINGS)):  # the i2i lists alone left the earlier u2i
            raise InvalidInput(f"{cfg.table_path(T_USER_EMBEDDINGS)} does not exist: model={cfg.model} has a user "
                               f"tower; run jobs.embed for model={cfg.model} (it writes both vector tables)")
        # at one version, as the items: the run check below and the search are two reads, and with the
        # Delta jars an unpinned DataFrame reads the latest version at each (an embed run committing in
        # between would pass the check with the earlier users and search with the later ones)
        user_path = cfg.table_path(T_USER_EMBEDDINGS)
        users = io.read_table(spark, user_path, version=io.table_version(user_path), delta_mode=mode,
                              partitions={S.MODEL: [cfg.model]})
        # Item and user vectors must come from one model: an embed run killed between its two commits
        # would otherwise pair this run's items with the previous run's users, without a word.
        user_runs = sorted(r[0] for r in users.select("run_id").distinct().limit(2).collect())
        if user_runs != run_ids:
            raise InvalidInput(f"{T_USER_EMBEDDINGS}[{cfg.model}] is from run {user_runs}, {T_ITEM_EMBEDDINGS} "
                               f"from run {run_ids}: rerun jobs.embed for model={cfg.model}")
        users = users.select(S.USER_ID, "vector")
    ids, vecs = candidate_vectors(t, f"item_embeddings[{cfg.model}]", cfg.model)
    del t  # the vectors' Arrow buffers: the sorted copy is the one left
    pa.default_memory_pool().release_unused()
    b = cfg.baseline
    index = build_index(vecs, kind=b.index, exact_max=b.exact_max, nlist=b.nlist, nprobe=b.nprobe, seed=cfg.seed)
    index_type = type(index).__name__
    del vecs  # the index holds its own copy
    index_file, ids_file = ship_path(f"{cfg.model}.faiss"), ship_path(f"{cfg.model}-ids.npy")
    faiss.write_index(index, index_file)
    del index  # the executors load the file; the driver needs no index while they search
    np.save(ids_file, ids)
    spark.sparkContext.addFile(index_file)
    spark.sparkContext.addFile(ids_file)
    queries = spread(spark, io.read_table(spark, emb, version=version, delta_mode=mode,
                                          partitions={S.MODEL: [cfg.model]}).select(S.ITEM_ID, "vector"),
                     len(ids), S.ITEM_ID)
    topk = queries.mapInArrow(search_partitions(os.path.basename(index_file), os.path.basename(ids_file), k,
                                                cfg.model, S.I2I_TOPK), S.I2I_TOPK)
    version, n = io.replace_model_partition(spark, topk, cfg.table_path(S.T_I2I_TOPK), cfg.model, mode,
                                            refuse_empty=lambda: InvalidInput(
                                                f"i2i_topk[{cfg.model}]: no item has a list: the model has vectors "
                                                f"for {len(ids):,} item(s), and a list never holds its own item; "
                                                "the model's lists are left as they were"))
    log.info("i2i_topk[%s]: %d rows for %d items (k=%d), version %d", cfg.model, n, len(ids), k, version)
    full = len(ids) * min(k, len(ids) - 1)  # every item queried, itself never in its list
    if n < full:  # an IVF index searched too few lists (exact search fills every list)
        log.warning("i2i_topk[%s]: %d of %d list rows are missing (lists shorter than k=%d): the %s index "
                    "found fewer neighbours than asked; raise baseline.nprobe (now %d) or set "
                    "baseline.index=flat", cfg.model, full - n, full, k, index_type, b.nprobe)
    out = {"rows": n, "items": len(ids), "version": version}
    if users is not None:
        u2i = spread(spark, users, users.count(), S.USER_ID).mapInArrow(
            search_partitions(os.path.basename(index_file), os.path.basename(ids_file), k, cfg.model, S.U2I_TOPK,
                              side="user"), S.U2I_TOPK)
        _, out["u2i_rows"] = io.replace_model_partition(spark, u2i, cfg.table_path(S.T_U2I_TOPK), cfg.model, mode)
        log.info("u2i_topk[%s]: %d rows (k=%d)", cfg.model, out["u2i_rows"], k)
    return out


def spread(spark, queries, n: int, key: str):
    """``queries`` in at least one task per :data:`QUERIES_PER_TASK` of their ``n`` rows. The read's
    tasks follow the table's files: after a compaction (OPTIMIZE) a catalogue of 200,000 64-d vectors
    is one 51 MB file, one task, and one core would search for every item while the others wait.
    Repartitioned (by ``key``, a shuffle of the vectors) only then; the lists are the same either way."""
    wanted = tasks_for(spark, n, QUERIES_PER_TASK)
    return queries if queries.rdd.getNumPartitions() >= wanted else queries.repartition(wanted, key)


def candidate_vectors(t, where: str, model: str):
    """``(ids sorted, their vectors as one (n, d) float32 array)`` from an Arrow table of ``item_id`` and
    one list<float> column (n > 0 rows). Each chunk's values are read as a view of its Arrow buffer and
    scattered straight into their sorted rows: one copy in all (there were two, a concatenation and the
    sorted copy, with the table alive until the job ended). The caller drops the table before the index
    copies the vectors: for 2M x 64 vectors in 8 chunks (0.48 GB a copy) the driver peaked at 1.35 GB,
    against 1.95 GB before."""
    name = t.column_names[1]
    col = t.column(name)
    if col.null_count:
        raise InvalidInput(f"{where}: {col.null_count:,} items without a {name}: rerun jobs.embed for model={model}")
    if t.column("item_id").null_count:  # to_numpy would make the ids floats, and a null some other id
        raise InvalidInput(f"{where}: {t.column('item_id').null_count:,} rows without an item_id: rerun jobs.embed "
                           f"for model={model}")
    raw_ids = t.column("item_id").to_numpy()
    n = len(raw_ids)
    order = np.argsort(raw_ids, kind="stable")
    ids = raw_ids[order]
    twice = np.unique(ids[1:][ids[1:] == ids[:-1]])
    if len(twice):  # two vectors for one item: its lists would interleave, and other lists hold it twice
        raise InvalidInput(f"{where}: {len(twice):,} items with more than one vector (e.g. item_id "
                           f"{', '.join(map(str, twice[:3]))}): rerun jobs.embed for model={model}")
    row = np.empty(n, dtype=np.int64)
    row[order] = np.arange(n)  # each table row's place in id order
    lengths = pc.min_max(pc.list_value_length(col))
    dim = lengths["max"].as_py()
    if lengths["min"].as_py() != dim or not dim:
        raise InvalidInput(f"{where}.{name}: vectors of {lengths['min'].as_py()} to {dim} values, not one "
                           f"length above 0: rerun jobs.embed for model={model}")
    vecs = np.empty((n, dim), dtype=np.float32)
    start = 0
    for chunk in col.chunks:
        m = len(chunk)
        vecs[row[start:start + m]] = chunk.flatten().to_numpy(zero_copy_only=False).reshape(m, dim)
        start += m
    check_finite(vecs, ids, f"{where}.{name}")
    return ids, vecs


@command
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg, _ = parse(__doc__, argv)
    out = run(cfg)
    print(f"i2i_topk[{cfg.model}]: {out['rows']:,} rows")
    if "u2i_rows" in out:
        print(f"u2i_topk[{cfg.model}]: {out['u2i_rows']:,} rows")
    print_tables(cfg, [S.T_I2I_TOPK] + ([S.T_U2I_TOPK] if "u2i_rows" in out else []))


if __name__ == "__main__":
    main()
