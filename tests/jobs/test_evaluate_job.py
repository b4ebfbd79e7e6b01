"""jobs.evaluate on hand-written lists: the rows it returns, which baseline lists a comparison scores,
and whose earlier comparisons a run replaces."""
import pytest
from pyspark.sql import functions as F

from jobs import evaluate
from ml import schemas as S
from ml.config import load_config
from ml.data import io

# (user, trigger, target): user 1 1 -> 2, user 2 5 -> 6, user 3 5 -> 7
TARGETS = [(1, 1, 2, 0, 3), (2, 5, 6, 0, 3), (3, 5, 7, 0, 3)]
I2I = {"dat": {1: [2], 5: [6]}, "two_tower": {1: [9], 5: [7]}}  # item -> list
U2I = {"dat": {1: [3], 2: [6], 3: [8]}, "two_tower": {1: [2], 2: [6], 3: [7]}}  # user -> list
CATEGORIES = [(2, 10), (6, 10), (7, 11)]


def _lists(spark, lists, schema):
    rows = [(key, nb, 1.0 / r, r, model) for model, by in lists.items() for key, nbs in by.items()
            for r, nb in enumerate(nbs, 1)]
    return spark.createDataFrame(rows, schema)


@pytest.fixture
def cfg(spark, warehouse):
    cfg = load_config(None, [f"warehouse={warehouse}", "eval.ks=[1,2]", "eval.compare_to=[]"])
    io.write_table(spark, spark.createDataFrame(TARGETS, S.EVAL_TARGETS), cfg.table_path(S.T_EVAL_TARGETS))
    io.write_table(spark, _lists(spark, I2I, S.I2I_TOPK), cfg.table_path(S.T_I2I_TOPK), partition_by=[S.MODEL])
    io.write_table(spark, _lists(spark, U2I, S.U2I_TOPK), cfg.table_path(S.T_U2I_TOPK), partition_by=[S.MODEL])
    items = spark.createDataFrame([(i, c, None, None, None) for i, c in CATEGORIES], S.ITEMS_TABLE)
    io.write_table(spark, items, cfg.table_path(S.T_ITEMS))
    return cfg


def _paired(spark, cfg):
    return {(r.model, r.baseline, r.metric, r.k): r
            for r in io.read_table(spark, cfg.table_path(S.T_METRICS_PAIRED)).collect()}


def test_returned_rows_are_the_overall_ones_of_every_list_kind(spark, cfg):
    out = evaluate.run(cfg, spark, ["dat"])
    # per-category rows stay in the table; the rows returned (printed, and their n_users the report's)
    # are the overall ones: i2i and u2i, (Pre@1, Pre@2, MRR) each
    assert all(r[S.CATEGORY_ID] is None for r in out["rows"]) and len(out["rows"]) == 2 * 3
    assert {r[S.N_USERS] for r in out["rows"]} == {3}
    table = io.read_table(spark, cfg.table_path(S.T_METRICS))
    assert table.where(F.col(S.CATEGORY_ID).isNotNull()).count() > 0
    got = {(r[S.METRIC], r[S.K]): r[S.VALUE] for r in out["rows"]}
    assert got[("pre", 1)] == pytest.approx(2 / 3) and got[("u2i_hr", 1)] == pytest.approx(1 / 3)


def test_each_list_kind_is_compared_with_the_baselines_lists_of_the_same_kind(spark, cfg):
    evaluate.run(cfg, spark, ["dat", "two_tower"], compare_to=["two_tower"], primary=["dat"])
    paired = _paired(spark, cfg)
    i2i, u2i = paired[("dat", "two_tower", "pre", 1)], paired[("dat", "two_tower", "u2i_hr", 1)]
    # i2i: dat hits users 1 and 2, two_tower user 3; u2i: dat hits user 2, two_tower all three
    assert (i2i.baseline_kind, i2i.value, i2i.baseline_value) == ("i2i", pytest.approx(2 / 3), pytest.approx(1 / 3))
    assert (u2i.baseline_kind, u2i.value, u2i.baseline_value) == ("u2i", pytest.approx(1 / 3), 1.0)
    assert (u2i.wins, u2i.losses) == (0, 2)


def test_a_produced_models_earlier_comparisons_go_and_a_bystanders_stay(spark, cfg):
    evaluate.run(cfg, spark, ["dat"], compare_to=["two_tower"])
    assert {k[:2] for k in _paired(spark, cfg)} == {("dat", "two_tower")}
    # dat scored beside another model (a pipeline's baseline, say), comparing nothing: its comparisons stay
    evaluate.run(cfg, spark, ["two_tower", "dat"], compare_to=[], primary=["two_tower"])
    assert {k[:2] for k in _paired(spark, cfg)} == {("dat", "two_tower")}
    # dat produced by this run, which compares it with nothing: the earlier comparison is not this run's
    evaluate.run(cfg, spark, ["dat"], compare_to=[], primary=["dat"])
    assert _paired(spark, cfg) == {}


