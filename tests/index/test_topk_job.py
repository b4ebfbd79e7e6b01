"""The top-K job on hand-written embeddings: every vector must be finite, or the job names the ids."""
import math

import numpy as np
import pytest

from jobs import topk
from jobs.embed import ITEM_EMBEDDINGS, T_ITEM_EMBEDDINGS
from ml import schemas as S
from ml.config import load_config
from ml.data import io
from ml.errors import InvalidInput
from ml.index.spark_topk import check_finite


def _write(spark, cfg, rows):
    df = spark.createDataFrame(rows, ITEM_EMBEDDINGS)
    io.replace_model_partition(spark, df, cfg.table_path(T_ITEM_EMBEDDINGS), cfg.model, cfg.io.delta_mode)


def test_topk_refuses_non_finite_vectors_and_reads_one_vector_column(spark, warehouse):
    cfg = load_config(None, [f"warehouse={warehouse}", "model=natm"])
    unit = lambda a: [math.cos(a), math.sin(a)]  # noqa: E731
    # asymmetric: trigger and candidate vectors differ; item 3's candidate is NaN (a diverged model gave
    # Faiss no neighbours for it before, and it silently never appeared in any list)
    rows = [(i, "natm", unit(i), unit(i + 0.1), "r1") for i in (1, 2, 4)] + [(3, "natm", unit(3), [math.nan, 0.0], "r1")]
    _write(spark, cfg, rows)
    with pytest.raises(InvalidInput, match=r"candidate_vector: 1 of 4 vectors are not finite.*ids \[3\]"):
        topk.run(cfg, spark, k=2)
    _write(spark, cfg, [(i, "natm", unit(i / 2), None, "r1") for i in (1, 2, 4)])  # symmetric: vector is the index
    out = topk.run(cfg, spark, k=2)
    assert out["rows"] == 6
    got = io.read_table(spark, cfg.table_path(S.T_I2I_TOPK)).where("model = 'natm' AND rank = 1").collect()
    assert sorted((r.item_id, r.neighbor_id) for r in got) == [(1, 2), (2, 1), (4, 2)]
    # one item: a list never holds its own item, so there is nothing to serve; the stage says so
    # rather than leaving the evaluation to report that topk was never run
    _write(spark, cfg, [(7, "natm", unit(0.5), None, "r2")])
    with pytest.raises(InvalidInput, match=r"i2i_topk\[natm\]: no item has a list: the model has vectors for 1 item"):
        topk.run(cfg, spark, k=2)


def test_check_finite_names_the_ids():
    check_finite(np.ones((3, 2), np.float32), np.array([1, 2, 3]), "v")
    with pytest.raises(InvalidInput, match=r"v: 2 of 3 vectors .* ids \[5, 7\]"):
        check_finite(np.array([[1, 0], [np.inf, 0], [np.nan, 1]], np.float32), np.array([1, 5, 7]), "v")


def test_candidate_vectors_sort_by_id_across_chunks_without_losing_a_row():
    import pyarrow as pa

    rng = np.random.default_rng(0)
    ids = rng.permutation(50) + 100
    vecs = rng.standard_normal((50, 4)).astype(np.float32)
    batches = [pa.record_batch([pa.array(ids[a:b], pa.int64()),
                                pa.array(list(vecs[a:b]), pa.list_(pa.float32()))], ["item_id", "vector"])
               for a, b in ((0, 7), (7, 7), (7, 31), (31, 50))]  # an empty chunk among them
    got_ids, got = topk.candidate_vectors(pa.Table.from_batches(batches), "t", "m")
    order = np.argsort(ids)
    assert got_ids.tolist() == ids[order].tolist() and got.dtype == np.float32
    assert np.array_equal(got, vecs[order])
    # lengths 2, 1, 3 add up to 3 x 2: counted per vector, not per chunk
    for bad in ([[1.0, 2.0], [3.0], [4.0, 5.0, 6.0]], [[], [], []]):
        ragged = pa.table({"item_id": pa.array([1, 2, 3], pa.int64()), "vector": pa.array(bad, pa.list_(pa.float32()))})
        with pytest.raises(InvalidInput, match=r"t.vector: vectors of \d to \d values, not one length above 0"):
            topk.candidate_vectors(ragged, "t", "m")
