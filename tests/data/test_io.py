"""Delta tables written here are real Delta tables: delta-rs reads them and we read delta-rs's."""
import datetime as dt
import json
import os
import time

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

from ml.data import io
from ml.errors import InvalidInput

ROWS = [(1, "natm", 0.5), (2, "natm", 1.5), (3, "dat", None)]
SCHEMA = "id bigint, model string, score double"


def _sorted(tbl: pa.Table, key="id"):
    return tbl.sort_by(key).to_pylist()


def test_written_table_reads_back_through_delta_rs(spark, warehouse):
    path = f"{warehouse}/t"
    v = io.write_table(spark, spark.createDataFrame(ROWS, SCHEMA), path, mode="overwrite", delta_mode="delta-rs")
    assert v == 0
    got = _sorted(pa.table(DeltaTable(path).to_pyarrow_table()))
    assert got == [{"id": 1, "model": "natm", "score": 0.5}, {"id": 2, "model": "natm", "score": 1.5},
                   {"id": 3, "model": "dat", "score": None}]
    # the log carries per-file row counts and numeric min/max (data skipping for readers)
    adds = pa.table(DeltaTable(path).get_add_actions(flatten=True)).to_pydict()
    assert sum(adds["num_records"]) == 3
    assert min(v for v in adds["min.id"] if v is not None) == 1


def test_partitioned_table_round_trip_both_ways(spark, warehouse):
    path = f"{warehouse}/p"
    io.write_table(spark, spark.createDataFrame(ROWS, SCHEMA), path, partition_by=["model"], delta_mode="delta-rs")
    dt = DeltaTable(path)
    assert list(dt.metadata().partition_columns) == ["model"]
    assert _sorted(pa.table(dt.to_pyarrow_table())) == [
        {"id": 1, "model": "natm", "score": 0.5}, {"id": 2, "model": "natm", "score": 1.5},
        {"id": 3, "model": "dat", "score": None}]
    assertDataFrameEqual(io.read_table(spark, path, delta_mode="delta-rs"), spark.createDataFrame(ROWS, SCHEMA))


def test_reading_some_partitions_reads_only_their_files(spark, warehouse):
    # a downstream job reading one model of i2i_topk: without the jars a where() on the partition column
    # came after the read (the values are joined on by file), so every model's files were scanned
    path = f"{warehouse}/parts"
    io.write_table(spark, spark.createDataFrame(ROWS + [(4, "pop", 1.0)], SCHEMA), path, partition_by=["model"],
                   delta_mode="delta-rs")
    natm = io.read_table(spark, path, delta_mode="delta-rs", partitions={"model": ["natm"]})
    assertDataFrameEqual(natm, spark.createDataFrame(ROWS[:2], SCHEMA))
    assert natm.inputFiles() and all("model=natm" in f for f in natm.inputFiles())
    two = io.read_table(spark, path, delta_mode="delta-rs", partitions={"model": ["dat", "pop"]})
    assert sorted(r.id for r in two.collect()) == [3, 4]
    none = io.read_table(spark, path, delta_mode="delta-rs", partitions={"model": ["nope"]})
    assert none.count() == 0 and none.columns == ["id", "model", "score"]
    with pytest.raises(InvalidInput, match=r"\['score'\] are not partition columns"):
        io.read_table(spark, path, delta_mode="delta-rs", partitions={"score": ["0.5"]})
    # a partition column of another type: the log's values are typed (1, not "1"); refused, not 0 rows
    by_id = f"{warehouse}/by_id"
    io.write_table(spark, spark.createDataFrame(ROWS, SCHEMA), by_id, partition_by=["id"], delta_mode="delta-rs")
    with pytest.raises(ValueError, match=r"takes string partition columns; \['id'\] are not"):
        io.read_table(spark, by_id, delta_mode="delta-rs", partitions={"id": [1]})


def test_the_partitions_with_rows_come_from_the_log_at_any_version(spark, warehouse, monkeypatch):
    # the evaluation job asks which models have lists before it reads any: from the add actions' row
    # counts, without a Spark job
    path = f"{warehouse}/parts"
    io.write_table(spark, spark.createDataFrame(ROWS + [(4, "pop", 1.0)], SCHEMA), path, partition_by=["model"])
    io.write_table(spark, spark.createDataFrame([], SCHEMA), path, partition_by=["model"],
                   replace_where={"model": "pop"})  # pop emptied in version 1
    real_read, reads = io.read_table, []

    def read(spark, path, *args, **kwargs):
        reads.append(kwargs.get("partitions"))
        return real_read(spark, path, *args, **kwargs)

    monkeypatch.setattr(io, "read_table", read)
    assert io.partitions_with_rows(spark, path, "model", ["natm", "pop", "nope"]) == {"natm"}
    assert io.partitions_with_rows(spark, path, "model", ["natm", "pop", "nope"], version=0) == {"natm", "pop"}
    assert reads == []  # the log's row counts, no read
    with pytest.raises(ValueError, match=r"\['score'\] are not partition columns"):
        io.partitions_with_rows(spark, path, "score", ["0.5"])
    # files written without statistics (another writer's): those partitions are read, one row each
    monkeypatch.setattr(io, "_file_stats", lambda fs, p: None)
    plain = f"{warehouse}/plain"
    io.write_table(spark, spark.createDataFrame(ROWS, SCHEMA), plain, partition_by=["model"])
    counts = pa.table(DeltaTable(plain).get_add_actions(flatten=True))["num_records"]
    assert counts.null_count == len(counts) > 0
    assert io.partitions_with_rows(spark, plain, "model", ["dat", "pop"]) == {"dat"}
    assert reads == [{"model": ["dat"]}]  # pop has no file: nothing to read