def test_the_report_takes_to_the_driver_only_the_rows_it_shows(spark, cfg, monkeypatch):
    """Per-category metric rows grow with the categories (10⁵ hashed keys are millions of rows): the
    report collects the overall rows and the per-category rows of the plot (its K, Pre@K/HR@K, the 25
    categories with the most eval users), and looks up those categories' names only."""
    import datetime

    from ml.eval import report

    evaluate.run(cfg, spark, ["dat"])
    ts = datetime.datetime(2026, 1, 1)
    # 40 more categories, each with rows at both Ks and an MRR row; category c has c eval users
    extra = [("dat", m, k, c, 0.5, c, ts, None) for c in range(100, 140)
             for m, k in (("pre", 1), ("pre", 2), ("mrr", None))]
    io.write_table(spark, spark.createDataFrame(extra, S.METRICS), cfg.table_path(S.T_METRICS), mode="append",
                   partition_by=[S.MODEL])
    seen = {}

    def capture(out_dir, rows, ks, table_text, curves, names, **kw):
        seen.update(rows=rows, names=names)
        return "report.html"

    monkeypatch.setattr(report, "write_report", capture)
    names = []
    monkeypatch.setattr(evaluate, "category_names", lambda items, ids: names.append(set(ids)) or {})
    evaluate.write_evaluation_report(cfg, spark, 3, "")
    cats = {r[S.CATEGORY_ID] for r in seen["rows"] if r[S.CATEGORY_ID] is not None}
    assert cats == set(range(115, 140))  # the 25 largest; the fixture's 1-user categories are not among them
    assert {(r[S.METRIC], r[S.K]) for r in seen["rows"] if r[S.CATEGORY_ID] is not None} == {("pre", 2)}
    overall = io.read_table(spark, cfg.table_path(S.T_METRICS)).where(F.col(S.CATEGORY_ID).isNull()).count()
    assert sum(r[S.CATEGORY_ID] is None for r in seen["rows"]) == overall > 0
    assert names == [cats]


def test_targets_and_sequences_of_two_runs_of_the_sequences_job_are_refused(spark, cfg, monkeypatch):
    # jobs.sequences commits eval_targets, then sequences: killed between the two, the targets are
    # another split's than the sequences the lists were built from, and were scored as if they were not
    from ml.errors import InvalidInput

    seqs = spark.createDataFrame([(1, [1], [0], 1), (2, [5], [0], 1), (3, [5], [0], 1)], S.SEQUENCES)
    monkeypatch.setattr(io, "PROCESS_ID", "another-process")  # the sequences job that was killed
    io.write_table(spark, seqs, cfg.table_path(S.T_SEQUENCES))
    monkeypatch.undo()
    with pytest.raises(InvalidInput, match=r"eval_targets and .*sequences were written by different runs of "
                                           r"jobs.sequences .*rerun jobs.sequences"):
        evaluate.run(cfg, spark, ["dat"])
    io.write_table(spark, seqs, cfg.table_path(S.T_SEQUENCES), mode="overwrite")  # one run wrote both
    assert evaluate.run(cfg, spark, ["dat"])["rows"]


def test_lists_of_two_runs_of_the_topk_job_are_refused(spark, cfg):
    # jobs.topk commits a DAT model's i2i lists, then its u2i lists: killed between the two, the u2i
    # lists were the previous model's, scored beside the new i2i lists as one model's
    from ml.errors import InvalidInput

    u2i = io.read_table(spark, cfg.table_path(S.T_U2I_TOPK)).where("model = 'dat'").localCheckpoint()
    i2i = io.read_table(spark, cfg.table_path(S.T_I2I_TOPK)).where("model = 'dat'").localCheckpoint()
    io.job_run(lambda: [io.replace_model_partition(spark, t, cfg.table_path(n), "dat")
                        for t, n in ((i2i, S.T_I2I_TOPK), (u2i, S.T_U2I_TOPK))])()
    assert evaluate.run(cfg, spark, ["dat"])["rows"]
    io.job_run(lambda: io.replace_model_partition(spark, i2i, cfg.table_path(S.T_I2I_TOPK), "dat"))()  # killed there
    with pytest.raises(InvalidInput, match=r"i2i_topk and u2i_topk of model 'dat' were written by different runs "
                                           r"\(jobs.topk killed .*rerun jobs.topk for model=dat"):
        evaluate.run(cfg, spark, ["dat"])


def _retopk(spark, cfg, model, i2i, u2i):
    """A model's lists replaced as one run of jobs.topk replaces them (i2i, then u2i)."""
    io.job_run(lambda: [io.replace_model_partition(spark, _lists(spark, {model: by}, schema), cfg.table_path(t), model)
                        for by, schema, t in ((i2i, S.I2I_TOPK, S.T_I2I_TOPK), (u2i, S.U2I_TOPK, S.T_U2I_TOPK))])()


