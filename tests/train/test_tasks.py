"""The model tasks refuse sample tables that do not fit the training config or the vocabulary."""
import pyarrow as pa
import pytest
from deltalake import write_deltalake

from ml.config import load_config
from ml.train.dat_task import dat_batches
from ml.train.natm_task import natm_batches
from ml.train.tables import build_vocab
from tests.conftest import ROOT


def _natm_samples(path, negatives_width, ids=(1, 2, 3), q_negatives=None, q_positive=None):
    n = len(ids)
    q_negatives = q_negatives or [[0.1] * negatives_width] * n
    write_deltalake(path, pa.table({
        "trigger_item": pa.array(list(ids), pa.int64()), "positive_item": pa.array([2] * n, pa.int64()),
        "negatives": pa.array([[3] * negatives_width] * n, pa.list_(pa.int64())),
        "q_positive": pa.array(q_positive or [0.1] * n),
        "q_negatives": pa.array(q_negatives, pa.list_(pa.float64()))},
    ), mode="overwrite")


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf"), 1e-300])  # 1e-300: 0 in float32
def test_natm_samples_with_a_noise_probability_nce_cannot_take(tmp_path, bad):
    # before: a q of 0 or NaN in a hand-made table trained into a NaN loss, unnamed
    wh = str(tmp_path / "wh")
    cfg = load_config(ROOT / "conf" / "synthetic.yaml", [f"warehouse={wh}", "natm.loss=nce", "samples.num_negatives=2"])
    _natm_samples(f"{wh}/samples_natm", negatives_width=3, q_negatives=[[0.1, 0.1, bad]] * 3)
    make, _ = natm_batches(cfg, build_vocab([1, 2, 3]), 0, 1)
    assert len(next(iter(make(0)))["trigger"]) == 3  # beyond the k = 2 the loss reads: not its business
    _natm_samples(f"{wh}/samples_natm", negatives_width=3, q_negatives=[[0.1, 0.1, 0.1], [0.1, bad, 0.1], [0.1] * 3])
    make, _ = natm_batches(cfg, build_vocab([1, 2, 3]), 0, 1)
    with pytest.raises(ValueError, match=r"q_positive / q_negatives hold a value that is not a finite number > 0"):
        next(iter(make(0)))
    _natm_samples(f"{wh}/samples_natm", negatives_width=3, q_positive=[0.1, 0.1, bad])
    make, _ = natm_batches(cfg, build_vocab([1, 2, 3]), 0, 1)
    with pytest.raises(ValueError, match=r"q_positive / q_negatives hold a value that is not a finite number > 0"):
        next(iter(make(0)))


def test_natm_samples_with_fewer_stored_negatives_than_training_uses(tmp_path):
    # before: [:, :k] silently gave fewer columns while the NCE loss still used log(k q)
    wh = str(tmp_path / "wh")
    _natm_samples(f"{wh}/samples_natm", negatives_width=4)
    cfg = load_config(ROOT / "conf" / "synthetic.yaml", [f"warehouse={wh}", "natm.loss=nce",
                                                         "samples.num_negatives=9"])
    make, _ = natm_batches(cfg, build_vocab([1, 2, 3]), 0, 1)
    with pytest.raises(ValueError, match=r"stores 4 negatives per sample, training uses 9"):
        next(iter(make(0)))


def test_natm_and_dat_samples_with_ids_outside_the_vocabulary(tmp_path):
    # before: unknown ids became index 0 (padding) and trained as such, or in the exact softmax as item V
    wh = str(tmp_path / "wh")
    _natm_samples(f"{wh}/samples_natm", negatives_width=9, ids=(1, 2, 77))
    cfg = load_config(ROOT / "conf" / "synthetic.yaml", [f"warehouse={wh}"])
    make, _ = natm_batches(cfg, build_vocab([1, 2, 3]), 0, 1)
    with pytest.raises(ValueError, match=r"holds trigger_item ids the vocabulary .* does not know, e\.g\. \[77\]"):
        next(iter(make(0)))
    write_deltalake(f"{wh}/samples_dat", pa.table({"user_id": pa.array([5, 6], pa.int64()),
                                                   "item_id": pa.array([1, 2], pa.int64()),
                                                   "label": pa.array([1.0, 0.0], pa.float32())}))
    make, _ = dat_batches(cfg, build_vocab([5]), build_vocab([1, 2]), 0, 1)
    with pytest.raises(ValueError, match=r"holds user_ids the vocabulary \(sequences\) does not know, e\.g\. \[6\]"):
        next(iter(make(0)))


