"""The training reader yields every row of a Delta snapshot once per epoch, deterministically."""
from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from deltalake import WriterProperties, write_deltalake

from ml.train.reader import DeltaBatchDataset, make_loader, snapshot_files

N_FILES, ROWS_PER_FILE, ROW_GROUP = 4, 250, 50  # 4 files × 5 row groups = 20 work units
N_ROWS = N_FILES * ROWS_PER_FILE


def _rows(start: int, n: int) -> pa.Table:
    ids = np.arange(start, start + n)
    return pa.table({
        "id": pa.array(ids, pa.int64()),
        "x": pa.array(ids * 0.5),
        "flag": pa.array(ids % 2 == 0),
        "emb": pa.array([[i, i + 1, i + 2] for i in ids.tolist()], pa.list_(pa.int64())),
        "vec": pa.array([[float(i), -float(i)] for i in ids.tolist()], pa.list_(pa.float64())),
        "name": pa.array([f"item{i}" for i in ids.tolist()]),
    })


def _append(path: str, table: pa.Table, **kwargs) -> None:
    write_deltalake(path, table, mode="append",
                    writer_properties=WriterProperties(max_row_group_size=ROW_GROUP), **kwargs)


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("reader") / "samples")
    for f in range(N_FILES):
        _append(path, _rows(f * ROWS_PER_FILE, ROWS_PER_FILE))
    return path


def _ids(batches: list[dict[str, torch.Tensor]]) -> list[int]:
    return [i for b in batches for i in b["id"].tolist()]