def test_table_written_by_delta_rs_reads_here(spark, warehouse):
    path = f"{warehouse}/rs"
    data = pa.table({"id": pa.array([5, 6, 7], pa.int64()), "model": ["a", "b", "a"],
                     "score": pa.array([0.1, None, 0.3])})
    write_deltalake(path, data, partition_by=["model"])
    write_deltalake(path, data.slice(0, 1), mode="append", partition_by=["model"])
    df = io.read_table(spark, path, delta_mode="delta-rs")
    expected = spark.createDataFrame([(5, "a", 0.1), (6, "b", None), (7, "a", 0.3), (5, "a", 0.1)], SCHEMA)
    assertDataFrameEqual(df, expected)
    assertDataFrameEqual(io.read_table(spark, path, version=0, delta_mode="delta-rs"),
                         spark.createDataFrame([(5, "a", 0.1), (6, "b", None), (7, "a", 0.3)], SCHEMA))


def test_versions_stay_readable_after_overwrite_and_append(spark, warehouse):
    path = f"{warehouse}/v"
    io.write_table(spark, spark.createDataFrame(ROWS, SCHEMA), path, delta_mode="delta-rs")
    io.write_table(spark, spark.createDataFrame([(9, "x", 9.0)], SCHEMA), path, mode="overwrite", delta_mode="delta-rs")
    v2 = io.write_table(spark, spark.createDataFrame([(10, "x", 1.0)], SCHEMA), path, mode="append", delta_mode="delta-rs")
    assert v2 == 2 and io.table_version(path) == 2
    assert sorted(r.id for r in io.read_table(spark, path, delta_mode="delta-rs").collect()) == [9, 10]
    assert sorted(r.id for r in io.read_table(spark, path, version=1, delta_mode="delta-rs").collect()) == [9]
    assert sorted(r.id for r in io.read_table(spark, path, version=0, delta_mode="delta-rs").collect()) == [1, 2, 3]
    with pytest.raises(io.TableNotFoundError, match="version 7"):
        io.read_table(spark, path, version=7, delta_mode="delta-rs")


def test_replace_where_rewrites_one_partition_only(spark, warehouse):
    path = f"{warehouse}/rw"
    io.write_table(spark, spark.createDataFrame(ROWS, SCHEMA), path, partition_by=["model"], delta_mode="delta-rs")
    new = spark.createDataFrame([(20, "natm", 2.0)], SCHEMA)
    io.write_table(spark, new, path, mode="overwrite", partition_by=["model"], replace_where={"model": "natm"},
                   delta_mode="delta-rs")
    got = {(r.id, r.model) for r in io.read_table(spark, path, delta_mode="delta-rs").collect()}
    assert got == {(20, "natm"), (3, "dat")}
    # delta-rs agrees
    assert sorted(pa.table(DeltaTable(path).to_pyarrow_table()).column("id").to_pylist()) == [3, 20]


def test_a_commit_that_meets_a_concurrent_one_is_retried_on_the_new_version(spark, warehouse, monkeypatch):
    # two models replacing their own partitions at the same moment: delta-rs fails the later commit
    # ("a concurrent transaction deleted data this operation read"), and all its Spark work was lost
    path = f"{warehouse}/cc"
    io.write_table(spark, spark.createDataFrame(ROWS, SCHEMA), path, partition_by=["model"], delta_mode="delta-rs")
    original, calls = DeltaTable.create_write_transaction, []

    def racing(self, *args, **kwargs):
        calls.append(self.version())
        if len(calls) == 1:  # another job commits its partition after this snapshot was taken
            write_deltalake(path, pa.table({"id": [30], "model": ["dat"], "score": [3.0]}), mode="overwrite",
                            predicate="model = 'dat'")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DeltaTable, "create_write_transaction", racing)
    version, n = io.replace_model_partition(spark, spark.createDataFrame([(20, "natm", 2.0)], SCHEMA), path, "natm",
                                            "delta-rs")
    assert calls == [0, 1] and (version, n) == (2, 1)  # failed on version 0's snapshot, committed on 1's
    # the version returned is the write's own, not a later job's
    write_deltalake(path, pa.table({"id": [31], "model": ["dat"], "score": [3.0]}), mode="overwrite",
                    predicate="model = 'dat'")  # version 3
    racing_after = []

    def after(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if not racing_after:
            racing_after.append(1)
            write_deltalake(path, pa.table({"id": [32], "model": ["dat"], "score": [3.0]}), mode="overwrite",
                            predicate="model = 'dat'")
        return out

    monkeypatch.setattr(DeltaTable, "create_write_transaction", after)
    version, n = io.replace_model_partition(spark, spark.createDataFrame([(21, "natm", 2.0)], SCHEMA), path, "natm",
                                            "delta-rs")
    assert (version, n, DeltaTable(path).version()) == (4, 1, 5)
    got = sorted((r.id, r.model) for r in io.read_table(spark, path, delta_mode="delta-rs").collect())
    assert got == [(21, "natm"), (32, "dat")]


def test_two_first_writes_of_one_partition_or_table_at_once_leave_one_writers_rows(spark, warehouse, monkeypatch):
    # delta-rs retried a commit that lost the race onto the newer version without looking at it: the
    # first writes of one new partition (two pipelines' cooc lists), or of one new table (two
    # pipelines' first ingest), each kept both writers' rows
    path = f"{warehouse}/first"
    io.write_table(spark, spark.createDataFrame(ROWS, SCHEMA), path, partition_by=["model"], delta_mode="delta-rs")
    original = DeltaTable.create_write_transaction
    raced = []

    def racing(self, *args, **kwargs):
        if not raced:  # another job fills the same new partition after this snapshot was taken
            raced.append(self.version())
            write_deltalake(path, pa.table({"id": [40, 41], "model": ["cooc", "cooc"], "score": [1.0, 1.0]}),
                            mode="overwrite", predicate="model = 'cooc'")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DeltaTable, "create_write_transaction", racing)
    version, n = io.replace_model_partition(spark, spark.createDataFrame([(50, "cooc", 2.0)], SCHEMA), path, "cooc",
                                            "delta-rs")
    assert raced == [0] and (version, n) == (2, 1)  # written again on version 1, replacing the other job's rows
    assert sorted(DeltaTable(path).to_pyarrow_table().column("id").to_pylist()) == [1, 2, 3, 50]
    monkeypatch.setattr(DeltaTable, "create_write_transaction", original)

    # another job creates the table after this one saw none: delta-rs says so ("already exists"), or,
    # when both commit version 0 at once, fails the loser's commit
    original_create = io.create_table_with_add_actions
    for how in ("already exists", "commit failed"):
        fresh = f"{warehouse}/fresh-{how.replace(' ', '-')}"

        def creating(uri, *args, **kwargs):
            write_deltalake(uri, pa.table({"id": pa.array([7, 8], pa.int64()), "model": ["x", "x"],
                                           "score": [0.0, 0.0]}))
            if how == "commit failed":
                raise CommitFailedError("Failed to commit transaction: 0")
            return original_create(uri, *args, **kwargs)

        monkeypatch.setattr(io, "create_table_with_add_actions", creating)
        assert io.write_table(spark, spark.createDataFrame(ROWS, SCHEMA), fresh, delta_mode="delta-rs") == 1
        assert sorted(r.id for r in io.read_table(spark, fresh, delta_mode="delta-rs").collect()) == [1, 2, 3]

    # a table the other job created with other columns is refused, as when it was there before
    def creating_other(uri, *args, **kwargs):
        write_deltalake(uri, pa.table({"id": pa.array([7], pa.int64()), "name": ["x"]}))
        return original_create(uri, *args, **kwargs)

    monkeypatch.setattr(io, "create_table_with_add_actions", creating_other)
    with pytest.raises(io.SchemaMismatchError, match=r"missing columns \['name'\]"):
        io.write_table(spark, spark.createDataFrame(ROWS, SCHEMA), f"{warehouse}/other", mode="append",
                       delta_mode="delta-rs")
    assert DeltaTable(f"{warehouse}/other").version() == 0  # nothing committed into it


