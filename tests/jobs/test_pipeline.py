"""The main job end to end on tiny synthetic data: CLI, tables, rerun determinism."""
import json
import logging
import os
import subprocess
import sys
import time

import pytest

from pyspark.sql import functions as F

from jobs import pipeline
from ml import schemas as S
from ml.config import load_config
from ml.data import io
from tests.conftest import ROOT

TINY = ["generate.num_users=300", "generate.num_items=400", "generate.actions_per_user=20",
        "generate.partitions=2", "generate.bad_row_fraction=0.01", "generate.duplicate_fraction=0.01"]


def test_pipeline_tables_and_rerun_is_identical(spark, warehouse):
    cfg = load_config(ROOT / "conf" / "synthetic.yaml", [f"warehouse={warehouse}", *TINY])
    first = pipeline.run(cfg, spark)
    ing = first["ingest"]
    raw = io.read_table(spark, cfg.table_path("raw_actions")).count()
    assert ing["input_rows"] == raw  # nothing lost: every raw row is an action or a rejected row
    assert ing["rejected"]["duplicate"] > 0 and ing["rejected"]["missing_item_id"] > 0
    assert ing["rejected"]["unknown_behavior"] > 0
    seq_v0 = io.read_table(spark, cfg.table_path(S.T_SEQUENCES))
    snapshot = seq_v0.collect()
    # every table a stage writes, as this first run wrote it: a forced rerun (below) must give the same
    # rows, from the sequences through the samples, the trained model's vectors and lists to the metrics
    # (their versions: read back by time travel, the data never leaves Spark)
    produced = {t: io.table_version(cfg.table_path(t)) for t in (
        S.T_ITEM_GRAPH, S.T_ITEM_COUNTS, "noise_q", "samples_natm", "samples_dat", "item_embeddings",
        S.T_I2I_TOPK, S.T_U2I_TOPK, S.T_METRICS, S.T_METRICS_PAIRED)}

    def checksum(df):
        """(rows, sum of the rows' 64-bit hashes): equal for the same rows in any order (a multiset hash),
        without the run's time and training-run id; maps (user features) as sorted entries."""
        df = df.drop("run_ts", "run_id")
        cols = [F.array_sort(F.map_entries(f.name)) if f.dataType.typeName() == "map" else F.col(f.name)
                for f in df.schema.fields]
        return tuple(df.agg(F.count(F.lit(1)), F.sum(F.xxhash64(*cols).cast("decimal(38,0)"))).first())
    assert first["sequences"]["users"] == io.read_table(spark, cfg.table_path(S.T_EVAL_TARGETS)).count()
    item_graph = io.read_table(spark, cfg.table_path(S.T_ITEM_GRAPH))  # its counts, counted by rank 1
    assert (first["graph"]["edges"], first["graph"]["items_with_neighbours"]) == (
        item_graph.count(), item_graph.select(S.ITEM_ID).distinct().count())

    # the default (NATM) trains, and the pipeline builds the cooc lists of eval.compare_to beside it
    assert first["train"]["steps"] > 0 and set(first["baselines"]) == {"cooc.topk", "cooc.recent"}
    topk_models = io.read_table(spark, cfg.table_path(S.T_I2I_TOPK)).select(S.MODEL).distinct().collect()
    assert {r.model for r in topk_models} == {"natm", "cooc"}
    evaluated = io.read_table(spark, cfg.table_path(S.T_METRICS)).select(S.MODEL).distinct().collect()
    assert {r.model for r in evaluated} == {"natm", "natm_recent", "cooc", "cooc_recent"}
    paired = io.read_table(spark, cfg.table_path(S.T_METRICS_PAIRED))
    assert {(r.model, r.baseline) for r in paired.select(S.MODEL, S.BASELINE).distinct().collect()} == {
        ("natm", "cooc"), ("natm_recent", "cooc_recent"), ("cooc_recent", "cooc")}  # fused vs fused

    # a vacuum of every table deletes files and adds versions, but changes no data
    from jobs import vacuum

    tables = vacuum.warehouse_tables(cfg)
    assert {S.T_SEQUENCES, S.T_I2I_TOPK, S.T_METRICS, "raw_actions", "samples_natm"} <= set(tables)
    assert sum(io.vacuum_table(spark, cfg.table_path(t), 0, "delta-rs") for t in tables) > 0
    vacuumed = io.table_version(cfg.table_path(S.T_SEQUENCES))
    assert vacuumed > 0
    # unchanged config and inputs (vacuumed or not): every stage but evaluate is skipped, no table gets
    # a new version
    again_run = pipeline.run(cfg, spark)
    assert again_run["skipped"] == ["generate", "ingest", "sequences", "graph", "samples", "train", "embed", "topk",
                                    "recent", "baselines"]
    assert set(again_run) == {"evaluate", "skipped"}  # a skipped stage is not also among those run
    assert io.table_version(cfg.table_path(S.T_SEQUENCES)) == vacuumed
    # a graph setting changed: graph and what reads it (NATM's training, then its lists) rerun; the
    # stages before it, the samples and the cooc baseline (its own window) read no graph: skipped
    wider = load_config(ROOT / "conf" / "synthetic.yaml", [f"warehouse={warehouse}", *TINY, "graph.window=2"])
    assert pipeline.run(wider, spark)["skipped"] == ["generate", "ingest", "sequences", "samples", "baselines"]
    # an output rewritten behind the pipeline's back is not trusted: its stage reruns (the check the
    # run above skipped each stage by)
    assert pipeline._up_to_date(wider, "graph")
    io.write_table(spark, io.read_table(spark, cfg.table_path(S.T_ITEM_GRAPH)), cfg.table_path(S.T_ITEM_GRAPH))
    assert not pipeline._up_to_date(wider, "graph")
    # a table deleted and written again by hand starts at version 0 again: its new id tells it apart
    import shutil

    targets = io.read_table(spark, cfg.table_path(S.T_EVAL_TARGETS))
    rows, schema = targets.collect(), targets.schema
    assert pipeline._up_to_date(wider, "sequences")
    shutil.rmtree(cfg.table_path(S.T_EVAL_TARGETS))
    io.write_table(spark, spark.createDataFrame(rows[:10], schema), cfg.table_path(S.T_EVAL_TARGETS))
    assert io.table_version(cfg.table_path(S.T_EVAL_TARGETS)) == 0
    assert not pipeline._up_to_date(wider, "sequences")

    # a write by another job while this run evaluates is not recorded as what the stages read: before,
    # evaluate recorded every stage again with the tables as they were at the end, and the next run
    # skipped the graph on sequences it had never read
    def concurrent(*args, **kwargs):
        io.write_table(spark, io.read_table(spark, cfg.table_path(S.T_SEQUENCES)), cfg.table_path(S.T_SEQUENCES))
        return real_evaluate(*args, **kwargs)

    real_evaluate = pipeline.evaluate.run
    pipeline.evaluate.run = concurrent
    try:
        pipeline.run(wider, spark)
    finally:
        pipeline.evaluate.run = real_evaluate
    assert not pipeline._up_to_date(wider, "graph")

    before = io.table_version(cfg.table_path(S.T_SEQUENCES))
    pipeline.run(cfg, spark, force=True)  # a forced rerun gives the same tables
    assert io.table_version(cfg.table_path(S.T_SEQUENCES)) == before + 1
    again = io.read_table(spark, cfg.table_path(S.T_SEQUENCES))
    old = spark.createDataFrame(snapshot, again.schema)
    assert again.exceptAll(old).count() == 0 and old.exceptAll(again).count() == 0
    first_graph = io.read_table(spark, cfg.table_path(S.T_ITEM_GRAPH), version=produced[S.T_ITEM_GRAPH])
    one_more = first_graph.orderBy(S.ITEM_ID, S.RANK).limit(1)  # one row twice: a multiset the hash tells apart
    assert checksum(first_graph.unionByName(one_more)) != checksum(first_graph)
    for t, version in produced.items():
        was = checksum(io.read_table(spark, cfg.table_path(t), version=version))
        assert was[0] > 0 and checksum(io.read_table(spark, cfg.table_path(t))) == was, t
    # the earlier version is still there for readers who pinned it
    assert io.read_table(spark, cfg.table_path(S.T_SEQUENCES), version=0).count() == len(snapshot)