def test_read_columns_reads_the_pinned_version_of_a_side_table(tmp_path):
    # every DDP rank builds its vocabulary from the version rank 0 saw, not from whatever is latest
    # when it gets there (a commit in between gave ranks different item indices)
    import pyarrow as pa
    from deltalake import write_deltalake

    from ml.train.tables import agreed_versions, pinned_versions, read_columns

    path = str(tmp_path / "noise_q")
    write_deltalake(path, pa.table({"item_id": [1, 2], "q": [0.5, 0.5]}))
    versions = agreed_versions([path, str(tmp_path / "absent")])
    assert versions == {path: 0}  # tables that do not exist are left out
    write_deltalake(path, pa.table({"item_id": [7], "q": [1.0]}), mode="overwrite")
    with pinned_versions(versions):
        assert read_columns(path, ["item_id"]).column("item_id").to_pylist() == [1, 2]
        assert read_columns(path, ["item_id"], version=1).column("item_id").to_pylist() == [7]
    assert read_columns(path, ["item_id"]).column("item_id").to_pylist() == [7]


@pytest.mark.parametrize("loss,mlm_weight", [("full", 0.0), ("softmax", 0.1), ("nce", 0.1)])
def test_natm_trainer_reports_its_metrics_as_detached_tensors(loss, mlm_weight):
    # Before, each metric was a float(): a device-to-host sync every step, which the loop's logging
    # window (sums kept as tensors, read every log_every steps) exists to avoid.
    import torch

    from ml.models.natm import NATM, NATMConfig, build_neighbor_table
    from ml.train.natm_task import NATMTrainer

    none = torch.zeros(0, dtype=torch.long)
    cfg = NATMConfig(num_items=20, num_neighbors=3, dim=8, layers=1, heads=2, dropout=0.0, loss=loss,
                     mlm_weight=mlm_weight)
    model = NATM(cfg, build_neighbor_table(20, none, none, none.float(), none, 3, 16, None))
    batch = {"trigger": torch.tensor([1, 5, 9]), "positive": torch.tensor([2, 7, 11]),
             "negatives": torch.tensor([[3, 4], [8, 9], [1, 2]]), "q_positive": torch.full((3,), 0.05),
             "q_negatives": torch.full((3, 2), 0.05)}
    total, metrics = NATMTrainer(model, k=2)(batch)
    assert metrics and ("mlm" in metrics) == (mlm_weight > 0)
    assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in metrics.values())
    assert total.requires_grad


def _natm_batch():
    import torch

    return {"trigger": torch.tensor([1, 5, 9, 14]), "positive": torch.tensor([2, 7, 11, 3]),
            "negatives": torch.tensor([[3, 4], [8, 9], [1, 2], [6, 20]]),
            "q_positive": torch.tensor([0.05, 0.1, 0.02, 0.2]),
            "q_negatives": torch.tensor([[0.02, 0.2], [0.05, 0.01], [0.1, 0.1], [0.03, 0.04]])}


@pytest.mark.parametrize("mlm_weight", [0.1, 0.5])
def test_natm_trainer_loss_is_nce_plus_the_weighted_mlm_of_triggers_and_positives(mlm_weight):
    # loss = NCE + natm.mlm_weight * MLM over the quasi-sequences of the triggers and the positives;
    # the pieces are recomputed from the same seed (the MLM mask is a random draw)
    import torch

    from ml.models.natm import NATM, NATMConfig, build_neighbor_table, nce_loss
    from ml.train.natm_task import NATMTrainer

    V, N = 20, 3
    item = torch.arange(1, V + 1).repeat_interleave(N)
    rank = torch.arange(1, N + 1).repeat(V)
    table = build_neighbor_table(V, item, (item - 1 + rank) % V + 1, 2.0 ** (4 - rank).float(), rank, N, 16)
    cfg = NATMConfig(num_items=V, num_neighbors=N, dim=8, layers=1, heads=2, dropout=0.0, loss="nce",
                     mlm_prob=0.5, mlm_weight=mlm_weight)
    torch.manual_seed(0)
    model = NATM(cfg, table)
    batch = _natm_batch()
    torch.manual_seed(1)
    total, metrics = NATMTrainer(model, k=2)(batch)
    torch.manual_seed(1)
    cands = torch.cat([batch["positive"][:, None], batch["negatives"]], 1)
    q = torch.cat([batch["q_positive"][:, None], batch["q_negatives"]], 1)
    nce = nce_loss(model(batch["trigger"], cands), q, 2, cfg.gamma, model.nce_offset)
    mlm = model.mlm_loss(torch.cat([batch["trigger"], batch["positive"]]))
    torch.manual_seed(1)
    triggers_only = model.mlm_loss(batch["trigger"])
    assert mlm.item() > 0.5 and abs(mlm - triggers_only).item() > 1e-3  # what a wrong MLM input would change
    assert metrics["nce"].item() == pytest.approx(nce.item(), rel=1e-5)
    assert metrics["mlm"].item() == pytest.approx(mlm.item(), rel=1e-5)
    assert total.item() == pytest.approx((nce + mlm_weight * mlm).item(), rel=1e-5)