def test_comparisons_that_metrics_no_longer_agree_with_go_with_the_next_evaluation(spark, cfg, monkeypatch, caplog):
    evaluate.run(cfg, spark, ["dat"], compare_to=["two_tower"])
    evaluate.run(cfg, spark, ["two_tower"], compare_to=["dat"])
    kinds = lambda: {(r.model, r.baseline, r.baseline_kind) for r in _paired(spark, cfg).values()}  # noqa: E731
    assert kinds() == {("dat", "two_tower", "i2i"), ("dat", "two_tower", "u2i"),
                       ("two_tower", "dat", "i2i"), ("two_tower", "dat", "u2i")}
    # two_tower retrained: its i2i lists now hit users 1 and 2 (Pre@1 2/3, was 1/3), its u2i lists as
    # before. Evaluated alone, comparing nothing: its own comparisons go (it was produced by this run),
    # and so does dat's i2i comparison with the two_tower lists that are no longer there; dat's u2i one,
    # whose two_tower lists are the same, stays
    _retopk(spark, cfg, "two_tower", {1: [2], 5: [6]}, U2I["two_tower"])
    with caplog.at_level("WARNING", logger="jobs.evaluate"):
        evaluate.run(cfg, spark, ["two_tower"], compare_to=[])
    assert kinds() == {("dat", "two_tower", "u2i")}
    warned = [r.getMessage() for r in caplog.records if "metrics_paired" in r.getMessage()]
    assert len(warned) == 1 and "dat vs two_tower no longer agrees with metrics" in warned[0], warned
    assert "two_tower Pre@1 is 0.6667 over 3 eval users in metrics" in warned[0] and "0.3333 over 3 in the comparison" \
        in warned[0] and "rerun jobs.evaluate --model dat --compare-to two_tower" in warned[0], warned[0]
    caplog.clear()
    # a run killed between its two commits: dat's metrics of its new u2i lists written, its comparisons
    # still the earlier run's; the next evaluation of anything removes them
    _retopk(spark, cfg, "dat", I2I["dat"], {1: [2], 2: [6], 3: [7]})
    real_write = io.write_table

    def killed(spark_, df, path, *a, **kw):
        if path == cfg.table_path(S.T_METRICS_PAIRED):
            raise KeyboardInterrupt("killed")
        return real_write(spark_, df, path, *a, **kw)

    monkeypatch.setattr(io, "write_table", killed)
    with pytest.raises(KeyboardInterrupt):
        evaluate.run(cfg, spark, ["dat"], compare_to=["two_tower"])
    monkeypatch.undo()
    hr1 = io.read_table(spark, cfg.table_path(S.T_METRICS)).where("model = 'dat' AND metric = 'u2i_hr' AND k = 1 "
                                                                 "AND category_id IS NULL").first().value
    assert hr1 == pytest.approx(1.0) and _paired(spark, cfg)[("dat", "two_tower", "u2i_hr", 1)].value == pytest.approx(1 / 3)
    with caplog.at_level("WARNING", logger="jobs.evaluate"):
        evaluate.run(cfg, spark, ["two_tower"], compare_to=[])
    assert kinds() == set()
    warned = [r.getMessage() for r in caplog.records if "metrics_paired" in r.getMessage()]
    assert len(warned) == 1 and "dat u2i vs two_tower u2i no longer" in warned[0] and "dat u2i Pre@1 is 1.0000" in \
        warned[0], warned
    # unchanged lists evaluated again keep every comparison (the bystander case of the pipeline's baselines)
    evaluate.run(cfg, spark, ["dat"], compare_to=["two_tower"])
    evaluate.run(cfg, spark, ["two_tower", "dat"], compare_to=[], primary=["two_tower"])
    assert kinds() == {("dat", "two_tower", "i2i"), ("dat", "two_tower", "u2i")}


def test_lists_shorter_than_the_largest_k_are_named_in_a_warning(spark, cfg, caplog):
    # the fixture's lists hold 1 item, eval.ks goes to 2: HR@2 of a 1-item list is its HR@1
    with caplog.at_level("WARNING", logger="jobs.evaluate"):
        evaluate.run(cfg, spark, ["dat"], compare_to=["two_tower"])
    warned = sorted(r.getMessage() for r in caplog.records if "lists hold at most" in r.getMessage())
    assert len(warned) == 4, warned  # dat and two_tower (the baseline's lists too), i2i and u2i
    assert warned[0].startswith("dat: its i2i lists hold at most 1 items, and eval.ks goes to 2") and \
        "rerun its topk (or baseline) stage with baseline.k >= 2" in warned[0], warned[0]
    caplog.clear()
    two = load_config(None, [f"warehouse={cfg.warehouse}", "eval.ks=[1]", "baseline.k=1", "eval.compare_to=[]"])
    with caplog.at_level("WARNING", logger="jobs.evaluate"):
        evaluate.run(two, spark, ["dat"])
    assert not [r for r in caplog.records if "lists hold at most" in r.getMessage()]
