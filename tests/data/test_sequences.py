from pyspark.sql import functions as F

from ml import schemas as S
from ml.config import SequencesConfig
from ml.data.sequences import build_sequences


def _acts(spark, rows):
    return spark.createDataFrame([(u, i, t, "pv", None, None) for u, i, t in rows], S.ACTIONS)


def _collect(spark, rows, **kw):
    seq, tgt = build_sequences(_acts(spark, rows), SequencesConfig(**kw))
    return ({r.user_id: (r["items"], r.timestamps, r.length) for r in seq.collect()},
            {r.user_id: (r.trigger_item, r.target_item, r.target_ts, r.history_length) for r in tgt.collect()})


def test_time_order_tie_break_and_leave_last_out(spark):
    rows = [(1, 30, 3), (1, 10, 1), (1, 25, 2), (1, 20, 2),  # 20 and 25 share ts 2 -> item id order
            (2, 7, 5), (2, 8, 6),
            (3, 9, 1)]  # one action: no trigger, excluded
    seq, tgt = _collect(spark, rows)
    assert seq == {1: ([10, 20, 25], [1, 2, 2], 3), 2: ([7], [5], 1)}
    assert tgt == {1: (25, 30, 3, 3), 2: (7, 8, 6, 1)}


def test_events_within_a_second_keep_the_sources_order(spark, tmp_path):
    # a click log in ms: user 2 saw 9, then 1, in one second; the sequence must say so, and the eval
    # trigger is 1. Before, ts was floored to the second and the item id ordered the two: [1, 9].
    from ml.config import IngestConfig
    from ml.data import ingest as I
    from ml.data.formats import read_source

    path = tmp_path / "ms.csv"
    path.write_text("u,i,t\n1,9,1700000000100\n1,1,1700000000900\n1,5,1700000001100\n1,3,1700000005000\n"
                    "2,9,1700000000100\n2,1,1700000000900\n2,5,1700000009000\n2,1,1700000000950\n")
    for unit, scale in (("ms", 1), ("us", 1000), ("ns", 1_000_000)):
        if unit != "ms":  # the same times in a finer unit
            lines = path.read_text().splitlines()
            (tmp_path / f"{unit}.csv").write_text("\n".join(
                [lines[0]] + [",".join(ln.split(",")[:2] + [str(int(ln.split(",")[2]) * scale)]) for ln in lines[1:]]) + "\n")
        cfg = IngestConfig(format="csv", path=str(tmp_path / f"{unit}.csv") if unit != "ms" else str(path), ts_unit=unit,
                           columns={"user_id": "u", "item_id": "i", "ts": "t"})
        src = read_source(spark, cfg, default_path="unused")
        actions = I.good_actions(I.validate_actions(src.actions, ts_unit=src.ts_unit))
        micros = sorted(r[S.TS_MICROS] for r in actions.where("user_id = 2").collect())
        assert micros == [1700000000100000, 1700000000900000, 1700000000950000, 1700000009000000], unit
        seq, tgt = build_sequences(actions, SequencesConfig(collapse_repeats=True))
        got = {r.user_id: r["items"] for r in seq.collect()}
        # user 2's two 1s (900 and 950 ms) are one repeat, collapsed in the source's order
        assert got == {1: [9, 1, 5], 2: [9, 1]}, unit
        assert {r.user_id: (r.trigger_item, r.target_item) for r in tgt.collect()} == {1: (5, 3), 2: (1, 5)}
    # an actions table written before ts_micros (seconds only) still reads, in (ts, item_id) order
    old = actions.drop(S.TS_MICROS)
    seq, _ = build_sequences(old, SequencesConfig())
    assert {r.user_id: r["items"] for r in seq.collect()}[2] == [1, 1, 9]


def test_eval_target_never_in_training_sequence_and_ids_unchanged(spark):
    rows = [(5, 1000000000001, t) for t in range(3)] + [(5, 42, 10)]
    seq, tgt = _collect(spark, rows)
    assert 42 not in seq[5][0] and tgt[5][1] == 42 and seq[5][0][0] == 1000000000001


def test_max_length_keeps_most_recent_and_min_length(spark):
    rows = [(1, i, i) for i in range(10)] + [(2, 1, 1), (2, 2, 2)]
    seq, tgt = _collect(spark, rows, max_length=4, min_length=3)
    assert seq == {1: ([5, 6, 7, 8], [5, 6, 7, 8], 4)}
    assert tgt == {1: (8, 9, 9, 9)}


def test_validation_holdout_never_sees_the_test_item(spark):
    rows = [(1, 10, 1), (1, 20, 2), (1, 30, 3), (1, 40, 4), (2, 7, 5), (2, 8, 6)]
    seq, tgt = _collect(spark, rows, holdout=2)
    # user 1: 40 (the test target) is gone; 30 is the validation target, 20 its trigger
    assert seq == {1: ([10, 20], [1, 2], 2)} and tgt == {1: (20, 30, 3, 2)}  # user 2 is too short now


def test_collapse_repeats(spark):
    rows = [(1, 5, 1), (1, 5, 2), (1, 6, 3), (1, 6, 4), (1, 5, 5)]
    seq, tgt = _collect(spark, rows, collapse_repeats=True)
    assert seq[1][0] == [5, 6] and tgt[1][:2] == (6, 5)