def test_only_a_commit_that_lost_its_version_counts_as_a_lost_race():
    assert io._lost_race(CommitFailedError("Failed to commit transaction: 3"))
    assert not io._lost_race(CommitFailedError("Metadata changed since last commit."))
    assert not io._lost_race(ValueError("Failed to commit transaction: 0"))  # not delta-rs's commit error


def test_a_write_from_a_read_version_fails_when_another_job_committed_since(spark, warehouse, monkeypatch):
    # rewriting a whole table from a copy of it (evaluate adding the metrics' targets column) must not
    # replace another job's newer rows with that copy
    path = f"{warehouse}/based"
    io.write_table(spark, spark.createDataFrame(ROWS, SCHEMA), path, partition_by=["model"], delta_mode="delta-rs")
    copy = io.read_table(spark, path, version=0, delta_mode="delta-rs").localCheckpoint()
    io.write_table(spark, spark.createDataFrame([(9, "natm", 9.0)], SCHEMA), path, mode="overwrite",
                   partition_by=["model"], replace_where={"model": "natm"}, delta_mode="delta-rs")
    with pytest.raises(io.ConcurrentWriteError, match=r"at version 1, this write read version 0; not written"):
        io.write_table(spark, copy, path, partition_by=["model"], delta_mode="delta-rs", base_version=0)
    assert io.table_version(path) == 1
    # the other job commits while this write's files are being committed: the commit fails too
    original = DeltaTable.create_write_transaction

    def racing(self, *args, **kwargs):
        write_deltalake(path, pa.table({"id": [40], "model": ["dat"], "score": [4.0]}), mode="overwrite",
                        predicate="model = 'dat'")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DeltaTable, "create_write_transaction", racing)
    with pytest.raises(io.ConcurrentWriteError, match=r"another job committed version 2 after this write read version 1"):
        io.write_table(spark, copy, path, partition_by=["model"], delta_mode="delta-rs", base_version=1)
    monkeypatch.setattr(DeltaTable, "create_write_transaction", original)
    assert sorted(r.id for r in io.read_table(spark, path, delta_mode="delta-rs").collect()) == [9, 40]
    assert io.write_table(spark, copy, path, partition_by=["model"], delta_mode="delta-rs", base_version=2) == 3


def test_replace_where_with_a_list_replaces_those_partitions_in_one_commit(spark, warehouse):
    path = f"{warehouse}/rwl"
    rows = ROWS + [(4, "pop", 0.0)]
    io.write_table(spark, spark.createDataFrame(rows, SCHEMA), path, partition_by=["model"], delta_mode="delta-rs")
    new = spark.createDataFrame([(20, "natm", 2.0), (30, "dat", 3.0), (40, "other", 1.0)], SCHEMA)
    v = io.write_table(spark, new, path, mode="overwrite", partition_by=["model"],
                       replace_where={"model": ["natm", "dat"]}, delta_mode="delta-rs")
    assert v == 1  # one commit
    got = {(r.id, r.model) for r in io.read_table(spark, path, delta_mode="delta-rs").collect()}
    assert got == {(20, "natm"), (30, "dat"), (4, "pop")}  # "other" is outside the predicate: not written
    assert sorted(pa.table(DeltaTable(path).to_pyarrow_table()).column("id").to_pylist()) == [4, 20, 30]


def test_replace_where_drops_rows_outside_the_predicate(spark, warehouse):
    path = f"{warehouse}/rw2"
    io.write_table(spark, spark.createDataFrame(ROWS, SCHEMA), path, partition_by=["model"], delta_mode="delta-rs")
    io.write_table(spark, spark.createDataFrame([(30, "natm", 1.0), (31, "dat", 1.0)], SCHEMA), path,
                   mode="overwrite", partition_by=["model"], replace_where={"model": "natm"}, delta_mode="delta-rs")
    assert {r.id for r in io.read_table(spark, path, delta_mode="delta-rs").collect()} == {30, 3}