def test_pipeline_baselines_beat_popularity_on_planted_structure(spark, warehouse, caplog):
    cfg = load_config(ROOT / "conf" / "synthetic.yaml", [f"warehouse={warehouse}", *TINY, "model=cooc",
                                                         "eval.compare_to=[]"])
    pipeline.run(cfg, spark)  # a baseline's pipeline: no samples, training or embedding
    from jobs import baseline, evaluate

    baseline.run(cfg, spark, "pop")
    out = evaluate.run(cfg, spark, ["pop", "cooc"])
    rows = out["rows"]
    page = open(out["report"]).read()
    assert page.count("data:image/png;base64,") >= 2 and "cooc" in page and "Pre@10" in page
    import base64
    import os

    for png in ("pre_at_k.png", "per_category.png"):
        with open(os.path.join(os.path.dirname(out["report"]), png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert base64.b64decode(page.split("data:image/png;base64,")[1].split("'")[0])[:4] == b"\x89PNG"
    pre10 = {r["model"]: r["value"] for r in rows if r["metric"] == "pre" and r["k"] == 10}
    assert pre10["cooc"] > 2 * pre10["pop"], pre10
    metrics = io.read_table(spark, cfg.table_path(S.T_METRICS))
    assert {r.model for r in metrics.select("model").distinct().collect()} == {"pop", "cooc", "cooc_recent"}
    # the pipeline's recent stage: each user's list fused from the cooc lists of their last 5 items
    fused = {r["k"]: r["value"] for r in metrics.where(F.col(S.CATEGORY_ID).isNull()).collect()
             if r["model"] == "cooc_recent" and r["metric"] == "u2i_hr"}
    assert fused[10] > 2 * pre10["pop"], (fused, pre10)
    u2i = io.read_table(spark, cfg.table_path(S.T_U2I_TOPK))
    assert u2i.where("rank < 1 or rank > 100").count() == 0
    assert u2i.groupBy(S.USER_ID, S.ITEM_ID).count().where("count > 1").count() == 0
    assert metrics.where(F.col(S.CATEGORY_ID).isNotNull()).count() > 0  # per-category breakdown

    # eval.compare_to: each model against pop user by user; a baseline without lists is skipped
    nightly = load_config(ROOT / "conf" / "synthetic.yaml",
                          [f"warehouse={warehouse}", *TINY, "model=cooc", "eval.compare_to=[pop, dat]"])  # dat: no lists here
    out = evaluate.run(nightly, spark, ["cooc", "cooc_recent"])
    paired = io.read_table(spark, cfg.table_path(S.T_METRICS_PAIRED))
    assert [(f.name, f.dataType) for f in paired.schema] == [(f.name, f.dataType) for f in S.METRICS_PAIRED]
    p10 = {(r.model, r.baseline_kind): r for r in paired.where("k = 10").collect()}
    assert set(p10) == {("cooc", "i2i"), ("cooc_recent", "i2i")}
    c = p10[("cooc", "i2i")]
    assert c.diff == pytest.approx(pre10["cooc"] - pre10["pop"]) and 0 < c.ci_low < c.diff < c.ci_high
    assert c.p_value < 1e-3 and c.wins > c.losses and c.n_users == 300
    assert "cooc vs pop, paired over 300 eval users" in out["paired"] and "cooc_recent u2i vs pop" in out["paired"]
    assert "Against the baselines" in open(out["report"]).read()
    # a model's comparisons are its latest evaluation's: cooc_recent's pop rows go, cooc's stay
    evaluate.run(cfg, spark, ["cooc_recent"], compare_to=["cooc"])
    pairs = {(r.model, r.baseline) for r in io.read_table(spark, cfg.table_path(S.T_METRICS_PAIRED)).collect()}
    assert pairs == {("cooc", "pop"), ("cooc_recent", "cooc")}
    # a model only scored beside the run's own (as the pipeline scores its baselines) keeps its
    # comparisons; a baseline named twice is compared once
    evaluate.run(cfg, spark, ["cooc_recent", "cooc"], compare_to=["cooc", "cooc"], primary=["cooc_recent"])
    paired = io.read_table(spark, cfg.table_path(S.T_METRICS_PAIRED))
    assert {(r.model, r.baseline) for r in paired.collect()} == {("cooc", "pop"), ("cooc_recent", "cooc")}
    assert paired.where("model = 'cooc_recent'").count() == len(cfg.eval.ks) + 1
    evaluate.run(cfg, spark, ["cooc"], compare_to=[])  # evaluated with no comparison: cooc's rows go too
    pairs = {(r.model, r.baseline) for r in io.read_table(spark, cfg.table_path(S.T_METRICS_PAIRED)).collect()}
    assert pairs == {("cooc_recent", "cooc")}
    with pytest.raises(ValueError, match=r"--compare-to: baseline 'no_such_model' has no rows"):
        evaluate.run(cfg, spark, ["cooc"], compare_to=["no_such_model"])  # asked for explicitly: an error
    # a fused list's advice is its model with the recent stage (model=dat_recent is no model)
    with pytest.raises(ValueError, match=r"'dat_recent' has no rows .*run the pipeline with model=dat and recent.triggers > 0"):
        evaluate.run(cfg, spark, ["cooc"], compare_to=["dat_recent"])
    # one commit per table for all the models; a run that fails on a later model writes nothing
    tables = [cfg.table_path(S.T_METRICS), cfg.table_path(S.T_METRICS_PAIRED)]
    before = [io.table_version(t) for t in tables]
    evaluate.run(cfg, spark, ["cooc", "cooc_recent", "cooc"], compare_to=["pop"])
    assert [io.table_version(t) for t in tables] == [v + 1 for v in before]
    with pytest.raises(ValueError, match=r"model 'nope' has no rows"):
        evaluate.run(cfg, spark, ["cooc", "nope"], compare_to=["pop"])
    assert [io.table_version(t) for t in tables] == [v + 1 for v in before]
    assert io.read_table(spark, tables[0]).where("model = 'cooc' AND category_id IS NULL").count() == \
        len(cfg.eval.ks) + 1  # the model named twice is scored once

    # --from STAGE (the README's advice after fixing an input): the stages before it neither run nor
    # count as skipped, it and every later one run although up to date, and the tables before it stay
    versions = {t: io.table_version(cfg.table_path(t)) for t in (S.T_SEQUENCES, S.T_ITEM_GRAPH, S.T_I2I_TOPK,
                                                                 S.T_U2I_TOPK)}
    stages = ["ingest", "sequences", "graph", "topk", "recent"]
    assert all(pipeline._up_to_date(cfg, st) for st in stages)
    again = pipeline.run(cfg, spark, start_from="topk")
    assert again["skipped"] == [] and set(again) == {"topk", "recent", "evaluate", "skipped"}
    assert {t: io.table_version(cfg.table_path(t)) for t in versions} == {
        **versions, S.T_I2I_TOPK: versions[S.T_I2I_TOPK] + 1, S.T_U2I_TOPK: versions[S.T_U2I_TOPK] + 1}
    assert all(pipeline._up_to_date(cfg, st) for st in stages)  # and recorded as up to date

    # a model with a user tower, in the same warehouse: its samples, training, both sides' vectors, its
    # u2i lists and their fused twin (model two_tower_recent) are stages of their own, scored, and a
    # rerun skips them all; the cooc rows stay
    tower = load_config(ROOT / "conf" / "synthetic.yaml", [
        f"warehouse={warehouse}", *TINY, "model=two_tower", "eval.compare_to=[]", "train.max_steps=3",
        "dat.hidden=[16, 8]"])
    first = pipeline.run(tower, spark)
    assert first["skipped"] == ["generate", "ingest", "sequences", "graph"] and first["embed"]["users"] == 300
    u2i_models = {r.model for r in io.read_table(spark, tower.table_path(S.T_U2I_TOPK)).select(S.MODEL).distinct()
                  .collect()}
    assert u2i_models == {"cooc_recent", "two_tower", "two_tower_recent"}
    scored = {(r["model"], r["metric"]) for r in first["evaluate"]["rows"]}
    assert {("two_tower", "u2i_hr"), ("two_tower", "pre"), ("two_tower_recent", "u2i_hr")} <= scored
    assert all(pipeline._up_to_date(tower, st) for st in ("samples", "train", "embed", "topk", "recent"))
    # --from a later stage says which earlier stages, not run, are not up to date (here the graph,
    # rewritten behind the pipeline's back as a killed run would leave it): it reads them as they are
    io.write_table(spark, io.read_table(spark, tower.table_path(S.T_ITEM_GRAPH)), tower.table_path(S.T_ITEM_GRAPH))
    with caplog.at_level(logging.WARNING, logger="jobs.pipeline"):
        pipeline.run(tower, spark, start_from="evaluate")
    assert ("--from evaluate: the tables of graph, not run, are not those its last finished run wrote (a run killed "
            "before it finished, or a table written since); the stages from evaluate read them as they are") in caplog.text

# What `python -m jobs.pipeline` prints (tables, counts, metrics, the paired comparison) is checked by
# tests/test_spark_submit.py: jobs/submit.py runs the same __main__ (under spark-submit's session),
# and the packed environment's executors embed the items there.


def test_cli_rejects_bad_config_with_the_key_name(tmp_path):
    res = subprocess.run([sys.executable, "-m", "jobs.ingest", "--set", "ingest.format=xlsx"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "ingest.format='xlsx'" in res.stderr


def test_cli_missing_input_is_one_line_without_a_java_trace(tmp_path):
    gone = tmp_path / "UserBehavior.csv"
    res = subprocess.run([sys.executable, "-m", "jobs.ingest", "--conf", "conf/taobao.yaml", "--set",
                          f"ingest.path={gone}", "--set", f"warehouse={tmp_path / 'wh'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and f"error: MissingInput: ingest.path='{gone}': nothing there" in res.stderr
    # Spark's FileStreamSink logged the FileNotFoundException's stack at WARN before it (~90 lines)
    assert "FileNotFoundException" not in res.stderr and "\tat " not in res.stderr, res.stderr[-3000:]
    # a failed task: the executor and the scheduler logged its Java stack (~80 lines) before the one line
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"user_id": [1], "item_id": [3], "ts": [5]}), tmp_path / "pq" / "a.parquet")
    pq.write_table(pa.table({"user_id": ["u1"], "item_id": [3], "ts": [7]}), tmp_path / "pq" / "b.parquet")
    res = subprocess.run([sys.executable, "-m", "jobs.ingest", "--set", "ingest.format=parquet", "--set",
                          f"ingest.path={tmp_path / 'pq'}", "--set", f"warehouse={tmp_path / 'wh'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "error: UnreadableFile: " in res.stderr, res.stderr[-3000:]
    assert "\tat " not in res.stderr and len(res.stderr.splitlines()) < 8, res.stderr[-3000:]


def test_source_state_is_the_input_and_its_companions_not_its_folder(tmp_path):
    # the warehouse may sit beside the input file: its tables must not make the input look changed
    # (before, the input's whole folder was walked, warehouse included, so no stage was ever skipped)
    (tmp_path / "data.csv").write_text("user_id,item_id,ts\n1,10,100\n")
    csv = load_config(None, ["ingest.format=csv", f"ingest.path={tmp_path / 'data.csv'}",
                             f"warehouse={tmp_path / 'wh'}"])
    before = pipeline._state(csv, "@source")
    (tmp_path / "wh" / "actions").mkdir(parents=True)
    (tmp_path / "wh" / "actions" / "part-0.parquet").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("unrelated")
    assert pipeline._state(csv, "@source") == before
    (tmp_path / "data.csv").write_text("user_id,item_id,ts\n1,10,100\n2,11,101\n")
    assert pipeline._state(csv, "@source") != before
    # sasrec reads movies.dat beside its file: a change there is a change of the input
    (tmp_path / "seqs.txt").write_text("1 2 3\n")
    sas = load_config(None, ["ingest.format=sasrec", f"ingest.path={tmp_path / 'seqs.txt'}"])
    before = pipeline._state(sas, "@source")
    (tmp_path / "movies.dat").write_text("1::A (1999)::Drama\n")
    assert pipeline._state(sas, "@source") != before


def test_uri_warehouse_and_source_are_never_taken_as_unchanged(tmp_path, monkeypatch):
    # os.path cannot see s3a:// or dbfs:/: before, a remote source's state was always None (new data
    # never reran ingest) and the state files went to a local folder named "s3a:" on the driver
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["ingest.format=csv", "ingest.path=s3a://bucket/log.csv", "warehouse=s3a://bucket/wh"])

    def unreachable(path):  # what delta-rs raises here without credentials, after probing AWS for them
        raise OSError(f"{path}: no credentials")

    monkeypatch.setattr(pipeline.io, "table_exists", unreachable)
    first = pipeline._state(cfg, "@source")
    time.sleep(0.01)
    assert pipeline._state(cfg, "@source") != first
    pipeline._record(cfg, "graph", {"config": {}, "inputs": {}})
    assert not pipeline._up_to_date(cfg, "graph") and list(tmp_path.iterdir()) == []


def test_a_source_this_process_cannot_stat_is_never_taken_as_unchanged(tmp_path):
    # a glob (or file:/ path, or one only the cluster's file system has) had the state None: new
    # files never reran ingest
    import time

    (tmp_path / "a.csv").write_text("user_id,item_id,ts\n1,2,3\n")
    glob_cfg = load_config(None, ["ingest.format=csv", f"ingest.path={tmp_path}/*.csv"])
    first = pipeline._state(glob_cfg, "@source")
    assert first is not None and pipeline._state(glob_cfg, "@source") == first  # stable while unchanged
    (tmp_path / "b.csv").write_text("user_id,item_id,ts\n4,5,6\n")
    assert pipeline._state(glob_cfg, "@source") != first
    file_cfg = load_config(None, ["ingest.format=csv", f"ingest.path=file:{tmp_path}/a.csv"])
    assert pipeline._state(file_cfg, "@source")[0][1] is not None  # read locally
    # file:/// as well (it was taken for a remote URI: never unchanged, every run reran everything)
    uri_cfg = load_config(None, ["ingest.format=csv", f"ingest.path=file://{tmp_path}/a.csv"])
    assert pipeline._state(uri_cfg, "@source") == pipeline._state(uri_cfg, "@source")
    assert pipeline._state(uri_cfg, "@source")[0][1] is not None
    unseen = load_config(None, ["ingest.format=csv", "ingest.path=/user/hive/logs/day.csv"])
    s1 = pipeline._state(unseen, "@source")
    time.sleep(0.01)
    assert s1 is not None and pipeline._state(unseen, "@source") != s1


def test_the_number_of_training_processes_is_part_of_the_training_fingerprint(tmp_path):
    # batch_size and max_steps are per rank: 4 processes train another model than 1
    one = load_config(None, [f"warehouse={tmp_path}"])
    four = load_config(None, [f"warehouse={tmp_path}", "train.launcher=distributor", "train.num_processes=4"])
    assert pipeline._fingerprint(one, "train") != pipeline._fingerprint(four, "train")
    assert pipeline._fingerprint(one, "train") == pipeline._fingerprint(load_config(None, [f"warehouse={tmp_path}"]),
                                                                        "train")


def test_pipeline_under_a_uri_warehouse_writes_the_model_and_report_through_the_uri(spark, tmp_path, monkeypatch):
    # file:// goes through the same Arrow filesystem code as s3a:// or gs:// (the only scheme
    # reachable here). Before, the model files and the report went to a local folder named
    # "file:" in the working directory, and the pipeline fingerprinted model.pt as a Delta table.
    import tempfile

    from jobs import train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    wh = tmp_path / "wh"
    cfg = load_config(ROOT / "conf" / "synthetic.yaml", [f"warehouse=file://{wh}", *TINY, "train.max_steps=3",
                                                         "recent.triggers=0", "eval.compare_to=[]"])
    res = pipeline.run(cfg, spark)
    assert res["train"]["steps"] == 3 and res["skipped"] == []
    assert sorted(p.name for p in (wh / "models" / "natm").iterdir()) == ["model.pt", "run.json",
                                                                         "train_metrics.jsonl"]
    assert (wh / "report" / "report.html").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp", "wh"]  # nothing under ./file:
    ckpt = train.checkpoint_dir(cfg)
    assert ckpt.startswith(str(tmp_path / "tmp")) and os.listdir(ckpt)  # checkpoints: a local folder
    assert io.read_table(spark, cfg.table_path(S.T_I2I_TOPK)).where("model = 'natm'").count() > 0
    # checkpoints need renames: a URI is refused, naming the key
    with pytest.raises(ValueError, match=r"train.checkpoint_dir='s3a://b/ck' is a URI; expected a local"):
        train.checkpoint_dir(load_config(None, ["train.checkpoint_dir=s3a://b/ck"]))


def test_a_stage_whose_output_another_job_committed_since_is_not_recorded(spark, warehouse, monkeypatch):
    # a second pipeline on the warehouse committed item_graph after this stage did: recording the table
    # as it is now would make the stage skip, next time, on that other job's data
    cfg = load_config(None, [f"warehouse={warehouse}"])
    edges = spark.createDataFrame([(1, 2, 1.0, 1, 1)], "item_id long, neighbor_id long, weight double, count long, "
                                                        "rank int")
    counts = spark.createDataFrame([(1, 3)], "item_id long, count long")
    io.write_table(spark, edges, cfg.table_path(S.T_ITEM_GRAPH))
    io.write_table(spark, counts, cfg.table_path(S.T_ITEM_COUNTS))
    with monkeypatch.context() as m:
        m.setattr(io, "PROCESS_ID", "another-process")
        io.write_table(spark, edges, cfg.table_path(S.T_ITEM_GRAPH))
    assert io.last_writer(cfg.table_path(S.T_ITEM_GRAPH)) == "another-process"
    pipeline._record(cfg, "graph", {"config": {}, "inputs": {}})
    assert not os.path.exists(pipeline._state_file(cfg, "graph"))
    io.write_table(spark, edges, cfg.table_path(S.T_ITEM_GRAPH))  # this process's own commit last: recorded
    assert io.last_writer(cfg.table_path(S.T_ITEM_GRAPH)) == io.PROCESS_ID
    pipeline._record(cfg, "graph", {"config": {}, "inputs": {}})
    assert os.path.exists(pipeline._state_file(cfg, "graph"))


def test_a_source_folders_state_sees_files_under_symlinked_folders(tmp_path):
    # Spark reads through a symlinked subfolder (day=1 -> elsewhere); os.walk did not, so new data
    # there never reran ingest. A link cycle must not loop.
    real = tmp_path / "elsewhere"
    real.mkdir()
    (real / "f1.csv").write_text("user_id,item_id,ts\n1,2,3\n")
    src = tmp_path / "src"
    src.mkdir()
    (src / "day=1").symlink_to(real, target_is_directory=True)
    (real / "loop").symlink_to(src, target_is_directory=True)
    cfg = load_config(None, ["ingest.format=csv", f"ingest.path={src}"])
    before = pipeline._state(cfg, "@source")
    (real / "f2.csv").write_text("user_id,item_id,ts\n4,5,6\n")
    assert pipeline._state(cfg, "@source") != before


@pytest.mark.parametrize("settings,message", [
    (["train.launcher=torchrun", "train.num_processes=2"], "cannot start torchrun"),
    (["train.checkpoint_dir=s3a://bucket/ck"], "train.checkpoint_dir='s3a://bucket/ck' is a URI"),
    (["train.device=cuda"], "train.device=cuda"),
])
def test_training_settings_the_train_stage_would_refuse_fail_before_any_stage(spark, warehouse, settings, message):
    import torch

    from ml.config import ConfigError

    if "train.device=cuda" in settings and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = load_config(ROOT / "conf" / "synthetic.yaml", [f"warehouse={warehouse}", *settings])
    with pytest.raises(ConfigError, match=message):
        pipeline.run(cfg, spark)
    assert not io.table_exists(cfg.table_path(S.T_ACTIONS))  # nothing ran


def test_training_settings_are_not_checked_when_training_is_up_to_date(spark, warehouse, monkeypatch):
    # a model trained with train.device=cuda on a GPU box, its lists rebuilt on a laptop: training is
    # skipped there, so its device must not stop the pipeline (the stages are stubbed: only the check runs)
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = load_config(ROOT / "conf" / "synthetic.yaml", [f"warehouse={warehouse}", "train.device=cuda"])
    ran = []
    monkeypatch.setattr(pipeline, "_up_to_date", lambda c, stage: True)
    monkeypatch.setattr(pipeline, "_run_stage", lambda c, stage, *a, **k: ran.append(stage))
    pipeline.run(cfg, spark)
    assert "train" in ran
    monkeypatch.setattr(pipeline, "_up_to_date", lambda c, stage: stage != "train")
    with pytest.raises(pipeline.ConfigError, match="train.device=cuda"):
        pipeline.run(cfg, spark)


def test_a_key_added_at_its_default_leaves_the_stage_fingerprint_as_it_was(tmp_path):
    # ingest.string_ids came after warehouses were built: with it in the ingest fingerprint an upgrade
    # reran ingest, so every stage after it (training included), on unchanged data and config
    from jobs.pipeline import _fingerprint, _stage_io

    base = [f"warehouse={tmp_path / 'wh'}", "ingest.format=csv", f"ingest.path={tmp_path / 'log.csv'}"]
    default = _fingerprint(load_config(None, base), "ingest")["config"]["ingest"]
    assert "string_ids" not in default and default["format"] == "csv"
    on = load_config(None, base + ["ingest.string_ids=true"])
    assert _fingerprint(on, "ingest")["config"]["ingest"]["string_ids"] is True
    assert S.T_ID_KEYS in _stage_io(on, "ingest")[2]
    assert S.T_ID_KEYS not in _stage_io(load_config(None, base), "ingest")[2]


def test_an_output_added_to_a_stage_leaves_a_warehouse_built_before_it_up_to_date(tmp_path):
    # companions_rejected came after warehouses were built: their ingest state does not list it, and
    # comparing the outputs with it reran ingest, so every stage after it, training included
    from jobs.pipeline import _fingerprint, _record, _state_file, _up_to_date

    (tmp_path / "log.csv").write_text("user_id,item_id,ts\n1,2,3\n")
    cfg = load_config(None, [f"warehouse={tmp_path / 'wh'}", "ingest.format=csv", f"ingest.path={tmp_path / 'log.csv'}"])
    _record(cfg, "ingest", _fingerprint(cfg, "ingest"))
    assert _up_to_date(cfg, "ingest")
    saved = json.load(open(_state_file(cfg, "ingest")))
    assert S.T_COMPANIONS_REJECTED in saved["outputs"]
    del saved["outputs"][S.T_COMPANIONS_REJECTED]  # as an ingest recorded before the table existed
    json.dump(saved, open(_state_file(cfg, "ingest"), "w"))
    assert _up_to_date(cfg, "ingest")
    saved["outputs"][S.T_ACTIONS] = ["another table", 3]  # an output it listed still counts
    json.dump(saved, open(_state_file(cfg, "ingest"), "w"))
    assert not _up_to_date(cfg, "ingest")


def test_two_pipelines_recording_one_stage_at_once_both_succeed(tmp_path):
    # the cooc pipeline and a learned model's baselines stage both record topk-cooc: one temporary
    # file name for both made a rename fail ("No such file or directory: ...topk-cooc.json.tmp")
    # after the stage's work was done, killing that pipeline
    from concurrent.futures import ThreadPoolExecutor

    cfg = load_config(ROOT / "conf" / "synthetic.yaml", [f"warehouse={tmp_path / 'wh'}", "model=cooc"])

    def record(_):
        for _ in range(150):
            pipeline._record(cfg, "topk", {"k": 1})

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(record, range(4)))  # raises what a thread raised
    assert json.load(open(pipeline._state_file(cfg, "topk")))["fingerprint"] == {"k": 1}
    assert os.listdir(os.path.dirname(pipeline._state_file(cfg, "topk"))) == ["topk-cooc.json"]  # no leftovers


def test_a_second_pipeline_waits_for_a_shared_stage_and_then_skips_it(tmp_path, monkeypatch, caplog):
    # two pipelines (two models) started together on a fresh warehouse both ran ingest, graph, ...,
    # and neither recorded the stages the other wrote last: the next run redid everything
    import threading

    cfg = load_config(ROOT / "conf" / "synthetic.yaml", [f"warehouse={tmp_path / 'wh'}"])
    recorded, runs, started, waiting = [], [], threading.Event(), threading.Event()

    def graph_job(cfg, spark, **kwargs):
        runs.append(threading.current_thread().name)
        started.set()
        # the first pipeline's graph lasts until the second says it waits for it (a fixed pause let a
        # slow second thread arrive after the first had recorded, and skip without the lock)
        waiting.wait(60)
        return {"edges": 1}

    class Waiting(logging.Handler):
        def emit(self, record):
            if "waiting for another pipeline" in record.getMessage():
                waiting.set()

    handler, plog = Waiting(), logging.getLogger("jobs.pipeline")

    monkeypatch.setattr(pipeline.graph, "run", graph_job)
    monkeypatch.setattr(pipeline, "_fingerprint", lambda cfg, stage: {"stage": stage})
    monkeypatch.setattr(pipeline, "_record", lambda cfg, stage, fp: recorded.append(stage))
    monkeypatch.setattr(pipeline, "_up_to_date", lambda cfg, stage: stage in recorded)
    results = {}

    def one(name):
        results[name] = pipeline._run_stage(cfg, "graph", None, forced=False)

    # setLevel (through caplog), not the attribute: the logger caches which levels are on, and an
    # earlier test's INFO record at WARNING left "off" there
    with caplog.at_level(logging.INFO, logger="jobs.pipeline"):
        plog.addHandler(handler)
        try:
            first = threading.Thread(target=one, args=("first",), name="first")
            first.start()
            started.wait(10)
            second = threading.Thread(target=one, args=("second",), name="second")
            second.start()
            first.join(90), second.join(90)
        finally:
            plog.removeHandler(handler)
    assert waiting.is_set()  # the second pipeline met the first's lock
    assert runs == ["first"] and results == {"first": {"edges": 1}, "second": None}  # waited, then skipped
    assert os.path.exists(pipeline._state_file(cfg, "graph") + ".lock")
    # a URI warehouse keeps no state and takes no lock
    with pipeline._stage_lock(load_config(None, ["warehouse=s3a://bucket/wh"]), "graph"):
        pass


def test_a_killed_pipelines_stage_lock_does_not_hold_up_the_next(tmp_path):
    # the lock is the kernel's: a pipeline killed inside a stage leaves a lock file but no lock
    import fcntl
    import signal

    wh = tmp_path / "wh"
    cfg = load_config(ROOT / "conf" / "synthetic.yaml", [f"warehouse={wh}"])
    holder = subprocess.Popen([sys.executable, "-c", f"""
from jobs import pipeline
from ml.config import load_config
cfg = load_config({str(ROOT / 'conf' / 'synthetic.yaml')!r}, ["warehouse={wh}"])
with pipeline._stage_lock(cfg, "graph"):
    print("held", flush=True)
    import time; time.sleep(600)
"""], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = pipeline._state_file(cfg, "graph") + ".lock"
        with open(lock) as f:  # held by the other process
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    with open(lock) as f:  # free at once: a stale lock would make the next pipeline wait forever
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