def test_snapshot_has_several_files_and_row_groups(table):
    version, files = snapshot_files(table)
    assert version == N_FILES - 1
    assert files == sorted(files) and len(files) == N_FILES
    assert [pq.ParquetFile(f).metadata.num_row_groups for f in files] == [ROWS_PER_FILE // ROW_GROUP] * N_FILES
    ds = DeltaBatchDataset(table, rank=0, world_size=1)
    assert ds.num_rows() == N_ROWS
    assert ds.columns == ["id", "x", "flag", "emb", "vec"]  # the string column is skipped


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_row_exactly_once_across_ranks_and_workers(table, num_workers):
    ids = []
    for rank in (0, 1):
        ds = DeltaBatchDataset(table, columns=["id", "x", "flag"], batch_size=64, shuffle_buffer=100,
                               rank=rank, world_size=2)
        batches = list(make_loader(ds, num_workers=num_workers))
        for b in batches:  # a row's columns stay together through the shuffle
            assert torch.equal(b["x"], b["id"].float() * 0.5)
            assert torch.equal(b["flag"], b["id"] % 2 == 0)
            assert b["id"].dtype == torch.int64 and b["x"].dtype == torch.float32 and b["flag"].dtype == torch.bool
        rank_ids = _ids(batches)
        assert rank_ids, f"rank {rank} got no rows"
        ids += rank_ids
    assert len(ids) == N_ROWS
    assert sorted(ids) == list(range(N_ROWS))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_few_uneven_row_groups_are_cut_so_ranks_get_similar_rows(tmp_path, num_workers):
    # Two row groups, 900 and 150 rows (as ML-1M's samples_natm: 846k and 129k): dealt whole, one
    # rank got 6x the other's rows. Cut into pieces, each row is still read exactly once, the
    # ranks' rows are within a unit of each other, and batches_per_epoch is the longest rank's count.
    path = str(tmp_path / "uneven")
    write_deltalake(path, _rows(0, 900), writer_properties=WriterProperties(max_row_group_size=900))
    _append(path, _rows(900, 150))  # 3 row groups of 50
    whole = DeltaBatchDataset(path, columns=["id"], batch_size=32, rank=0, world_size=1)
    assert len(whole._units) == 4  # one process: row groups as they are (the order of a run is unchanged)
    for epoch in (0, 1):
        per_rank = []
        for rank in (0, 1):
            ds = DeltaBatchDataset(path, columns=["id", "x"], batch_size=32, shuffle_buffer=64, rank=rank,
                                   world_size=2)
            ds.set_epoch(epoch)
            batches = list(make_loader(ds, num_workers=num_workers))
            assert all(torch.equal(b["x"], b["id"].float() * 0.5) for b in batches)
            per_rank.append(batches)
        assert sorted(_ids(per_rank[0]) + _ids(per_rank[1])) == list(range(1050))
        rows = [len(_ids(b)) for b in per_rank]
        assert abs(rows[0] - rows[1]) <= 2 * max(u.num_rows for u in ds._units) <= 2 * 65, rows  # was 900 vs 150
        assert ds.batches_per_epoch(epoch, num_workers) == max(len(b) for b in per_rank)


def test_pieces_of_a_row_group_span_it_and_it_is_decoded_once_per_rank(tmp_path, monkeypatch):
    # One 4000-row group in id order (samples keep their writer's user order), 2 ranks: cut into
    # contiguous ranges, a batch held ids from a band of a few hundred, and each of the 16 ranges
    # decoded the whole row group again. Strided pieces span the row group; it is decoded once.
    path = str(tmp_path / "ordered")
    write_deltalake(path, _rows(0, 4000), writer_properties=WriterProperties(max_row_group_size=4000))
    reads = []
    real_read = pq.ParquetFile.read_row_group

    def counted(self, i, *args, **kwargs):
        reads.append(i)
        return real_read(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted)
    ids = []
    for rank in (0, 1):
        reads.clear()
        ds = DeltaBatchDataset(path, columns=["id", "x"], batch_size=64, shuffle_buffer=256, rank=rank, world_size=2)
        assert len(ds._units) == 16
        batches = list(ds)
        assert reads == [0]
        assert all(torch.equal(b["x"], b["id"].float() * 0.5) for b in batches)
        spans = [int(b["id"].max() - b["id"].min()) for b in batches]
        assert min(spans) > 2000, spans  # was under 520: 250 rows per range + the 256-row buffer
        ids += _ids(batches)
    assert sorted(ids) == list(range(4000))


def _epoch(table: str, epoch: int, seed: int = 7, num_workers: int = 0) -> list[dict[str, torch.Tensor]]:
    ds = DeltaBatchDataset(table, columns=["id", "vec"], batch_size=64, shuffle_buffer=200, seed=seed,
                           rank=0, world_size=1)
    ds.set_epoch(epoch)
    return list(make_loader(ds, num_workers=num_workers))


def _same_batches(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_same_seed_and_epoch_give_the_same_batches(table, num_workers):
    first = _epoch(table, 0, num_workers=num_workers)
    assert _same_batches(first, _epoch(table, 0, num_workers=num_workers))
    assert _ids(first) != sorted(_ids(first))  # rows are shuffled, not in file order


def test_new_epoch_or_seed_reorders_the_same_rows(table):
    first, second, other_seed = _epoch(table, 0), _epoch(table, 1), _epoch(table, 0, seed=8)
    assert _ids(second) != _ids(first) and _ids(other_seed) != _ids(first)
    assert sorted(_ids(second)) == sorted(_ids(first)) == list(range(N_ROWS))
    assert sorted(_ids(other_seed)) == list(range(N_ROWS))


def test_pinned_version_reads_only_that_versions_rows(tmp_path):
    path = str(tmp_path / "t")
    _append(path, _rows(0, 10))
    _append(path, _rows(100, 10))
    assert snapshot_files(path)[0] == 1
    v0, files0 = snapshot_files(path, version=0)
    assert v0 == 0 and len(files0) == 1
    pinned = DeltaBatchDataset(path, columns=["id"], batch_size=4, version=0, rank=0, world_size=1)
    assert pinned.version == 0 and pinned.num_rows() == 10
    assert sorted(_ids(list(pinned))) == list(range(10))
    latest = DeltaBatchDataset(path, columns=["id"], batch_size=4, rank=0, world_size=1)
    assert latest.version == 1
    assert sorted(_ids(list(latest))) == list(range(10)) + list(range(100, 110))


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("reader") / "parts")
    ids = np.arange(120)
    # region values need escaping in directory names; partition columns are not in the Parquet files
    tbl = pa.table({"id": pa.array(ids, pa.int64()),
                    "region": pa.array([["a b", "c%d", "x/y"][i % 3] for i in ids.tolist()]),
                    "day": pa.array(ids % 4, pa.int32())})
    _append(path, tbl.slice(0, 60), partition_by=["region", "day"])
    _append(path, tbl.slice(60), partition_by=["region", "day"])
    return path


def test_partition_values_are_attached_per_file(partitioned):
    ds = DeltaBatchDataset(partitioned, batch_size=16, shuffle_buffer=50, rank=0, world_size=1)
    assert ds.columns == ["id", "day"]  # region is a string: skipped
    batches = list(ds)
    for b in batches:
        assert b["day"].dtype == torch.int64
        assert torch.equal(b["day"], b["id"] % 4)
    assert sorted(_ids(batches)) == list(range(120))
    only_day = list(DeltaBatchDataset(partitioned, columns=["day"], batch_size=50, rank=0, world_size=1))
    assert sorted(torch.cat([b["day"] for b in only_day]).tolist()) == sorted((np.arange(120) % 4).tolist())


def test_fixed_length_lists_become_2d_tensors(table):
    ds = DeltaBatchDataset(table, columns=["id", "emb", "vec"], batch_size=64, shuffle_buffer=100,
                           rank=1, world_size=2)
    for b in ds:
        n = len(b["id"])
        assert b["emb"].shape == (n, 3) and b["emb"].dtype == torch.int64
        assert torch.equal(b["emb"], b["id"][:, None] + torch.arange(3))
        assert b["vec"].shape == (n, 2) and b["vec"].dtype == torch.float32
        assert torch.equal(b["vec"], torch.stack([b["id"].float(), -b["id"].float()], dim=1))


@pytest.mark.parametrize("lengths", [[[2, 3]], [[2, 2], [3, 3]]], ids=["within-file", "across-files"])
def test_variable_length_list_raises_naming_the_column(tmp_path, lengths):
    path = str(tmp_path / "t")
    for file_lengths in lengths:
        _append(path, pa.table({"id": pa.array(range(len(file_lengths)), pa.int64()),
                                "tags": pa.array([[1] * n for n in file_lengths], pa.list_(pa.int64()))}))
    ds = DeltaBatchDataset(path, batch_size=8, rank=0, world_size=1)
    with pytest.raises(ValueError, match="'tags'.*pad"):
        list(ds)


@pytest.mark.parametrize("shuffle_buffer", [0, 10, 100, 5000])
def test_full_batches_except_each_shards_last_and_drop_last_drops_it(table, shuffle_buffer):
    for rank in (0, 1):
        kwargs = dict(columns=["id"], batch_size=64, shuffle_buffer=shuffle_buffer, rank=rank, world_size=2)
        batches = list(DeltaBatchDataset(table, **kwargs))
        sizes = [len(b["id"]) for b in batches]
        assert all(s == 64 for s in sizes[:-1]) and 0 < sizes[-1] <= 64
        shard_rows = sum(sizes)
        assert shard_rows % 64 != 0  # 10 row groups of 50: the last batch is partial
        dropped = list(DeltaBatchDataset(table, drop_last=True, **kwargs))
        assert [len(b["id"]) for b in dropped] == [64] * (shard_rows // 64)
        assert set(_ids(dropped)) < set(_ids(batches))


def test_missing_table_raises_file_not_found_naming_the_path(tmp_path):
    missing = str(tmp_path / "no_such_table")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        snapshot_files(missing)
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        DeltaBatchDataset(missing)


def test_missing_version_raises_file_not_found(table):
    with pytest.raises(FileNotFoundError, match="version 99"):
        snapshot_files(table, version=99)


def test_string_or_unknown_columns_requested_explicitly_raise(table, partitioned):
    with pytest.raises(ValueError, match="'name'.*string"):
        DeltaBatchDataset(table, columns=["id", "name"], rank=0, world_size=1)
    with pytest.raises(ValueError, match="'region'"):
        DeltaBatchDataset(partitioned, columns=["region"], rank=0, world_size=1)
    with pytest.raises(ValueError, match="unknown column 'nope'"):
        DeltaBatchDataset(table, columns=["nope"], rank=0, world_size=1)


def test_rank_and_world_size_default_to_the_environment(table, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = DeltaBatchDataset(table, columns=["id"])
    assert (ds.rank, ds.world_size) == (1, 2)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    ds = DeltaBatchDataset(table, columns=["id"])
    assert (ds.rank, ds.world_size) == (0, 1)


def test_hadoop_s3_uris_reach_arrow_as_s3_and_stored_keys_stay_literal():
    from ml.data.files import arrow_uri as _arrow_uri

    # Spark on YARN / EMR is given s3a:// (the README's cluster recipe); Arrow knows only s3://
    assert _arrow_uri("s3a://bucket/wh/samples_natm/part-0.parquet") == "s3://bucket/wh/samples_natm/part-0.parquet"
    assert _arrow_uri("S3N://bucket/x.parquet") == "s3://bucket/x.parquet"
    # a Hive directory literally named "s=a%20b" stays that key after Arrow decodes the URI
    assert _arrow_uri("s3a://b/t/s=a%20b/p.parquet") == "s3://b/t/s=a%2520b/p.parquet"
    assert _arrow_uri("gs://b/t/x y.parquet") == "gs://b/t/x%20y.parquet"
    assert _arrow_uri("abfss://c@acct.dfs.core.windows.net/t/p.parquet") == "abfss://c@acct.dfs.core.windows.net/t/p.parquet"


def test_one_large_row_group_among_many_is_cut_too(tmp_path):
    # 40 row groups of 10 rows and one of 2,000: enough units to deal, so nothing was cut, and the
    # rank dealt the big one read 5x the other's rows
    path = str(tmp_path / "one_big")
    write_deltalake(path, _rows(0, 2000), writer_properties=WriterProperties(max_row_group_size=2000))
    for i in range(4):
        write_deltalake(path, _rows(2000 + 100 * i, 100), mode="append",
                        writer_properties=WriterProperties(max_row_group_size=10))
    per_rank = []
    for rank in (0, 1):
        ds = DeltaBatchDataset(path, columns=["id"], batch_size=32, shuffle_buffer=64, rank=rank, world_size=2)
        assert len(ds._units) > 41 and max(u.num_rows for u in ds._units) <= 2400 / 16 + 1
        per_rank.append(_ids(list(make_loader(ds, num_workers=0))))
    assert sorted(per_rank[0] + per_rank[1]) == list(range(2400))
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 2 * 150, [len(r) for r in per_rank]


def test_units_keep_the_files_order_and_a_file_without_a_column_is_named(tmp_path):
    # the footers are read by threads: the units must still follow the snapshot's file order (the
    # deal to ranks depends on it), and one bad file's error must still reach the caller
    from ml.errors import InvalidInput

    path = str(tmp_path / "t")
    for i in range(6):
        write_deltalake(path, pa.table({"id": pa.array(range(i * 10, i * 10 + 10), pa.int64())}), mode="append")
    ds = DeltaBatchDataset(path, columns=["id"], batch_size=8, rank=0, world_size=1)
    _, files = snapshot_files(path)
    assert len(files) == 6 and [u.file for u in ds._units] == files
    write_deltalake(path, pa.table({"id": pa.array([99], pa.int64()), "x": pa.array([1.0])}), mode="append",
                    schema_mode="merge")
    with pytest.raises(InvalidInput, match=r"lacks columns \['x'\]"):
        DeltaBatchDataset(path, columns=["id", "x"], batch_size=8, rank=0, world_size=1)