def test_schema_mismatch_names_the_columns(spark, warehouse):
    path = f"{warehouse}/s"
    io.write_table(spark, spark.createDataFrame(ROWS, SCHEMA), path, delta_mode="delta-rs")
    bad = spark.createDataFrame([(1, "natm", "high")], "id bigint, model string, grade string")
    with pytest.raises(io.SchemaMismatchError, match=r"missing columns \['score'\].*extra columns \['grade'\]"):
        io.write_table(spark, bad, path, mode="append", delta_mode="delta-rs")
    wrong_type = spark.createDataFrame([(1, "natm", 1)], "id bigint, model string, score int")
    with pytest.raises(io.SchemaMismatchError, match=r"score: table has double, data has int"):
        io.write_table(spark, wrong_type, path, mode="append", delta_mode="delta-rs")


def test_missing_table_is_a_clear_error(spark, warehouse):
    with pytest.raises(io.TableNotFoundError, match="no Delta table at"):
        io.read_table(spark, f"{warehouse}/nope", delta_mode="delta-rs")


def test_failed_write_leaves_previous_version_current(spark, warehouse):
    path = f"{warehouse}/f"
    io.write_table(spark, spark.createDataFrame(ROWS, SCHEMA), path, delta_mode="delta-rs")

    @F.udf("double")
    def explode_on_two(i):
        if i == 2:
            raise RuntimeError("task failure in the middle of the write")
        return float(i)

    bad = spark.createDataFrame(ROWS, SCHEMA).withColumn("score", explode_on_two("id"))
    with pytest.raises(Exception, match="task failure"):
        io.write_table(spark, bad, path, mode="overwrite", delta_mode="delta-rs")
    assert io.table_version(path) == 0
    assert sorted(r.id for r in io.read_table(spark, path, delta_mode="delta-rs").collect()) == [1, 2, 3]
    assert _sorted(pa.table(DeltaTable(path).to_pyarrow_table()))[0]["score"] == 0.5


def test_uncommitted_files_are_invisible(spark, warehouse):
    """A job killed after Spark wrote its files but before the commit: readers see the old version."""
    path = f"{warehouse}/k"
    io.write_table(spark, spark.createDataFrame(ROWS, SCHEMA), path, delta_mode="delta-rs")
    spark.createDataFrame([(99, "x", 9.9)], SCHEMA).write.parquet(os.path.join(path, "data-killed-job"))
    assert sorted(r.id for r in io.read_table(spark, path, delta_mode="delta-rs").collect()) == [1, 2, 3]
    assert sorted(pa.table(DeltaTable(path).to_pyarrow_table()).column("id").to_pylist()) == [1, 2, 3]


def test_empty_write_and_read(spark, warehouse):
    path = f"{warehouse}/e"
    io.write_table(spark, spark.createDataFrame([], SCHEMA), path, delta_mode="delta-rs")
    df = io.read_table(spark, path, delta_mode="delta-rs")
    assert df.count() == 0 and df.columns == ["id", "model", "score"]


def test_auto_mode_without_jars_uses_delta_rs(spark):
    assert io.has_delta_jars(spark) is False
    assert io.use_native(spark, "auto") is False
    # native asked for and no jars: a config error that says what to add, not a Py4J stack trace
    from ml.config import ConfigError

    with pytest.raises(ConfigError, match=r"io.delta_mode=native but this Spark session has no Delta classes"):
        io.use_native(spark, "native")


def test_the_delta_classes_are_looked_up_once_per_spark_context(spark, monkeypatch):
    # every read and write asks; each miss was a ClassNotFoundException across Py4J (~35 ms)
    import weakref

    calls = []
    monkeypatch.setattr(io, "_DELTA_JARS", weakref.WeakKeyDictionary())
    monkeypatch.setattr(io, "_delta_classes_found", lambda jvm: calls.append(jvm) or False)
    assert [io.use_native(spark, "auto") for _ in range(3)] == [False] * 3 and len(calls) == 1

    class Context:  # another SparkContext (a session stopped and started again): looked up again
        pass

    class Session:
        _jvm, sparkContext = spark._jvm, Context()

    other = Session()
    assert [io.has_delta_jars(other) for _ in range(2)] == [False] * 2 and len(calls) == 2


def test_bad_arguments(spark, warehouse):
    df = spark.createDataFrame(ROWS, SCHEMA)
    with pytest.raises(ValueError, match="mode='upsert'"):
        io.write_table(spark, df, f"{warehouse}/b", mode="upsert")
    with pytest.raises(ValueError, match="not partition columns"):
        io.write_table(spark, df, f"{warehouse}/b", replace_where={"model": "a"})


@pytest.mark.parametrize("folder", ["my tables", "a+b", "é"])
def test_awkward_paths_and_partition_values_read_back_everywhere(spark, warehouse, folder):
    # A warehouse under a folder with a space, '+' or non-ASCII name, and partition values Spark
    # escapes into directory names: every reader gets every row, none silently dropped.
    from ml.train.reader import DeltaBatchDataset

    path = f"{warehouse}/{folder}/p"
    rows = [(1, "m y", 0.5), (2, "n:x", 1.5), (3, "a+b", 2.5), (4, "p%41", 3.5)]
    io.write_table(spark, spark.createDataFrame(rows, SCHEMA), path, partition_by=["model"], delta_mode="delta-rs")
    expected = [{"id": i, "model": m, "score": s} for i, m, s in rows]
    assert _sorted(pa.table(DeltaTable(path).to_pyarrow_table())) == expected
    assertDataFrameEqual(io.read_table(spark, path, delta_mode="delta-rs"), spark.createDataFrame(rows, SCHEMA))
    # a replace of one partition reads back its rows (the pipeline's count of a model's new rows)
    _, n = io.replace_model_partition(spark, spark.createDataFrame([(5, "a+b", 0.0), (6, "a+b", 1.0)], SCHEMA),
                                      path, "a+b", delta_mode="delta-rs")
    assert n == 2
    ds = DeltaBatchDataset(path, columns=["id", "score"], batch_size=8, seed=0, rank=0, world_size=1)
    got = sorted(int(i) for b in ds for i in b["id"])
    assert got == [1, 2, 4, 5, 6]


