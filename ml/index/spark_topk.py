"""Score items and search top-K inside Spark tasks (``mapInArrow``: vectors in and out as one flat
numpy array per batch, no Python object per row).

The trained model and the Faiss index travel to executors as files (``SparkContext.addFile``) and
are loaded once per executor Python process (the latest of each kind kept); batches of rows stream through them.
Nothing proportional to the catalogue is collected on the driver here.
"""
from __future__ import annotations

import gc
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa

from ml.data.arrays import fixed_lists
from ml.errors import InvalidInput

_CACHE: dict = {}  # kind -> (file name, what was loaded from it)


def _cached(kind: str, key: str, load):
    """What ``load`` gives for the shipped file ``key``, loaded once per Python worker, which Spark
    reuses across tasks and jobs. One entry per kind (a model's artifact, its index, their ids): file
    names are unique per run, so a worker that served a model's item pass, then its user pass, or its
    runs night after night, kept each one (two towers' tables of 10^7 rows, 2.6 GB each, per worker)
    until it exited. Two models searched at once (two notebooks on one cluster) keep one each."""
    held = _CACHE.get(kind)
    if held is None or held[0] != key:
        del held
        _CACHE.pop(kind, None)
        gc.collect()  # the previous one's memory before the next is loaded
        _CACHE[kind] = (key, load())
    return _CACHE[kind][1]