def test_natm_trainer_softmax_corrects_with_the_positives_distribution():
    # natm.loss=softmax: the trainer passes each candidate's share of the training data (positive_prob)
    # to the batch's inclusion correction; without it, q stands in for the positives' distribution
    import torch

    from ml.models.natm import NATM, NATMConfig, build_neighbor_table
    from ml.train.natm_task import NATMTrainer

    none = torch.zeros(0, dtype=torch.long)
    cfg = NATMConfig(num_items=20, num_neighbors=0, dim=8, layers=0, dropout=0.0, loss="softmax", mlm_weight=0.0)
    torch.manual_seed(0)
    model = NATM(cfg, build_neighbor_table(20, none, none, none.float(), none, 0, 16, None))
    batch = _natm_batch()
    share = torch.linspace(1.0, 20.0, 21, dtype=torch.float64) ** 3
    share[0] = 0.0
    share /= share.sum()  # (V+1,): item 20 far the most frequent, item 1 the least
    total, _ = NATMTrainer(model, k=2, positive_prob=share)(batch)
    cands = torch.cat([batch["positive"][:, None], batch["negatives"]], 1)
    q = torch.cat([batch["q_positive"][:, None], batch["q_negatives"]], 1)
    with_p = model.batch_softmax_loss(batch["trigger"], cands, q, share[cands])
    with_q = model.batch_softmax_loss(batch["trigger"], cands, q, None)
    assert total.item() == pytest.approx(with_p.item(), rel=1e-6)
    assert abs(with_p - with_q).item() > 1e-2  # the two corrections differ on this batch


def test_read_columns_reads_partitions_with_escaped_values_through_arrows_filesystem(tmp_path):
    # read_columns hands delta-rs Arrow's filesystem (see the next test); the files of a partition
    # whose value needs escaping in its folder name must still be found, with the value joined on
    import pyarrow as pa
    from deltalake import write_deltalake

    from ml.train.tables import read_columns

    path = str(tmp_path / "t")
    write_deltalake(path, pa.table({"id": [1, 2, 3], "s": ["a b", "x/y%z", "plain"]}), partition_by=["s"])
    got = read_columns(path, ["id", "s"])
    assert sorted(zip(got.column("id").to_pylist(), got.column("s").to_pylist())) == [
        (1, "a b"), (2, "x/y%z"), (3, "plain")]
    one = read_columns(path, ["id"], partitions=[("s", "=", "x/y%z")])
    assert one.column("id").to_pylist() == [2]
    # io.read_table's spelling of the same filter
    assert sorted(read_columns(path, ["id"], partitions={"s": ["x/y%z", "plain"]}).column("id").to_pylist()) == [2, 3]
    # a row filter alone, and with a partition filter (both hold)
    import pyarrow.compute as pc

    assert sorted(read_columns(path, ["id"], rows=pc.field("id").isin([1, 3, 9])).column("id").to_pylist()) == [1, 3]
    assert read_columns(path, ["id"], partitions={"s": ["x/y%z", "plain"]},
                        rows=pc.field("id").isin([1, 3])).column("id").to_pylist() == [3]
    assert read_columns(f"file://{path}", ["id"]).num_rows == 3
    assert read_columns(f"file:{path}", ["id"]).num_rows == 3  # Spark's spelling
    spaced = str(tmp_path / "a b")
    write_deltalake(spaced, pa.table({"id": [1, 2]}))
    assert read_columns(f"file://{spaced.replace(' ', '%20')}", ["id"]).num_rows == 2