def test_file_outside_the_log_is_an_error_not_an_empty_join(spark, warehouse, monkeypatch):
    # If a file Spark reads could not be matched to its add action, the partition join would drop
    # all its rows without a word: the read refuses instead.
    path = f"{warehouse}/no match/p"
    io.write_table(spark, spark.createDataFrame(ROWS, SCHEMA), path, partition_by=["model"], delta_mode="delta-rs")
    monkeypatch.setattr(io, "unquote", lambda s: s)  # as if Spark's "%20" were not decoded
    with pytest.raises(RuntimeError, match="match no add action"):
        io.read_table(spark, path, delta_mode="delta-rs")


def test_column_mapped_table_is_refused_without_the_jars(spark, warehouse):
    # Its Parquet columns are physical names, not the table's: read as plain Parquet every column
    # would be null, so the delta-rs path refuses and says what to do.
    path = f"{warehouse}/cm"
    write_deltalake(path, pa.table({"id": [1, 2]}), configuration={"delta.columnMapping.mode": "name"})
    with pytest.raises(NotImplementedError, match="column mapping.*delta_mode=native") as e:
        io.read_table(spark, path, delta_mode="delta-rs")
    from ml.errors import InputError

    assert isinstance(e.value, InputError)  # the jobs print it as one line, not a bug's traceback


def test_partition_join_falls_back_to_decoded_paths_if_spark_spells_files_otherwise(spark, warehouse,
                                                                                      monkeypatch):
    # rows are joined on Spark's own name of their file; were a file system to spell it otherwise
    # than inputFiles() does, the join would drop every row: one row's name is checked, and on a
    # mismatch each row's path is decoded instead
    path = f"{warehouse}/a+b c/p"
    io.write_table(spark, spark.createDataFrame(ROWS, SCHEMA), path, partition_by=["model"], delta_mode="delta-rs")
    monkeypatch.setattr(io, "_spark_names", lambda f: [f.upper()])
    assertDataFrameEqual(io.read_table(spark, path, delta_mode="delta-rs"), spark.createDataFrame(ROWS, SCHEMA))


