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
    version = io.table_version(cfg.table_path(S.T_I2I_TOPK))
    with pytest.raises(InvalidInput, match=r"i2i_topk\[natm\]: no item has a list: the model has vectors for 1 "
                                           r"item.*the model's lists are left as they were"):
        topk.run(cfg, spark, k=2)
    # the last good lists stay (before, the empty run replaced them with nothing before it raised)
    assert io.table_version(cfg.table_path(S.T_I2I_TOPK)) == version
    assert io.read_table(spark, cfg.table_path(S.T_I2I_TOPK)).count() == 6


def test_asymmetric_lists_rank_candidate_vectors_by_the_trigger_vector(spark, warehouse):
    # Separate encoders (the shipped NATM configs): the index holds the candidate vectors, the queries
    # are the trigger vectors. The lists must be those of T @ C.T, the item itself excluded, ties to the
    # smaller id; C @ T.T (the sides swapped) gives other lists, so a swap cannot pass unseen.
    cfg = load_config(None, [f"warehouse={warehouse}", "model=natm"])
    rng = np.random.default_rng(7)
    n, k = 30, 5
    unit = lambda m: (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    t, c = unit(rng.standard_normal((n, 8))), unit(rng.standard_normal((n, 8)))
    ids = np.arange(n) * 3 + 11
    _write(spark, cfg, [(int(ids[i]), "natm", t[i].tolist(), c[i].tolist(), "r1") for i in range(n)])
    topk.run(cfg, spark, k=k)
    got = {(r.item_id, r.rank): r.neighbor_id
           for r in io.read_table(spark, cfg.table_path(S.T_I2I_TOPK)).where("model = 'natm'").collect()}

    def lists(q, index):
        s = q @ index.T
        np.fill_diagonal(s, -np.inf)
        order = np.lexsort((np.broadcast_to(ids, s.shape), -s), axis=1)[:, :k]
        return {(int(ids[i]), r + 1): int(ids[order[i, r]]) for i in range(n) for r in range(k)}

    assert got == lists(t, c)
    assert got != lists(c, t) and got != lists(t, t)


def test_queries_of_a_compacted_table_are_spread_over_tasks_with_the_same_lists(spark, warehouse, monkeypatch):
    # item_embeddings compacted to one file (OPTIMIZE) was one search task for the whole catalogue
    cfg = load_config(None, [f"warehouse={warehouse}", "model=natm"])
    rng = np.random.default_rng(3)
    v = rng.standard_normal((40, 8))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    df = spark.createDataFrame([(i, "natm", v[i].tolist(), None, "r1") for i in range(40)], ITEM_EMBEDDINGS)
    io.replace_model_partition(spark, df.coalesce(1), cfg.table_path(T_ITEM_EMBEDDINGS), cfg.model, cfg.io.delta_mode)
    topk.run(cfg, spark, k=4)
    one = io.read_table(spark, cfg.table_path(S.T_I2I_TOPK)).collect()
    spread = []
    monkeypatch.setattr(topk, "QUERIES_PER_TASK", 7)  # 40 items: 6 tasks
    real = topk.spread
    monkeypatch.setattr(topk, "spread", lambda *a: spread.append(real(*a)) or spread[-1])
    topk.run(cfg, spark, k=4)
    assert [q.rdd.getNumPartitions() for q in spread] == [6]
    assert sorted(io.read_table(spark, cfg.table_path(S.T_I2I_TOPK)).collect()) == sorted(one) and len(one) == 160
    # a read with as many tasks already is left as it is (no shuffle of the vectors)
    three = df.repartition(3)
    assert real(spark, three, 40, S.ITEM_ID) is not three  # 40 items: 6 tasks wanted, 3 given
    monkeypatch.setattr(topk, "QUERIES_PER_TASK", 14)
    assert real(spark, three, 40, S.ITEM_ID) is three  # 3 wanted


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
    # an item with two vectors (a table appended to by hand): its lists would interleave, others hold it twice
    twice = pa.table({"item_id": pa.array([5, 3, 5, 4, 3], pa.int64()),
                      "vector": pa.array([[1.0, 0.0]] * 5, pa.list_(pa.float32()))})
    with pytest.raises(InvalidInput, match=r"t: 2 items with more than one vector \(e.g. item_id 3, 5\): rerun jobs.embed"):
        topk.candidate_vectors(twice, "t", "m")
    nulls = pa.table({"item_id": pa.array([1, None], pa.int64()), "vector": pa.array([[1.0]] * 2, pa.list_(pa.float32()))})
    with pytest.raises(InvalidInput, match="t: 1 rows without an item_id"):
        topk.candidate_vectors(nulls, "t", "m")


def _random_natm(V, N, **kw):
    import torch

    from ml.models.natm import NATM, NATMConfig, build_neighbor_table

    g = torch.Generator().manual_seed(1)
    items, rank = torch.arange(1, V + 1).repeat_interleave(N), torch.arange(1, N + 1).repeat(V)
    nbr, weight = torch.randint(1, V + 1, (V * N,), generator=g), torch.randint(1, 200, (V * N,), generator=g).float()
    model = NATM(NATMConfig(num_items=V, num_neighbors=N, dropout=0.0, **kw), build_neighbor_table(V, items, nbr, weight, rank, N, 16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("kind", ["natm_pointer", "natm_transformer", "dat"])
def test_an_items_vector_is_the_same_bits_whatever_else_is_scored_with_it(tmp_path, kind):
    """The embed job's tasks get the ids in whatever partitions and Arrow batches the table gives, and
    a vector must not depend on them. In float32 the same item scored alone, or among 100, came out
    different in the last bit on the 2-core Intel Xeon box (kernels sum in an order set by the batch's
    shape; the pointer encodes a batch's distinct neighbours together), so a rerun of the pipeline on
    another cluster shape wrote another table."""
    import torch

    from ml.index.spark_topk import load_encoders
    from ml.train.tables import build_vocab

    V = 700
    path = str(tmp_path / "model.pt")
    if kind == "dat":
        from ml.models.dat import DAT, DATConfig
        from ml.train.dat_task import save_dat_artifact

        torch.manual_seed(0)
        cfg = DATConfig(num_users=V, num_items=V, num_categories=5, user_feature_sizes=(3, 4), id_dim=64,
                        feature_dim=16, hidden=(256, 128, 32), use_amm=True)
        model = DAT(cfg, torch.randint(0, 3, (V + 1, 2)), torch.cat([torch.zeros(1), torch.arange(V) % 5 + 1]).long())
        save_dat_artifact(path, model, build_vocab(np.arange(V)), build_vocab(np.arange(V)), {"run_id": "r", "steps": 1})
    else:
        from ml.train.natm_task import save_artifact

        kw = (dict(layers=0, residual=True, neighbor_pointer=True, separate_encoders=True, dim=128)
              if kind == "natm_pointer" else dict(layers=2, heads=4, dim=64))
        save_artifact(path, _random_natm(V, 9, **kw), build_vocab(np.arange(V)), {"run_id": "r", "steps": 1})
    encoders = load_encoders(path)
    for side in ("item", "user") if kind == "dat" else ("item",):
        encode = encoders[side][0]
        with torch.no_grad():
            ref = encode(torch.arange(1, V + 1), 256)
            for n in (1, 7, 100, 333):
                pick = torch.randperm(V, generator=torch.Generator().manual_seed(n))[:n] + 1
                got = encode(pick, 256)
                assert got[0].dtype == torch.float32
                for a, b in zip(got, ref):
                    assert torch.equal(a, b[pick - 1]), (side, n)


def test_lists_an_ivf_search_left_short_are_counted_in_a_warning(spark, warehouse, caplog):
    # an IVF index probing one of 10 lists finds about a tenth of the catalogue per query: lists of
    # fewer than k items, which were written without a word
    cfg = load_config(None, [f"warehouse={warehouse}", "model=natm", "baseline.index=ivf", "baseline.nlist=10",
                             "baseline.nprobe=1"])
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(60, 4))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    _write(spark, cfg, [(i, "natm", vecs[i].tolist(), None, "r1") for i in range(60)])
    with caplog.at_level("WARNING", logger="jobs.topk"):
        out = topk.run(cfg, spark, k=20)
    short = [r.getMessage() for r in caplog.records if "list rows are missing" in r.getMessage()]
    assert out["rows"] < 60 * 20 and short == [
        f"i2i_topk[natm]: {60 * 20 - out['rows']} of 1200 list rows are missing (lists shorter than k=20): the "
        "IndexIVFFlat index found fewer neighbours than asked; raise baseline.nprobe (now 1) or set "
        "baseline.index=flat"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="jobs.topk"):  # exact search: every list full, no warning
        assert topk.run(load_config(None, [f"warehouse={warehouse}", "model=natm"]), spark, k=20)["rows"] == 1200
    assert not [r for r in caplog.records if "missing" in r.getMessage()]


def test_a_user_tower_model_without_user_vectors_writes_no_lists(spark, warehouse):
    # the i2i lists alone, beside the u2i lists of an earlier run, were one model's lists of two runs
    cfg = load_config(None, [f"warehouse={warehouse}", "model=dat"])
    _write(spark, cfg, [(i, "dat", [math.cos(i), math.sin(i)], None, "r1") for i in (1, 2, 3)])
    with pytest.raises(InvalidInput, match=r"user_embeddings does not exist: model=dat has a user tower; run "
                                           r"jobs.embed for model=dat"):
        topk.run(cfg, spark, k=2)
    assert not io.table_exists(cfg.table_path(S.T_I2I_TOPK))


def test_an_executor_keeps_only_the_latest_model_index_and_ids_it_loaded():
    # Python workers are reused across tasks and jobs, and each run ships files of new names: the
    # cache kept every run's model and index (the item pass's and the user pass's, every model's)
    import weakref

    from ml.index import spark_topk

    class Loaded:  # a model or index: something a weak reference can watch
        pass

    loads = []

    def load(name):
        loads.append(name)
        return Loaded()

    spark_topk._CACHE.clear()
    first = spark_topk._cached("index", "a.faiss", lambda: load("a"))
    assert spark_topk._cached("index", "a.faiss", lambda: load("a")) is first and loads == ["a"]
    gone = weakref.ref(first)
    del first
    spark_topk._cached("ids", "a-ids.npy", lambda: load("a-ids"))  # another kind stays beside it
    spark_topk._cached("index", "b.faiss", lambda: load("b"))
    assert gone() is None and loads == ["a", "a-ids", "b"]
    assert set(spark_topk._CACHE) == {"index", "ids"} and spark_topk._CACHE["index"][0] == "b.faiss"
    spark_topk._CACHE.clear()


def test_vector_columns_go_to_numpy_and_back_as_one_flat_buffer():
    import pyarrow as pa

    from ml.index.spark_topk import matrix, vectors

    m = np.arange(12, dtype=np.float32).reshape(4, 3)
    col = vectors(m)
    assert col.to_pylist() == m.tolist()
    np.testing.assert_array_equal(matrix(col, "v"), m)
    np.testing.assert_array_equal(matrix(col.slice(1, 2), "v"), m[1:3])  # a slice's offsets start past 0
    chunked = pa.chunked_array([col.slice(0, 1), col.slice(1, 3)])
    np.testing.assert_array_equal(matrix(chunked, "v"), m)
    assert matrix(vectors(np.zeros((0, 3))), "v").shape == (0, 0)
    with pytest.raises(InvalidInput, match=r"user query vectors: vectors of \[2, 3\] dimensions in one table"):
        matrix(pa.array([[1.0, 2.0, 3.0], [1.0, 2.0]], pa.list_(pa.float32())), "user query vectors")
    with pytest.raises(InvalidInput, match="v: 1 null vectors"):
        matrix(pa.array([[1.0], None], pa.list_(pa.float32())), "v")