def test_read_columns_leaves_a_process_that_exits_cleanly(tmp_path):
    # delta-rs's own filesystem left threads that aborted the process at exit after a good read
    # (exit 134, "terminate called without an active exception") in about half of fresh processes:
    # a DDP worker or a user's script failing after its work was done. Ten fresh processes, all 0.
    import subprocess
    import sys

    import pyarrow as pa
    from deltalake import write_deltalake

    path = str(tmp_path / "t")
    write_deltalake(path, pa.table({"id": list(range(1000)), "v": [[0.5] * 8] * 1000}))
    code = f"from ml.train.tables import read_columns; assert read_columns({path!r}, ['id', 'v']).num_rows == 1000"
    codes = [subprocess.run([sys.executable, "-c", code], capture_output=True).returncode for _ in range(10)]
    assert codes == [0] * 10


def test_load_categories_takes_negative_ids_as_categories_and_null_as_unknown(tmp_path):
    # hashed category keys (ingest.string_ids) are signed: a negative id was taken as "no category"
    from ml.train.tables import load_categories

    path = str(tmp_path / "items")
    write_deltalake(path, pa.table({"item_id": pa.array([10, 11, 12, 13, 14], pa.int64()),
                                    "category_id": pa.array([-5, 3, None, -5, 9], pa.int64())}))
    cats, n = load_categories(path, build_vocab([10, 11, 12, 13, 14, 15]))
    assert n == 3  # -5, 3, 9 -> indices 1, 2, 3
    assert cats.tolist() == [0, 1, 2, 0, 1, 3, 0]  # padding, items 10..14, item 15 has no row
    assert load_categories(str(tmp_path / "absent"), build_vocab([1])) == (None, 0)
    # categories of the vocabulary's items only: 9 belongs to item 14 alone, which did not train
    cats, n = load_categories(path, build_vocab([10, 11, 12, 13]))
    assert n == 2 and cats.tolist() == [0, 1, 2, 0, 1]
    # an item listed twice keeps its smallest category (null only when it has none), in any row order;
    # a category only its other row held is no category of the vocabulary
    for order in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0]):
        twice = str(tmp_path / f"twice{order[0]}")
        rows = [(10, 7), (10, 4), (11, None), (11, 8), (12, None)]
        write_deltalake(twice, pa.table({"item_id": pa.array([rows[i][0] for i in order], pa.int64()),
                                         "category_id": pa.array([rows[i][1] for i in order], pa.int64())}))
        cats, n = load_categories(twice, build_vocab([10, 11, 12]))
        assert n == 2 and cats.tolist() == [0, 1, 2, 0]  # 4 -> 1, 8 -> 2; 7 is no category


def test_graph_edges_of_items_outside_the_vocabulary_are_left_out_with_a_count(tmp_path, caplog):
    # an item_graph built from other sequences than noise_q (a stage rerun alone): its unknown items'
    # edges were dropped without a word
    import torch

    from ml.train.tables import load_graph

    path = str(tmp_path / "g")
    write_deltalake(path, pa.table({"item_id": pa.array([1, 1, 2, 9], pa.int64()),
                                    "neighbor_id": pa.array([2, 3, 1, 1], pa.int64()),
                                    "weight": [3.0, 1.0, 2.0, 5.0], "rank": pa.array([1, 2, 1, 1], pa.int32())}))
    with caplog.at_level("WARNING", logger="ml.train.tables"):
        item, nbr, weight, rank = load_graph(path, build_vocab([1, 2, 3]))
    vocab = build_vocab([1, 2, 3])
    assert item.tolist() == vocab.index(torch.tensor([1, 1, 2])).tolist() and weight.tolist() == [3.0, 1.0, 2.0]
    assert [r.getMessage() for r in caplog.records] == [
        "item_graph: 1 of 4 edges name items not in noise_q (the training items) and are left out; rerun "
        "jobs.graph and jobs.samples on the same sequences"]
    # only the ranks the model takes are read (natm.num_neighbors below graph.top_n)
    item, nbr, weight, rank = load_graph(path, build_vocab([1, 2, 3]), max_rank=1)
    assert rank.tolist() == [1, 1] and weight.tolist() == [3.0, 2.0] and rank.dtype == torch.int64
    # natm.num_neighbors=0 (NATM without its graph): no edge read, empty tensors of the same kinds
    item, nbr, weight, rank = load_graph(path, build_vocab([1, 2, 3]), max_rank=0)
    assert len(item) == len(nbr) == len(weight) == len(rank) == 0 and weight.dtype == torch.float32