def test_delta_classes_added_with_spark_jars_are_found(tmp_path):
    # --packages / --jars / spark.jars load into Spark's context class loader; a plain
    # Class.forName from Py4J missed them, so auto mode fell back to delta-rs and native refused
    import shutil
    import subprocess
    import sys

    if not (shutil.which("javac") and shutil.which("jar")):
        pytest.skip("javac and jar are needed to build a stand-in Delta class")
    src = tmp_path / "io" / "delta" / "tables"
    src.mkdir(parents=True)
    (src / "DeltaTable.java").write_text("package io.delta.tables; public class DeltaTable {}")
    subprocess.run(["javac", "--release", "17", str(src / "DeltaTable.java")], check=True)
    subprocess.run(["jar", "cf", str(tmp_path / "stub.jar"), "-C", str(tmp_path), "io/delta/tables/DeltaTable.class"],
                   check=True)
    code = ("from pyspark.sql import SparkSession; from ml.data import io; "
            f"s = SparkSession.builder.master('local[1]').config('spark.jars', {str(tmp_path / 'stub.jar')!r})"
            ".config('spark.ui.enabled', 'false').getOrCreate(); "
            "print('jars', io.has_delta_jars(s), io.use_native(s, 'native')); s.stop()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert "jars True True" in r.stdout, r.stderr[-2000:]


def _stats(path):
    """The stats JSON of the add actions of the table's first commit, as written in the log."""
    with open(os.path.join(path, "_delta_log", "00000000000000000000.json")) as f:
        return [json.loads(json.loads(line)["add"]["stats"]) for line in f if '"add"' in line]


def test_delta_rs_filters_on_any_column_find_the_rows_of_tables_written_here(spark, warehouse):
    # min/max were written for numbers only, with a null count for every column: delta-rs prunes a
    # file whose stats have bounds but not for the filtered column, so a filter on a string or a
    # date column returned no rows
    import datetime

    df = spark.createDataFrame([(1, "zeta", datetime.date(2020, 1, 1)), (2, "alpha", datetime.date(2021, 1, 1))],
                               "id bigint, s string, d date")
    path = f"{warehouse}/stats"
    io.write_table(spark, df, path, delta_mode="delta-rs")
    dt = DeltaTable(path)
    ids = lambda f: sorted(pa.table(dt.to_pyarrow_table(filters=[f])).column("id").to_pylist())  # noqa: E731
    assert ids(("s", "=", "zeta")) == [1] and ids(("d", ">=", datetime.date(2020, 6, 1))) == [2]
    assert ids(("id", "=", 2)) == [2] and ids(("s", "=", "none")) == []  # bounds still skip files
    stats = [st for st in _stats(path) if st["numRecords"]]
    assert sorted(st["minValues"]["s"] for st in stats) == ["alpha", "zeta"]
    assert all(set(st["minValues"]) == set(st["maxValues"]) == {"id", "s", "d"} for st in stats)
    assert {st["minValues"]["id"]: st["maxValues"]["d"] for st in stats} == {1: "2020-01-01", 2: "2021-01-01"}
    # a timestamp column (its bounds are not written: Delta's are milliseconds, and a max rounded down would
    # prune the file) leaves the file without bounds, not pruned
    ts = df.withColumn("t", F.to_timestamp(F.lit("2022-01-01 00:00:00")))
    io.write_table(spark, ts, f"{warehouse}/stats_ts", delta_mode="delta-rs")
    dt = DeltaTable(f"{warehouse}/stats_ts")
    assert sorted(pa.table(dt.to_pyarrow_table(filters=[("s", "=", "zeta")])).column("id").to_pylist()) == [1]
    stats = [st for st in _stats(f"{warehouse}/stats_ts") if st["numRecords"]]
    assert all("minValues" not in st and st["nullCount"]["s"] == 0 for st in stats)
    assert sum(st["numRecords"] for st in stats) == 2


def test_tables_whose_rules_a_write_here_would_bypass_are_refused(spark, warehouse):
    from ml.errors import InvalidInput
    from ml.train.tables import read_columns

    # column mapping on the older protocol: delta-rs read every value as null here
    mapped = f"{warehouse}/mapped"
    write_deltalake(mapped, pa.table({"item_id": pa.array([10, 20], pa.int64())}),
                    configuration={"delta.columnMapping.mode": "name"})
    with pytest.raises(NotImplementedError, match="column mapping"):
        read_columns(mapped, ["item_id"])
    # a CHECK constraint would not be enforced by Spark's plain Parquet files
    checked = f"{warehouse}/checked"
    write_deltalake(checked, pa.table({"id": pa.array([1], pa.int64())}))
    DeltaTable(checked).alter.add_constraint({"id_positive": "id > 0"})
    with pytest.raises(InvalidInput, match=r"CHECK constraints \['delta.constraints.id_positive'\]"):
        io.write_table(spark, spark.createDataFrame([(-7,)], "id bigint"), checked, mode="append", delta_mode="delta-rs")
    assert DeltaTable(checked).version() == 1  # nothing committed
    # a change of partitioning, even with overwrite_schema: delta-rs kept the old one and lost the values
    path = f"{warehouse}/parts"
    io.write_table(spark, spark.createDataFrame(ROWS, SCHEMA), path, delta_mode="delta-rs")
    with pytest.raises(io.SchemaMismatchError, match=r"partitioned by \[\], the write asks for \['model'\]"):
        io.write_table(spark, spark.createDataFrame(ROWS, SCHEMA), path, partition_by=["model"], overwrite_schema=True,
                       delta_mode="delta-rs")
    with pytest.raises(ValueError, match="null partition value needs the Delta jars"):
        io.write_table(spark, spark.createDataFrame(ROWS, SCHEMA), f"{warehouse}/rw_null", partition_by=["model"],
                       replace_where={"model": None}, delta_mode="delta-rs")


def test_a_partition_column_null_in_every_file_reads_back(spark, warehouse):
    path = f"{warehouse}/nullpart"
    io.write_table(spark, spark.createDataFrame([(1, None, 0.5), (2, None, 1.5)], SCHEMA), path, partition_by=["model"],
                   delta_mode="delta-rs")
    got = sorted((r.id, r.model) for r in io.read_table(spark, path, delta_mode="delta-rs").collect())
    assert got == [(1, None), (2, None)]


@pytest.fixture
def session_zone(spark):
    """Set spark.sql.session.timeZone for one test, then back to the suite's."""
    before = spark.conf.get("spark.sql.session.timeZone")
    yield lambda zone: spark.conf.set("spark.sql.session.timeZone", zone)
    spark.conf.set("spark.sql.session.timeZone", before)


def test_timestamp_partition_values_are_instants_whatever_the_session_zone(spark, warehouse, session_zone):
    # Spark names a TIMESTAMP partition's directory by the wall-clock time of the session's zone; the
    # log must hold the instant (delta-rs reads a zone-less value as UTC: these were 5 hours off)
    path = f"{warehouse}/ts_part"
    instants = [dt.datetime(2020, 1, 1, 12, 0, tzinfo=dt.timezone.utc),
                dt.datetime(2020, 7, 1, 3, 4, 5, 123456, tzinfo=dt.timezone.utc)]
    session_zone("America/New_York")
    io.write_table(spark, spark.createDataFrame(list(enumerate(instants)), "id long, ts timestamp"), path,
                   partition_by=["ts"], delta_mode="delta-rs")
    got = sorted(pa.table(DeltaTable(path).to_pyarrow_table()).to_pylist(), key=lambda r: r["id"])
    assert [r["ts"].timestamp() for r in got] == [t.timestamp() for t in instants]
    # a short id Spark knows and Python does not (Java's SHORT_IDS: PST is America/Los_Angeles)
    session_zone("PST")
    io.write_table(spark, spark.createDataFrame(list(enumerate(instants)), "id long, ts timestamp"), f"{path}_pst",
                   partition_by=["ts"], delta_mode="delta-rs")
    got = sorted(pa.table(DeltaTable(f"{path}_pst").to_pyarrow_table()).to_pylist(), key=lambda r: r["id"])
    assert [r["ts"].timestamp() for r in got] == [t.timestamp() for t in instants]
    for zone in ("Asia/Kolkata", "UTC", "+05:30"):  # read back in other zones: the same instants
        session_zone(zone)
        back = io.read_table(spark, path, delta_mode="delta-rs").orderBy("id").select(F.col("ts").cast("double"))
        assert [r[0] for r in back.collect()] == pytest.approx([t.timestamp() for t in instants], abs=1e-6)


def test_a_timestamp_partition_value_the_zone_shows_twice_is_refused(spark, warehouse, session_zone):
    # 01:30 on 2020-11-01 happened twice in New York: its directory names no single instant
    session_zone("America/New_York")
    df = spark.createDataFrame([(1, dt.datetime(2020, 11, 1, 5, 30, tzinfo=dt.timezone.utc))], "id long, ts timestamp")
    with pytest.raises(io.InvalidInput, match="'ts'.*shows twice"):
        io.write_table(spark, df, f"{warehouse}/ts_fold", partition_by=["ts"], delta_mode="delta-rs")
    assert not io.table_exists(f"{warehouse}/ts_fold")
    assert not os.path.exists(f"{warehouse}/ts_fold") or not any(  # and no uncommitted files left behind
        f.endswith(".parquet") for _, _, fs in os.walk(f"{warehouse}/ts_fold") for f in fs)


def test_session_zone_names_and_offsets():
    assert io.session_zone("UTC") is dt.timezone.utc
    assert io.session_zone("+05:30").utcoffset(None) == dt.timedelta(hours=5, minutes=30)
    assert io.session_zone("GMT-8").utcoffset(None) == dt.timedelta(hours=-8)
    assert str(io.session_zone("Europe/Berlin")) == "Europe/Berlin"
    with pytest.raises(io.ConfigError, match="spark.sql.session.timeZone='Mars/Olympus'"):
        io.session_zone("Mars/Olympus")


def test_timestamps_far_from_today_read_back_through_delta_rs(spark, warehouse):
    # Spark's default INT96 came back through delta-rs as nanoseconds, overflowing outside 1677-2262
    assert spark.conf.get("spark.sql.parquet.outputTimestampType") == "TIMESTAMP_MICROS"
    far = [dt.datetime(1500, 3, 1, tzinfo=dt.timezone.utc), dt.datetime(2500, 3, 1, 1, 2, 3, tzinfo=dt.timezone.utc)]
    path = f"{warehouse}/far_ts"
    io.write_table(spark, spark.createDataFrame(list(enumerate(far)), "id long, ts timestamp"), path,
                   delta_mode="delta-rs")
    got = sorted(pa.table(DeltaTable(path).to_pyarrow_table()).to_pylist(), key=lambda r: r["id"])
    assert [r["ts"] for r in got] == far


def test_a_native_write_finds_its_own_commit_not_the_latest():
    # with the Delta jars, a write's version was the table's latest, another job's when two models
    # committed to a shared table one after the other; now the commit found by its userMetadata
    mine = json.dumps({io.PROCESS_KEY: "p", io.WRITE_ID_KEY: "w1"})
    other = json.dumps({io.PROCESS_KEY: "q", io.WRITE_ID_KEY: "w2"})
    assert io.own_version([(7, other), (6, mine), (5, None)], mine) == 6
    assert io.own_version([(7, other), (6, None)], mine) == 7  # not among the rows read: the latest


def _data_files_on_disk(path: str) -> set:
    return {os.path.relpath(os.path.join(d, f), path) for d, _, files in os.walk(path) if "_delta_log" not in d
            for f in files if f.endswith(".parquet")}


def test_vacuum_deletes_only_what_no_recent_version_reads_and_leaves_the_data_as_it_was(spark, warehouse):
    from jobs import pipeline

    path = f"{warehouse}/vac"
    io.write_table(spark, spark.createDataFrame(ROWS, SCHEMA), path, partition_by=["model"], delta_mode="delta-rs")
    for i in (20, 21):  # the second write's folder ends with no file a version reads
        io.write_table(spark, spark.createDataFrame([(i, "natm", 2.0)], SCHEMA), path, mode="overwrite",
                       partition_by=["model"], replace_where={"model": "natm"}, delta_mode="delta-rs")
    # a job killed after Spark wrote its files, before the commit
    spark.createDataFrame([(99, "x", 9.9)], SCHEMA).write.parquet(os.path.join(path, "data-killed-job"))
    current = {os.path.relpath(f, path) for f in DeltaTable(path).file_uris()}
    on_disk = _data_files_on_disk(path)
    stale = on_disk - current
    assert stale and current < on_disk  # version 0's natm files and the killed job's
    before = (pipeline._table_state(path), io.data_version(path), io.last_writer(path))
    version = io.table_version(path)

    # within the retention (everything here is seconds old) nothing goes
    assert io.vacuum_table(spark, path, 24, "delta-rs") == 0 and _data_files_on_disk(path) == on_disk
    n = io.vacuum_table(spark, path, 0, "delta-rs", dry_run=True)
    assert n >= len(stale)  # with Spark's _SUCCESS and .crc files beside them
    assert _data_files_on_disk(path) == on_disk  # a dry run deletes nothing
    assert io.vacuum_table(spark, path, 0, "delta-rs") == n
    assert _data_files_on_disk(path) == current
    # and the folder of a write it emptied (one per write and table would pile up night after night)
    assert {d for d in os.listdir(path) if d.startswith("data-2")} == {f.split("/")[0] for f in current}

    # the same rows through Spark and delta-rs; new versions, but the same data version, writer and
    # pipeline state: a stage whose output was vacuumed is not rerun
    assert {(r.id, r.model) for r in io.read_table(spark, path, delta_mode="delta-rs").collect()} == {(21, "natm"),
                                                                                                 (3, "dat")}
    assert sorted(DeltaTable(path).to_pyarrow_table().column("id").to_pylist()) == [3, 21]
    assert io.table_version(path) > version
    assert (pipeline._table_state(path), io.data_version(path), io.last_writer(path)) == before
    # the next write is a data version again, and a version whose files were deleted is an error
    v = io.write_table(spark, spark.createDataFrame([(5, "x", 1.0)], SCHEMA), path, mode="append",
                       partition_by=["model"], delta_mode="delta-rs")
    assert io.data_version(path) == v == io.table_version(path)
    with pytest.raises(Exception):
        io.read_table(spark, path, version=0, delta_mode="delta-rs").collect()


def test_vacuum_job_covers_every_table_under_the_warehouse_and_its_retention_is_checked(spark, tmp_path, capsys):
    from jobs import vacuum
    from ml.config import ConfigError, load_config

    wh = tmp_path / "wh"
    for name in ("a", "b"):
        for _ in range(2):
            io.write_table(spark, spark.createDataFrame(ROWS, SCHEMA), str(wh / name), delta_mode="delta-rs")
    os.makedirs(wh / "_pipeline")
    os.makedirs(wh / "models" / "natm")  # not a table
    os.makedirs(wh / "c" / "_delta_log")  # a table whose first commit never landed: not a table yet
    cfg = load_config(None, [f"warehouse={wh}", "io.delta_mode=delta-rs"])
    assert cfg.io.retention_hours == 168
    assert vacuum.warehouse_tables(cfg) == ["a", "b"]
    files = _data_files_on_disk(str(wh / "a"))
    vacuum.main([f"--set=warehouse={wh}", "--set=io.delta_mode=delta-rs", "--dry-run"])
    out = capsys.readouterr().out
    assert "0 files would be deleted from 2 tables" in out and "versions older than 168 hours" in out
    assert vacuum.run(cfg, spark) == {"a": 0, "b": 0}  # a week's retention: nothing here is that old
    assert _data_files_on_disk(str(wh / "a")) == files
    assert vacuum.run(load_config(None, [f"warehouse={tmp_path / 'none'}"]), spark) == {}
    uri = load_config(None, [f"warehouse=file://{wh}", "io.delta_mode=delta-rs"])  # listed through Arrow
    assert vacuum.warehouse_tables(uri) == ["a", "b"] and vacuum.run(uri, spark) == {"a": 0, "b": 0}
    with pytest.raises(io.InvalidInput, match="nosuch://x"):
        vacuum.warehouse_tables(load_config(None, ["warehouse=nosuch://x"]))
    for bad in ("12", "abc"):
        with pytest.raises(ConfigError, match="io.retention_hours"):
            load_config(None, [f"io.retention_hours={bad}"])


def test_the_data_version_outlives_the_log_entries_a_vacuum_expires(spark, warehouse):
    # a table whose data is older than the log's retention (30 days), vacuumed every night: the log entry of
    # its last write expires, and its vacuums' commits are all that is left; they say which data they kept
    path = f"{warehouse}/old"
    for _ in range(2):
        io.write_table(spark, spark.createDataFrame(ROWS, SCHEMA), path, delta_mode="delta-rs")
    assert io.vacuum_table(spark, path, 0, "delta-rs") > 0
    month_ago = time.time() - 31 * 86400
    log_dir = os.path.join(path, "_delta_log")
    for f in os.listdir(log_dir):
        os.utime(os.path.join(log_dir, f), (month_ago, month_ago))
    io.vacuum_table(spark, path, 24, "delta-rs")
    assert {h.get("operation") for h in DeltaTable(path).history()} <= io.MAINTENANCE_OPERATIONS  # no write left
    assert io.data_version(path) == 1 and io.last_writer(path) == io.PROCESS_ID
    assert sorted(r.id for r in io.read_table(spark, path, delta_mode="delta-rs").collect()) == [1, 2, 3]


def test_a_write_committed_during_a_vacuum_is_the_data_version_not_what_the_vacuum_read(spark, warehouse, monkeypatch):
    path = f"{warehouse}/race"
    for _ in range(2):
        io.write_table(spark, spark.createDataFrame(ROWS, SCHEMA), path, delta_mode="delta-rs")
    real = DeltaTable.vacuum

    def write_first(self, *args, **kwargs):  # another job commits after the vacuum read the data version
        io.write_table(spark, spark.createDataFrame(ROWS, SCHEMA), path, delta_mode="delta-rs")
        return real(DeltaTable(path), *args, **kwargs)

    monkeypatch.setattr(DeltaTable, "vacuum", write_first)
    assert io.vacuum_table(spark, path, 0, "delta-rs") > 0
    assert [h["operation"] for h in DeltaTable(path).history(3)] == ["VACUUM END", "VACUUM START", "WRITE"]
    assert io.data_version(path) == 2  # the vacuum's commits say 1


def test_written_by_two_runs_tells_a_jobs_killed_run_apart_also_in_one_process(spark, warehouse):
    # A job that commits two tables one after the other, killed between its commits and run again in
    # part (a notebook kernel: one process). Each job run stamps its commits; comparing processes, as
    # before, passed this in one process and refused two pipelines' interleaved commits of equal runs.
    a, b = f"{warehouse}/a", f"{warehouse}/b"
    df = spark.createDataFrame(ROWS, SCHEMA)

    @io.job_run
    def job(*paths):
        for p in paths:
            io.write_table(spark, df, p, partition_by=["model"], delta_mode="delta-rs")

    job(a, b)
    assert not io.written_by_two_runs(a, b)
    job(a)  # killed before b's commit
    assert io.written_by_two_runs(a, b) and io.written_by_two_runs(b, a)
    assert not io.written_by_two_runs(a, f"{warehouse}/absent")
    # a table written by hand (outside a job) beside a job's: not checked
    io.write_table(spark, df, b, partition_by=["model"], delta_mode="delta-rs")
    assert not io.written_by_two_runs(a, b)
    # a vacuum keeps the data commit's run
    job(a, b)
    io.vacuum_table(spark, a, 0, "delta-rs")
    assert not io.written_by_two_runs(a, b)

    # per partition (one model's lists in two tables): a replace of another model's partition is not
    # that model's latest commit, a full write is
    @io.job_run
    def model_job(model, *paths):
        for p in paths:
            io.replace_model_partition(spark, df.where(F.col("model") == model), p, model, "delta-rs")

    model_job("natm", a, b)
    model_job("dat", a)  # another model's run, into a only
    assert not io.written_by_two_runs(a, b, {"model": "natm"})
    assert io.written_by_two_runs(a, b, {"model": "dat"})
    assert io.written_by_two_runs(a, b)  # the tables' latest commits are of two runs
    replaced = json.loads(DeltaTable(a).history(1)[0][io.PARTITION_KEY])
    assert replaced == {"model": ["dat"]}
    job(a)  # a full write of a touches every model
    assert io.written_by_two_runs(a, b, {"model": "natm"})
    # a commit that does not say what it wrote (another writer's, or made before the key) ends the
    # search for the partition's latest commit: not checked, rather than refused on a guess
    model_job("natm", a, b)
    write_deltalake(a, pa.table({"id": [9], "model": ["pop"], "score": [1.0]}), mode="append")
    assert not io.written_by_two_runs(a, b, {"model": "natm"})