def test_contract_schemas(spark):
    seq, tgt = build_sequences(_acts(spark, [(1, 2, 3), (1, 3, 4)]), SequencesConfig())
    assert [f.name for f in seq.schema] == [f.name for f in S.SEQUENCES]
    assert [f.dataType.simpleString() for f in tgt.schema] == [f.dataType.simpleString() for f in S.EVAL_TARGETS]


def test_bounded_collection_gives_the_same_tables_as_collecting_everything(spark, monkeypatch):
    # With max_length set, each user's most recent events are kept by a bounded top-k aggregate
    # (a power user is not one huge row); the tables must equal those of the full collect_list,
    # ties in ts and repeated (ts, item) events included, and history_length must stay the full count.
    import random

    from ml.data import sequences as seqmod

    rnd = random.Random(3)
    rows = [(u, rnd.randrange(6), rnd.randrange(8)) for u in range(12) for _ in range(rnd.randrange(1, 30))]
    for kw in (dict(max_length=3), dict(max_length=5, holdout=2), dict(max_length=1, min_length=4),
               dict(max_length=4, collapse_repeats=True)):
        bounded = _collect(spark, rows, **kw)
        # Spark 4.0/4.1 (no bounded top-k aggregate): the same bound by a window
        monkeypatch.setattr(seqmod, "has_top_k_aggregate", lambda df: False)
        windowed = _collect(spark, rows, **kw)
        monkeypatch.undo()
        monkeypatch.setattr(seqmod, "MAX_BY_K_LIMIT", 2)  # a bound over the aggregate's limit: the window too
        over_limit = _collect(spark, rows, **kw)
        monkeypatch.undo()
        assert bounded == windowed == over_limit == _reference(rows, **kw), kw
    assert seqmod._events_needed(SequencesConfig(max_length=3, holdout=2)) == 5
    assert seqmod._events_needed(SequencesConfig(max_length=None)) is None
    # and what each user's aggregation holds is bounded there too (it held every event: a bot's 10^8
    # events one multi-GB array), while the count still sees every event
    monkeypatch.setattr(seqmod, "has_top_k_aggregate", lambda df: False)
    held = seqmod.user_events(_acts(spark, [(1, i, i) for i in range(50)]), SequencesConfig(max_length=3)).collect()
    assert [(r["m"], r["n"]) for r in held] == [(4, 50)]
    _, tgt = _collect(spark, [(1, i, i) for i in range(50)], max_length=2)
    assert tgt[1][3] == 49  # history_length counts every action before the target


def _reference(rows, max_length=None, min_length=2, holdout=1, collapse_repeats=False):
    """build_sequences in plain Python, one user at a time."""
    seq, tgt = {}, {}
    for u in sorted({r[0] for r in rows}):
        ev = sorted((t, i) for uu, i, t in rows if uu == u)
        if collapse_repeats:
            ev = [e for k, e in enumerate(ev) if k == 0 or e[1] != ev[k - 1][1]]
        ev = ev[:len(ev) - (holdout - 1)]
        if len(ev) < min_length:
            continue
        train = ev[:-1][-max_length:] if max_length else ev[:-1]
        seq[u] = ([i for _, i in train], [t for t, _ in train], len(train))
        tgt[u] = (ev[-2][1], ev[-1][1], ev[-1][0], len(ev) - 1)
    return seq, tgt


def test_collapsed_repeats_stay_bounded_and_equal_collapsing_every_event(spark):
    # collapse_repeats used to need every event of a user in one array (collect_list): a bot's 10^8
    # page views were one aggregation buffer. Repeats now go before the bounded top-k aggregate.
    import random

    from ml.data.sequences import user_events

    rnd = random.Random(5)
    rows = [(u, rnd.randrange(3), rnd.randrange(10)) for u in range(15) for _ in range(rnd.randrange(1, 40))]
    for kw in (dict(collapse_repeats=True), dict(collapse_repeats=True, max_length=3),
               dict(collapse_repeats=True, max_length=2, holdout=2, min_length=3)):
        assert _collect(spark, rows, **kw) == _reference(rows, **kw), kw
    plan = user_events(_acts(spark, rows), SequencesConfig(collapse_repeats=True, max_length=3))._jdf \
        .queryExecution().optimizedPlan().toString()
    assert "max_by" in plan and "collect_list" not in plan


def test_each_partition_holds_its_users_in_id_order_whatever_order_their_actions_came_in(spark):
    # the aggregation emits users in the order their rows arrive; a cluster fetches shuffle blocks in
    # a random order, so the files' row order (the NATM samples' and the training's) changed per run
    rows = [(u, 100 + (u * 7 + t) % 13, t) for u in range(60, 0, -1) for t in range(4)]
    for parts in (1, 3):
        acts = _acts(spark, rows).repartition(parts)
        seqs, targets = build_sequences(acts, SequencesConfig(max_length=None))
        for df in (seqs, targets):
            per_part = df.select(S.USER_ID).rdd.mapPartitions(lambda it: [[r[0] for r in it]]).collect()
            assert all(p == sorted(p) for p in per_part) and sum(map(len, per_part)) == 60