def embed_partitions(artifact_name: str, model_name: str, run_id: str, schema, side: str = "item",
                     batch_size: int = 4096):
    """mapInArrow function; ``schema``: the Spark schema of the rows it yields.

    side="item": (item_id) rows -> (item_id, model, vector, candidate_vector, run_id);
    side="user" (DAT / two-tower): (user_id) rows -> (user_id, model, vector, run_id), the query tower.
    Ids not in the model's vocabulary are skipped (their count is the input minus the output).
    """
    from pyspark.sql.pandas.types import to_arrow_schema

    key = "item_id" if side == "item" else "user_id"
    out_schema = to_arrow_schema(schema)

    def fn(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import torch
        from pyspark import SparkFiles

        encoders = _cached(f"model {model_name}", artifact_name, lambda: load_encoders(SparkFiles.get(artifact_name)))
        found = encoders["run"]
        if found is not None and found != run_id:
            raise InvalidInput(f"{artifact_name} holds the weights of run {found}, and run.json beside it names "
                               f"{run_id}: the model folder mixes two runs (a training killed while publishing "
                               "it); rerun jobs.train")
        if side not in encoders:
            raise InvalidInput(f"{artifact_name}: this model has no {side} tower")
        encode, vocab, same = encoders[side]
        torch.set_num_threads(1)
        for batch in batches:
            ids = torch.from_numpy(batch.column(key).to_numpy().astype(np.int64))
            idx = vocab.index(ids)
            known = idx > 0
            n = int(known.sum())
            if not n:
                continue
            trig, cand = encode(idx[known], batch_size)
            cols = {key: pa.array(ids[known].numpy()), "model": pa.array([model_name] * n),
                    "vector": vectors(trig.numpy()), "run_id": pa.array([run_id] * n)}
            if side == "item":
                cols["candidate_vector"] = (pa.nulls(n, out_schema.field("candidate_vector").type) if same
                                            else vectors(cand.numpy()))
            yield pa.RecordBatch.from_arrays([cols[f.name] for f in out_schema], schema=out_schema)

    return fn


def vectors(m: np.ndarray) -> pa.ListArray:
    """(n, d) array -> n lists of d float32 (the offsets of equal lengths over one flat buffer)."""
    return fixed_lists(np.ascontiguousarray(m, dtype=np.float32).ravel(), m.shape[1])


def matrix(lists: pa.Array, what: str) -> np.ndarray:
    """n lists of d numbers (a batch's vector column) -> (n, d) float32, one copy; lists of unequal
    lengths (or null ones) are :class:`InvalidInput` naming ``what``."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    n = len(lists)
    if lists.null_count:
        raise InvalidInput(f"{what}: {lists.null_count:,} null vectors")
    lengths = np.diff(lists.offsets.to_numpy())
    if n and (lengths != lengths[0]).any():
        raise InvalidInput(f"{what}: vectors of {sorted(set(lengths.tolist()))[:5]} dimensions in one table")
    d = int(lengths[0]) if n else 0
    return lists.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, d)


def run_tag(meta: dict) -> Optional[str]:
    """``<training run>:<steps>`` of a run.json or an artifact's extra; None before run ids."""
    return f"{meta['run_id']}:{meta['steps']}" if meta.get("run_id") else None


def widen_to_float64(model):
    """Score in float64 (the encoders' outputs are rounded to float32 at the end): a vector is then the
    same bits whatever partition, Arrow batch or chunk it was scored in. In float32 the kernels' sums
    run in an order set by the batch's shape (and the pointer encodes a batch's distinct neighbours
    together), so the same item scored alone and among 4,096 differed in the last bit, and a rerun
    over the same table partitioned another way (another cluster, another
    ``spark.sql.shuffle.partitions``) wrote another table. float64's own differences vanish in the
    rounding, but for about 10^-9 of the values. The id tables (the memory at catalogue scale) stay
    float32; their rows are widened as they are read."""
    from torch import nn

    def widen(_module, _inputs, out):
        return out.double()

    for m in model.modules():
        if isinstance(m, nn.Embedding):
            m.register_forward_hook(widen)
            continue
        for p in m.parameters(recurse=False):
            p.data = p.data.double()
        for name, b in m.named_buffers(recurse=False):
            if b.is_floating_point():
                setattr(m, name, b.double())
    return model


def load_encoders(path: str) -> dict:
    """Artifact -> {side: (encode(indices, batch) -> (query-side, candidate-side) vectors, vocab, same sides?)},
    and "run": its :func:`run_tag`.

    Every model has the "item" side; DAT / two-tower also the "user" side (query tower).
    """
    import torch

    blob = torch.load(path, map_location="cpu", weights_only=False)  # read once, for its kind and the model
    kind, run = blob.get("kind"), run_tag(blob.get("extra") or {})
    if kind == "natm":
        from ml.train.natm_task import embed_items, load_artifact

        model, vocab, _ = load_artifact(path, blob)
        widen_to_float64(model)
        return {"item": ((lambda idx, bs: embed_items(model, idx, bs)), vocab, not model.asymmetric), "run": run}
    if kind == "dat":
        from ml.train.dat_task import embed, load_dat_artifact

        model, users, items = load_dat_artifact(path, blob)
        widen_to_float64(model)

        def tower(side):
            def encode(idx, bs):
                v = embed(model, idx, side, bs)
                return v, v
            return encode

        return {"item": (tower("item"), items, True), "user": (tower("user"), users, True), "run": run}
    raise InvalidInput(f"{path}: unknown model artifact kind {kind!r}")


def check_finite(vectors: np.ndarray, ids: np.ndarray, what: str) -> None:
    """Refuse NaN / inf vectors: Faiss returns no neighbours for them, so those items would get no
    rows (or never be found) without a word. A model that diverged, or a bug, is named instead."""
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise InvalidInput(f"{what}: {int(bad.sum()):,} of {len(ids):,} vectors are not finite (NaN or inf), "
                           f"e.g. ids {ids[bad][:5].tolist()}; the model's weights or inputs are broken: "
                           "retrain (check the training loss) and rerun jobs.embed")


def search_partitions(index_name: str, ids_name: str, k: int, model_name: str, schema, side: str = "item"):
    """mapInArrow function; ``schema``: the Spark schema of the rows it yields.

    side="item": (item_id, vector) query rows -> i2i_topk rows, the item itself excluded;
    side="user": (user_id, vector) query rows -> u2i_topk rows (user_id, item_id, score, rank, model).
    """
    from pyspark.sql.pandas.types import to_arrow_schema

    out_schema = to_arrow_schema(schema)

    def fn(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import faiss
        from pyspark import SparkFiles

        from ml.index.topk import search_topk

        index = _cached(f"index {model_name}", index_name, lambda: faiss.read_index(SparkFiles.get(index_name)))
        ids = _cached(f"ids {model_name}", ids_name, lambda: np.load(SparkFiles.get(ids_name)))
        faiss.omp_set_num_threads(1)
        for batch in batches:
            if not batch.num_rows:
                continue
            q_ids = batch.column("item_id" if side == "item" else "user_id").to_numpy().astype(np.int64)
            q = matrix(batch.column("vector"), f"{side} query vectors of model {model_name}")
            check_finite(q, q_ids, f"{side} query vectors of model {model_name}")
            pos_self = None
            if side == "item":
                pos_self = np.searchsorted(ids, q_ids)
                pos_self = np.where((pos_self < len(ids)) & (ids[np.minimum(pos_self, len(ids) - 1)] == q_ids),
                                    pos_self, -1)
            pos, scores = search_topk(index, q, pos_self, k)
            valid = pos >= 0
            rows = np.repeat(q_ids, k)[valid.ravel()]
            names = ("item_id", "neighbor_id") if side == "item" else ("user_id", "item_id")
            cols = {names[0]: pa.array(rows), names[1]: pa.array(ids[pos[valid]]),
                    "score": pa.array(scores[valid].astype(np.float64)),
                    "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), len(q_ids))[valid.ravel()]),
                    "model": pa.array([model_name] * len(rows))}
            yield pa.RecordBatch.from_arrays([cols[f.name] for f in out_schema], schema=out_schema)

    return fn
