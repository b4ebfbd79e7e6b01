"""Every input format -> the same typed actions; bad rows kept with a reason; nothing lost."""
import os
import re

import pytest
from pyspark.sql import functions as F

from ml import schemas as S
from ml.config import ConfigError, IngestConfig
from ml.data import ingest as I
from ml.data.formats import SourceSchemaError, items_from_movies, read_source


def _run(spark, cfg: IngestConfig):
    src = read_source(spark, cfg, default_path="unused", delta_mode="delta-rs")
    v = I.validate_actions(src.actions, behaviors=src.behaviors, ts_unit=src.ts_unit, ts_format=cfg.ts_format,
                           min_ts=cfg.min_ts, max_ts=cfg.max_ts)
    rows = I.good_actions(v).collect()
    # the finer time, where there is one, is within the row's second
    assert all(r[S.TS_MICROS] is None or r[S.TS_MICROS] // 1_000_000 == r[S.TS] for r in rows)
    good = sorted(tuple(r)[:5] for r in rows)
    bad = sorted((r[S.REASON], r[S.USER_ID], r[S.ITEM_ID], r[S.RAW_RECORD]) for r in I.rejected_actions(v).collect())
    return src, good, bad


def _write(tmp_path, name, text, encoding="utf-8"):
    p = tmp_path / name
    p.write_bytes(text.encode(encoding))
    return str(p)


def test_csv_with_header_mapping_and_every_bad_row_kind(spark, tmp_path):
    path = _write(tmp_path, "log.csv", "\n".join([
        "uid,iid,when,act,cat",
        "1,10,100,pv,7",
        "1,11,101,buy,7",
        "1,11,101,buy,7",          # exact duplicate -> one copy kept
        ",12,102,pv,7",            # missing user
        "x1,12,102,pv,7",          # bad user id
        "2,12.5,102,pv,7",         # fractional item id is not an id
        "2,13,yesterday,pv,7",     # bad ts
        "2,14,103,teleport,7",     # unknown behaviour
        "2,15,104,pv,seven",       # bad category
        "2,16,105,pv,",            # no category: fine
        "3,17",                    # too few fields
        "99999999999999999999,1,1,pv,1",  # overflows bigint
    ]) + "\n")
    cfg = IngestConfig(format="csv", path=path, behaviors=["pv", "buy"],
                       columns={"user_id": "uid", "item_id": "iid", "ts": "when", "behavior": "act",
                                "category_id": "cat"})
    _, good, bad = _run(spark, cfg)
    assert good == [(1, 10, 100, "pv", 7), (1, 11, 101, "buy", 7), (2, 16, 105, "pv", None)]
    reasons = sorted(r[0] for r in bad)
    assert reasons == sorted([I.DUPLICATE, I.MISSING_USER, I.BAD_USER, I.BAD_ITEM, I.BAD_TS, I.BAD_BEHAVIOR,
                              I.BAD_CATEGORY, I.MALFORMED, I.BAD_USER])
    # of two copies of one event written differently, the rejected one is the same on every run
    for lines in ("4,5,6\n 4 ,5,6\n", " 4 ,5,6\n4,5,6\n"):  # either file order: the same row rejected
        spaced = _write(tmp_path, "spaced.csv", "uid,iid,when\n" + lines)
        _, kept, dup = _run(spark, IngestConfig(format="csv", path=spaced,
                                                columns={"user_id": "uid", "item_id": "iid", "ts": "when"}))
        assert kept == [(4, 5, 6, None, None)] and dup == [(I.DUPLICATE, "4", "5", None)], lines
    # a bad row that shares a good row's key (its category did not parse) does not push the good one out
    shared = _write(tmp_path, "shared.csv", "uid,iid,when,cat\n  4,5,6,abc\n4,5,6,\n")
    _, kept, rejected = _run(spark, IngestConfig(format="csv", path=shared, columns={
        "user_id": "uid", "item_id": "iid", "ts": "when", "category_id": "cat"}))
    assert kept == [(4, 5, 6, None, None)] and [r[0] for r in rejected] == [I.BAD_CATEGORY]
    malformed = [r for r in bad if r[0] == I.MALFORMED][0]
    assert malformed[3] == "3,17"  # the raw line is kept
    # nothing lost: every data line is either an action or a rejected row
    assert len(good) + len(bad) == 12


def test_csv_missing_and_extra_columns_fail_at_once(spark, tmp_path):
    path = _write(tmp_path, "log.csv", "user,item,time,rating\n1,2,3,5\n")
    with pytest.raises(SourceSchemaError, match=r"missing mapped columns \['ts->ts'\]"):
        read_source(spark, IngestConfig(format="csv", path=path,
                                        columns={"user_id": "user", "item_id": "item", "ts": "ts"}), "")
    with pytest.raises(SourceSchemaError, match=r"extra columns \['rating'\].*allow_extra_columns"):
        read_source(spark, IngestConfig(format="csv", path=path,
                                        columns={"user_id": "user", "item_id": "item", "ts": "time"}), "")
    ok = read_source(spark, IngestConfig(format="csv", path=path, allow_extra_columns=True,
                                         columns={"user_id": "user", "item_id": "item", "ts": "time"}), "")
    assert ok.actions.select(S.USER_ID, S.ITEM_ID, S.TS).first() == ("1", "2", "3")
    with pytest.raises(SourceSchemaError, match="no mapping for required field 'ts'"):
        read_source(spark, IngestConfig(format="csv", path=path, allow_extra_columns=True,
                                        columns={"user_id": "user", "item_id": "item"}), "")
    # every unmapped required field at once, not one per rerun
    with pytest.raises(SourceSchemaError, match=r"required fields \['item_id', 'ts'\].*ingest.columns.item_id="
                                                r".*ingest.columns.ts="):
        read_source(spark, IngestConfig(format="csv", path=path, allow_extra_columns=True,
                                        columns={"user_id": "user"}), "")


def test_a_line_missing_a_field_is_malformed_with_an_unmapped_column(spark, tmp_path):
    # Spark's CSV column pruning parses only the mapped columns and skips the field-count check: the
    # line "1,1700000000,5" (item missing) was read as item 1700000000 at ts 5, a good action.
    path = _write(tmp_path, "log.csv", "uid,iid,when,note\n1,10,100,ok\n1,1700000000,5\n2,20,200,a,b,c\n")
    cfg = IngestConfig(format="csv", path=path, allow_extra_columns=True, ts_unit="s",
                       columns={"user_id": "uid", "item_id": "iid", "ts": "when"})
    _, good, bad = _run(spark, cfg)
    assert [g[:2] for g in good] == [(1, 10)]
    assert [(r[0], r[3]) for r in bad] == [(I.MALFORMED, "1,1700000000,5"), (I.MALFORMED, "2,20,200,a,b,c")]


def test_headerless_csv_first_line_is_split_as_csv(spark, tmp_path):
    # a quoted field holding the separator is one field, and a leading blank line is skipped (as Spark does)
    path = _write(tmp_path, "log.csv", '\n1,2,3,"a,b"\n4,5,6,c\n')
    cfg = IngestConfig(format="csv", path=path, csv_header=False, csv_schema=["u", "i", "t", "note"], ts_unit="s",
                       allow_extra_columns=True, columns={"user_id": "u", "item_id": "i", "ts": "t"})
    _, good, bad = _run(spark, cfg)
    assert [g[:2] for g in good] == [(1, 2), (4, 5)] and bad == []


def test_headerless_tab_separated_file_with_the_tab_written_out(spark, tmp_path):
    # --set 'ingest.csv_sep=\t' (what the config's error suggests) is a tab to Spark's reader; the
    # header-less field count was split on the two characters backslash and t, and refused the file
    path = _write(tmp_path, "log.tsv", "1\t2\t3\n4\t5\t6\n")
    cols = {"user_id": "u", "item_id": "i", "ts": "t"}
    for sep in ("\\t", "\t"):
        cfg = IngestConfig(format="csv", path=path, csv_header=False, csv_sep=sep, csv_schema=["u", "i", "t"],
                           ts_unit="s", columns=cols)
        _, good, bad = _run(spark, cfg)
        assert [g[:3] for g in good] == [(1, 2, 3), (4, 5, 6)] and bad == []


def test_headerless_csv_field_count_mismatch(spark, tmp_path):
    path = _write(tmp_path, "log.csv", "1;2;3;x\n")
    with pytest.raises(SourceSchemaError, match=r"log.csv: 1 of the first 1 lines.*the 3 fields ingest.csv_schema names.*"
                                                r"first line has 4 fields: extra columns at positions \[4\]"):
        read_source(spark, IngestConfig(format="csv", path=path, csv_header=False, csv_sep=";",
                                        csv_schema=["u", "i", "t"], columns={"user_id": "u", "item_id": "i", "ts": "t"}), "")
    empty = _write(tmp_path, "empty.csv", "")  # no line to count: an empty file, said so (csv and taobao alike)
    for cfg in (IngestConfig(format="csv", path=empty, csv_header=False, csv_schema=["user_id", "item_id", "ts"]),
                IngestConfig(format="taobao", path=empty)):
        with pytest.raises(SourceSchemaError, match="empty.csv: the file is empty"):
            read_source(spark, cfg, "")


def test_millisecond_and_string_timestamps(spark, tmp_path):
    ms = _write(tmp_path, "ms.csv", "u,i,t\n1,2,1500000000999\n")
    _, good, _ = _run(spark, IngestConfig(format="csv", path=ms, ts_unit="ms",
                                          columns={"user_id": "u", "item_id": "i", "ts": "t"}))
    assert good == [(1, 2, 1500000000, None, None)]
    # two events 400 ms apart are two events (before: floored to the same second, one was a duplicate)
    ms2 = _write(tmp_path, "ms2.csv", "u,i,t\n1,2,1000000\n1,2,1000400\n1,2,1000400\n")
    _, good, bad = _run(spark, IngestConfig(format="csv", path=ms2, ts_unit="ms",
                                            columns={"user_id": "u", "item_id": "i", "ts": "t"}))
    assert good == [(1, 2, 1000, None, None)] * 2 and [b[0] for b in bad] == [I.DUPLICATE]
    st = _write(tmp_path, "st.csv", "u,i,t\n1,2,2020-01-01 00:00:10\n1,3,not a date\n")
    _, good, bad = _run(spark, IngestConfig(format="csv", path=st, ts_unit="string",
                                            columns={"user_id": "u", "item_id": "i", "ts": "t"}))
    assert good == [(1, 2, 1577836810, None, None)] and [b[0] for b in bad] == [I.BAD_TS]
    # string times with a fraction: 400 ms apart are two events too, as for ms and TIMESTAMP sources
    frac = _write(tmp_path, "frac.csv", "u,i,t\n1,2,2020-01-01 00:00:00.100\n1,2,2020-01-01 00:00:00.500\n"
                                        "1,2,2020-01-01 00:00:00.500\n")
    _, good, bad = _run(spark, IngestConfig(format="csv", path=frac, ts_unit="string",
                                            ts_format="yyyy-MM-dd HH:mm:ss[.SSS]",
                                            columns={"user_id": "u", "item_id": "i", "ts": "t"}))
    assert good == [(1, 2, 1577836800, None, None)] * 2 and [b[0] for b in bad] == [I.DUPLICATE]


def test_micro_and_nanosecond_timestamps_and_times_no_timestamp_holds(spark, tmp_path):
    cols = {"user_id": "u", "item_id": "i", "ts": "t"}
    # us and ns floor to the second exactly (a double would round 1500000000999999999 ns up to ...001 s);
    # before 1970 the floor goes down; events 400 ns apart are two events, exact copies one
    ns = _write(tmp_path, "ns.csv", "u,i,t\n1,2,1500000000999999999\n1,3,-1\n1,4,400\n1,4,800\n1,4,800\n")
    _, good, bad = _run(spark, IngestConfig(format="csv", path=ns, ts_unit="ns", columns=cols))
    assert good == [(1, 2, 1500000000, None, None), (1, 3, -1, None, None), (1, 4, 0, None, None),
                    (1, 4, 0, None, None)] and [b[0] for b in bad] == [I.DUPLICATE]
    us = _write(tmp_path, "us.csv", "u,i,t\n1,2,1500000000999999\n")
    _, good, _ = _run(spark, IngestConfig(format="csv", path=us, ts_unit="us", columns=cols))
    assert good == [(1, 2, 1500000000, None, None)]
    # string times to the us: 400 us apart are two events, as for a TIMESTAMP column (before: to the ms)
    st = _write(tmp_path, "st_us.csv", "u,i,t\n1,2,2020-01-01 00:00:00.000100\n1,2,2020-01-01 00:00:00.000500\n")
    _, good, bad = _run(spark, IngestConfig(format="csv", path=st, ts_unit="string", columns=cols,
                                            ts_format="yyyy-MM-dd HH:mm:ss.SSSSSS"))
    assert good == [(1, 2, 1577836800, None, None)] * 2 and bad == []
    # ms read as seconds is the year 49,503: no time a TIMESTAMP holds, so bad_ts (before: an action)
    _, good, bad = _run(spark, IngestConfig(format="csv", path=us, ts_unit="ms", columns=cols))
    assert good == [] and [b[0] for b in bad] == [I.BAD_TS]
    edge = _write(tmp_path, "edge.csv", f"u,i,t\n1,2,{I.MAX_TS_SECONDS}\n1,3,{I.MAX_TS_SECONDS + 1}\n"
                                        f"1,4,{I.MIN_TS_SECONDS}\n1,5,{I.MIN_TS_SECONDS - 1}\n")
    _, good, bad = _run(spark, IngestConfig(format="csv", path=edge, ts_unit="s", columns=cols))
    assert [g[1] for g in good] == [2, 4] and sorted((b[0], b[2]) for b in bad) == [(I.BAD_TS, "3"), (I.BAD_TS, "5")]


def test_parquet_with_nanosecond_timestamps_names_the_column_and_the_ways_out(spark, tmp_path):
    # pandas writes datetime64[ns] as TIMESTAMP(NANOS), which Spark refuses: before, its
    # AnalysisException came through as a bug's traceback
    import pandas as pd

    path = str(tmp_path / "ns")
    (tmp_path / "ns").mkdir()
    pd.DataFrame({"user_id": [1, 1], "item_id": [5, 6],
                  "ts": pd.to_datetime(["2024-01-01 00:00:00.000000400", "2024-01-01 00:00:01.000000000"])}
                 ).to_parquet(f"{path}/part-0.parquet")
    with pytest.raises(SourceSchemaError, match=r"nanoseconds \(column 'ts'; pandas writes them by default\).*"
                                                r"coerce_timestamps='us'.*nanosAsLong=true --set ingest.ts_unit=ns"):
        read_source(spark, IngestConfig(format="parquet", path=path), "")
    # the second way out, as the message gives it: ns as integers, floored to seconds
    spark.conf.set("spark.sql.legacy.parquet.nanosAsLong", "true")
    try:
        _, good, bad = _run(spark, IngestConfig(format="parquet", path=path, ts_unit="ns"))
    finally:
        spark.conf.unset("spark.sql.legacy.parquet.nanosAsLong")
    assert good == [(1, 5, 1704067200, None, None), (1, 6, 1704067201, None, None)] and bad == []
    # a nanosecond column that is not ts fails the read too; ts_unit=ns would read ts (seconds) wrong
    other = str(tmp_path / "other")
    (tmp_path / "other").mkdir()
    pd.DataFrame({"user_id": [1], "item_id": [5], "ts": [1700000000],
                  "created": pd.to_datetime(["2024-01-01"])}).to_parquet(f"{other}/part-0.parquet")
    cfg = IngestConfig(format="parquet", path=other, allow_extra_columns=True)
    with pytest.raises(SourceSchemaError, match=r"\(column 'created';.*as 'ts' \(ts\) is not one of them, read them as "
                                                r"integers with --set spark.conf.spark.sql.legacy.parquet.nanosAsLong=true "
                                                r"\(ts is read as ingest.ts_unit says\)") as e:
        read_source(spark, cfg, "")
    assert "ts_unit=ns" not in str(e.value)
    spark.conf.set("spark.sql.legacy.parquet.nanosAsLong", "true")
    try:
        _, good, _ = _run(spark, cfg)
    finally:
        spark.conf.unset("spark.sql.legacy.parquet.nanosAsLong")
    assert good == [(1, 5, 1700000000, None, None)]


def test_string_timestamps_are_read_as_utc_in_any_session_zone(spark, tmp_path):
    # before: parsed in spark.sql.session.timeZone, so a notebook in New York got other ts (and
    # other out-of-window rejections) than the laptop run; a pattern with its own zone keeps it
    st = _write(tmp_path, "st.csv", "u,i,t\n1,2,2024-03-10 02:30:00\n1,3,2024-03-10 12:00:00\n")
    zoned = _write(tmp_path, "z.csv", "u,i,t\n1,2,2024-03-10T12:00:00+01:00\n")
    cols = {"user_id": "u", "item_id": "i", "ts": "t"}
    zone = spark.conf.get("spark.sql.session.timeZone")
    spark.conf.set("spark.sql.session.timeZone", "America/New_York")  # 02:30 that day does not exist there
    try:
        _, good, _ = _run(spark, IngestConfig(format="csv", path=st, ts_unit="string", columns=cols))
        assert good == [(1, 2, 1710037800, None, None), (1, 3, 1710072000, None, None)]
        _, good, _ = _run(spark, IngestConfig(format="csv", path=zoned, ts_unit="string", columns=cols,
                                              ts_format="yyyy-MM-dd'T'HH:mm:ssXXX"))
        assert good == [(1, 2, 1710068400, None, None)]
    finally:
        spark.conf.set("spark.sql.session.timeZone", zone)
    assert I._has_zone("yyyy-MM-dd HH:mm:ss z") and not I._has_zone("yyyy-MM-dd'T'HH:mm:ss'Z'")


def test_blank_and_null_behaviour_are_the_same_event(spark, tmp_path):
    # before: "" and NULL were different dedupe keys, then both became NULL: two identical actions
    path = str(tmp_path / "b")
    spark.createDataFrame([(1, 5, 10, ""), (1, 5, 10, None), (1, 5, 10, " ")],
                          "user_id long, item_id long, ts long, behavior string").write.parquet(path)
    _, good, bad = _run(spark, IngestConfig(format="parquet", path=path))
    assert good == [(1, 5, 10, None, None)] and [b[0] for b in bad] == [I.DUPLICATE] * 2


def test_many_identical_garbage_lines_stay_malformed(spark, tmp_path):
    # bad rows share no dedupe partition (their keys are all null): each is kept with its own reason
    path = _write(tmp_path, "g.csv", "u,i,t\n" + "1,2,3\n" + "<html>,x,y,z\n" * 50 + ",,\n" * 3)
    _, good, bad = _run(spark, IngestConfig(format="csv", path=path, columns={"user_id": "u", "item_id": "i", "ts": "t"}))
    assert good == [(1, 2, 3, None, None)]
    assert sorted(b[0] for b in bad) == sorted([I.MALFORMED] * 50 + [I.MISSING_USER] * 3)


def test_parquet_source_with_mapping(spark, tmp_path):
    path = str(tmp_path / "p")
    spark.createDataFrame([(1, 5, 10), (2, 6, 11)], "visitor long, sku long, epoch long").write.parquet(path)
    _, good, _ = _run(spark, IngestConfig(format="parquet", path=path,
                                          columns={"user_id": "visitor", "item_id": "sku", "ts": "epoch"}))
    assert good == [(1, 5, 10, None, None), (2, 6, 11, None, None)]


TAOBAO = """1,100,7,pv,1511658000
1,101,7,cart,1511658060
1,101,7,cart,1511658060
2,102,8,teleport,1511658000
,103,8,pv,1511658000
3,104,9,pv,1000
3,105,9,pv,soon
"""


def test_taobao_format_with_rejects(spark, tmp_path):
    path = _write(tmp_path, "ub.csv", TAOBAO)
    _, good, bad = _run(spark, IngestConfig(format="taobao", path=path, min_ts=1511539200, max_ts=1512316799))
    assert good == [(1, 100, 1511658000, "pv", 7), (1, 101, 1511658060, "cart", 7)]
    assert sorted(b[0] for b in bad) == sorted([I.DUPLICATE, I.BAD_BEHAVIOR, I.MISSING_USER, I.TS_OUT_OF_RANGE,
                                                I.BAD_TS])


def test_taobao_wrong_column_count(spark, tmp_path):
    path = _write(tmp_path, "ub.csv", "1,100,7,pv\n")
    with pytest.raises(SourceSchemaError, match="the 5 fields of Taobao UserBehavior.*first line has 4"):
        read_source(spark, IngestConfig(format="taobao", path=path), "")


def test_a_bad_first_line_is_a_rejected_row_and_most_bad_lines_name_the_file(spark, tmp_path):
    # one truncated line is a bad row wherever it is in the file, first line included; a file whose
    # lines mostly have another count is a wrong format, and the error names that file of the folder
    folder = tmp_path / "ub 2024"  # a space: Spark's file paths are URIs, %20 there
    folder.mkdir()
    (folder / "a.csv").write_text("1,100,7,pv\n1,100,7,pv,1511658000\n2,101,7,buy,1511658060\n")
    _, good, bad = _run(spark, IngestConfig(format="taobao", path=str(folder)))
    assert [g[:2] for g in good] == [(1, 100), (2, 101)]
    assert [(b[0], b[-1]) for b in bad] == [(I.MALFORMED, "1,100,7,pv")]
    (folder / "b.csv").write_text("".join(f"{u},100,7,pv\n" for u in range(30)))
    with pytest.raises(SourceSchemaError, match=r"ub 2024/b\.csv: 31 of the first 33 lines.*first line has 4 fields"):
        read_source(spark, IngestConfig(format="taobao", path=str(folder)), "")


def test_a_line_of_thousands_of_fields_is_a_malformed_row(spark, tmp_path):
    # Spark's CSV parser stops the whole read at a line of more than 20,480 fields (its maxColumns)
    garbage = "," * 30_000
    path = _write(tmp_path, "log.csv", f"u,i,t\n1,2,3\n{garbage}\n4,5,6\n")
    _, good, bad = _run(spark, IngestConfig(format="csv", path=path, columns={"user_id": "u", "item_id": "i", "ts": "t"}))
    assert [g[:3] for g in good] == [(1, 2, 3), (4, 5, 6)]
    assert [(b[0], b[-1]) for b in bad] == [(I.MALFORMED, garbage)]


MOVIES = "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Café (1996)::Comedy\n3::Heat (1995)::Action|Crime|Thriller\n"


def test_ml1m_original_format(spark, tmp_path):
    d = tmp_path / "ml"
    d.mkdir()
    _write(d, "ratings.dat", "1::1::5::978300760\n1::2::3::978300761\n2::3::4::978300000\n2::x::4::1\n")
    _write(d, "movies.dat", MOVIES, encoding="latin-1")
    _write(d, "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
    src, good, bad = _run(spark, IngestConfig(format="ml1m", path=str(d)))
    assert good == [(1, 1, 978300760, "5", 3), (1, 2, 978300761, "3", 5), (2, 3, 978300000, "4", 1)]
    assert [b[0] for b in bad] == [I.BAD_ITEM]
    titles = {r.item_id: (r.title, r.category_name) for r in src.items.collect()}
    assert titles[2] == ("Café (1996)", "Comedy")  # Latin-1 decoded
    users = {r.user_id: r.features for r in src.users.collect()}
    assert users[2]["age"] == "56" and users[1]["gender"] == "F"
    # a users file the key names must be there: before, a misspelt path was read as no users, and DAT
    # trained without its user features after one INFO line
    from ml.errors import MissingInput

    gone = str(tmp_path / "nope" / "users.dat")
    with pytest.raises(MissingInput, match=f"ingest.ml1m_users='{re.escape(gone)}': nothing there"):
        read_source(spark, IngestConfig(format="ml1m", path=str(d), ml1m_users=gone), "unused")
    (d / "users.dat").unlink()  # none beside ratings.dat, and no key: no features, with a warning
    assert read_source(spark, IngestConfig(format="ml1m", path=str(d)), "unused").users is None


def test_primary_genre_is_the_rarest(spark):
    movies = spark.createDataFrame(
        [(1, "a", ["Comedy", "Animation"]), (2, "b", ["Comedy"]), (3, "c", ["Comedy", "Drama"]),
         (4, "d", ["Drama"]), (5, "e", ["Animation", "Comedy"])], "item_id long, title string, genres array<string>")
    got = {r.item_id: r.category_name for r in items_from_movies(spark, movies).collect()}
    # Comedy x4, Animation x2, Drama x2: Animation vs Drama tie -> earlier in ML-1M's genre list
    assert got == {1: "Animation", 2: "Comedy", 3: "Drama", 4: "Drama", 5: "Animation"}


def test_a_genre_outside_ml1ms_list_is_left_out_of_the_category(spark, caplog):
    movies = spark.createDataFrame(
        [(1, "a", ["Action", "Adventure", "IMAX"]), (2, "b", ["IMAX"]), (3, "c", ["Adventure"])],
        "item_id long, title string, genres array<string>")
    with caplog.at_level("WARNING", logger="ml.data.formats"):
        got = {r.item_id: (r.category_id, r.category_name) for r in items_from_movies(spark, movies).collect()}
    # the rarest genre with an id: IMAX (2 films) would be rarer than Adventure but has none
    assert got == {1: (1, "Action"), 2: (None, None), 3: (2, "Adventure")}
    assert "'IMAX' (2)" in caplog.text


def test_sasrec_format_keeps_ids_and_order(spark, tmp_path):
    d = tmp_path / "sas"
    d.mkdir()
    _write(d, "train_input.txt", "3 1 2\n2 2\n5 4 1 3\n")
    _write(d, "sas_to_original_items.txt", "1 1\n2 2\n3 3\n4 1\n5 2\n")
    _write(d, "movies.dat", MOVIES, encoding="latin-1")
    src, good, bad = _run(spark, IngestConfig(format="sasrec", path=str(d / "train_input.txt")))
    assert bad == []  # user 2 saw item 2 twice, at positions 0 and 1: two events, not duplicates
    assert good == sorted([(1, 3, 0, None, 1), (1, 1, 1, None, 3), (1, 2, 2, None, 5),
                           (2, 2, 0, None, 5), (2, 2, 1, None, 5),
                           (3, 5, 0, None, 5), (3, 4, 1, None, 3), (3, 1, 2, None, 3), (3, 3, 3, None, 1)])
    assert src.items.count() == 5
    from ml.errors import MissingInput

    for key in ("sasrec_item_map", "sasrec_movies", "ml1m_users"):  # named, so it must be there
        with pytest.raises(MissingInput, match=f"ingest.{key}='/nope/x': nothing there"):
            read_source(spark, IngestConfig(format="sasrec", path=str(d / "train_input.txt"), **{key: "/nope/x"}),
                        "unused")
    _write(d, "train_input.txt", "")  # no line: no action (the ingest job then stops, keeping its tables)
    assert _run(spark, IngestConfig(format="sasrec", path=str(d / "train_input.txt")))[1:] == ([], [])


def test_a_sasrec_path_of_several_files_is_refused(spark, tmp_path):
    # lines of several files (a folder, a glob) have no order: user ids would follow the listing's
    from ml.errors import InvalidInput

    parts = tmp_path / "parts"
    parts.mkdir()
    _write(parts, "a.txt", "3 1 2\n")
    _write(parts, "b.txt", "2 2\n")
    for path in (parts, parts / "*.txt"):
        with pytest.raises(InvalidInput, match=r"2 files .*user ids are line numbers of one file"):
            read_source(spark, IngestConfig(format="sasrec", path=str(path)), "unused")


def test_items_from_actions_takes_most_frequent_category(spark):
    acts = spark.createDataFrame([(1, 10, 1, None, 5, None), (2, 10, 2, None, 6, None), (3, 10, 3, None, 6, None),
                                  (1, 11, 4, None, 9, None), (2, 11, 5, None, 8, None), (3, 12, 6, None, None, None)],
                                 S.ACTIONS)
    got = {r.item_id: r.category_id for r in I.items_from_actions(acts).collect()}
    assert got == {10: 6, 11: 8, 12: None}


def test_parquet_column_types_ingest_cannot_read_are_a_schema_error_naming_the_column(spark, tmp_path):
    # before: float ids passed and every row became a rejected bad_user_id, the job exiting 0
    path = str(tmp_path / "floats")
    spark.createDataFrame([(1.0, 5, 10)], "user_id double, item_id long, ts long").write.parquet(path)
    with pytest.raises(SourceSchemaError, match=r"column 'user_id' \(user_id\) is double; expected an integer"):
        read_source(spark, IngestConfig(format="parquet", path=path), "")
    # a renamed column: the message shows what the source has and how to map it
    path = str(tmp_path / "renamed")
    spark.createDataFrame([(1, 5, 10)], "userId long, item_id long, ts long").write.parquet(path)
    with pytest.raises(SourceSchemaError, match=r"'user_id'; source has \['userId', 'item_id', 'ts'\].*"
                                                r"ingest.columns.user_id="):
        read_source(spark, IngestConfig(format="parquet", path=path), "")


def test_whole_numbers_written_as_floats_are_ids(spark, tmp_path):
    # pandas writes an integer column holding a missing value as floats: "4.0" in a CSV, a double in
    # Parquet. A whole number is still exact there and reads as the id; 4.5 is no id, nor is a double
    # at or beyond 2^53 (not every integer there is a double) or NaN: rejected, never truncated.
    path = _write(tmp_path, "floats.csv", "uid,iid,when,cat\n1.0,10,100,4.0\n2,11.,101,+4.00\n3,12,102,4.5\n"
                                          "4,13,103,\n\t5,14,104.0,4.0e0\n")
    cols = {"user_id": "uid", "item_id": "iid", "ts": "when", "category_id": "cat"}
    _, good, bad = _run(spark, IngestConfig(format="csv", path=path, columns=cols))
    assert good == [(1, 10, 100, None, 4), (2, 11, 101, None, 4), (4, 13, 103, None, None)]
    # a tab before an id is white space, as a cast reads it; an exponent is not a whole number's text
    assert sorted((r[0], r[1]) for r in bad) == sorted([(I.BAD_CATEGORY, "3"), (I.BAD_CATEGORY, "\t5")])
    path = str(tmp_path / "floats")
    spark.createDataFrame([(1, 10, 100, 4.0), (2, 11, 101, None), (3, 12, 102, 4.5), (4, 13, 103, 2.0 ** 53),
                           (5, 14, 104, float("nan")), (6, 15, 105, -3.0)],
                          "user_id long, item_id long, ts long, category_id double").write.parquet(path)
    _, good, bad = _run(spark, IngestConfig(format="parquet", path=path))
    assert good == [(1, 10, 100, None, 4), (2, 11, 101, None, None), (6, 15, 105, None, -3)]
    assert sorted((r[0], r[1]) for r in bad) == [(I.BAD_CATEGORY, u) for u in ("3", "4", "5")]
    # a float (32-bit) is exact to 2^24 only: 16,777,217 cannot be in the column, and the 16,777,216
    # beside it is beyond the bound, so it is rejected rather than read as another category
    path32 = str(tmp_path / "floats32")
    spark.createDataFrame([(1, 10, 100, 7.0), (2, 11, 101, 16777216.0)],
                          "user_id long, item_id long, ts long, category_id float").write.parquet(path32)
    _, good, bad = _run(spark, IngestConfig(format="parquet", path=path32))
    assert good == [(1, 10, 100, None, 7)] and [(r[0], r[1]) for r in bad] == [(I.BAD_CATEGORY, "2")]
    # hashed keys: 4.5 would be a category's key, so a float column is still the schema error
    with pytest.raises(SourceSchemaError, match=r"column 'category_id' \(category_id\) is double"):
        read_source(spark, IngestConfig(format="parquet", path=path, string_ids=True), "")


def test_parquet_timestamp_and_string_id_columns(spark, tmp_path):
    # a TIMESTAMP ts (the usual type in a lakehouse) is read as epoch seconds, whatever ts_unit says;
    # two events 400 ms apart are two events; TIMESTAMP_NTZ and DATE read as UTC in any session zone
    path = str(tmp_path / "ts")
    spark.sql("SELECT '7' AS user_id, CAST(5 AS INT) AS item_id, TIMESTAMP '2020-01-01 00:00:10 UTC' AS ts, "
              "TIMESTAMP_NTZ '2020-07-01 00:00:10' AS ntz, DATE '2020-01-02' AS day UNION ALL "
              "SELECT '7', 5, TIMESTAMP '2020-01-01 00:00:10.400 UTC', TIMESTAMP_NTZ '2020-07-01 00:00:10.400', "
              "DATE '2020-01-02'").write.parquet(path)
    zone = spark.conf.get("spark.sql.session.timeZone")
    spark.conf.set("spark.sql.session.timeZone", "America/New_York")
    try:
        for column, secs in (("ts", 1577836810), ("ntz", 1593561610)):
            _, good, bad = _run(spark, IngestConfig(format="parquet", path=path, ts_unit="s", allow_extra_columns=True,
                                                    columns={"user_id": "user_id", "item_id": "item_id", "ts": column}))
            assert good == [(7, 5, secs, None, None)] * 2 and bad == [], column
        _, good, bad = _run(spark, IngestConfig(format="parquet", path=path, allow_extra_columns=True,
                                                columns={"user_id": "user_id", "item_id": "item_id", "ts": "day"}))
        assert good == [(7, 5, 1577923200, None, None)] and [b[0] for b in bad] == [I.DUPLICATE]
    finally:
        spark.conf.set("spark.sql.session.timeZone", zone)


def test_a_source_with_no_valid_action_fails_and_keeps_the_previous_actions(spark, tmp_path):
    # before: 0 actions were committed, and sequences, graph and top-K ran on nothing until evaluate
    # failed with "run its topk stage first"
    from jobs import ingest as ingest_job
    from ml.config import load_config
    from ml.data import io

    wh = str(tmp_path / "wh")
    cols = ["ingest.format=csv", "ingest.columns={user_id: u, item_id: i, ts: t}", f"warehouse={wh}"]
    good = _write(tmp_path, "good.csv", "u,i,t\n1,2,3\n1,4,5\n")
    ingest_job.run(load_config(None, [*cols, f"ingest.path={good}"]), spark)
    version = io.table_version(f"{wh}/actions")
    bad = _write(tmp_path, "bad.csv", "u,i,t\nx,2,3\n1,,5\n")
    with pytest.raises(ingest_job.NoActionsError, match=r"none of the 2 rows of .*bad.csv.*"
                                                        r"'bad_user_id': 1, 'missing_item_id': 1") as e:
        ingest_job.run(load_config(None, [*cols, f"ingest.path={bad}"]), spark)
    assert "string_ids" not in str(e.value)  # a missing item is not a text key
    assert io.table_version(f"{wh}/actions") == version and io.read_table(spark, f"{wh}/actions").count() == 2
    rejected = io.read_table(spark, f"{wh}/actions_rejected")  # the bad rows are kept, with their reasons
    assert sorted(r[S.REASON] for r in rejected.collect()) == [I.BAD_USER, I.MISSING_ITEM]
    empty = _write(tmp_path, "empty.csv", "u,i,t\n")
    with pytest.raises(ingest_job.NoActionsError, match=r"empty.csv \(csv\) has no rows"):
        ingest_job.run(load_config(None, [*cols, f"ingest.path={empty}"]), spark)
    assert io.table_version(f"{wh}/actions") == version
    # text categories (or ids) in every row: the error names the key that reads them
    text = _write(tmp_path, "text.csv", "u,i,t,c\n1,2,3,Shoes\n1,4,5,Toys > Lego\n")
    with pytest.raises(ingest_job.NoActionsError, match=r"'bad_category_id': 2\}.*unless ingest.string_ids=true"):
        ingest_job.run(load_config(None, ["ingest.format=csv", f"warehouse={wh}", f"ingest.path={text}",
                                          "ingest.columns={user_id: u, item_id: i, ts: t, category_id: c}"]), spark)
    # every row outside a filter of the config: the error names the filter's key and value
    clicks = _write(tmp_path, "clicks.csv", "u,i,t,b\n1,2,3,click\n1,4,5,click\n")
    with pytest.raises(ingest_job.NoActionsError, match=r"'unknown_behavior': 2\}.*not in ingest.behaviors=\['pv', "
                                                        r"'buy'\].*ingest.behaviors=null"):
        ingest_job.run(load_config(None, [*cols[:1], f"warehouse={wh}", f"ingest.path={clicks}",
                                          "ingest.columns={user_id: u, item_id: i, ts: t, behavior: b}",
                                          "ingest.behaviors=[pv, buy]"]), spark)
    with pytest.raises(ingest_job.NoActionsError, match=r"'ts_out_of_range': 2\}.*outside ingest.min_ts=1000 \.\. "
                                                        r"ingest.max_ts=None \(seconds"):
        ingest_job.run(load_config(None, [*cols, f"ingest.path={good}", "ingest.min_ts=1000"]), spark)
    assert io.table_version(f"{wh}/actions") == version


def test_a_file_with_another_separator_gets_the_key_that_reads_it(spark, tmp_path):
    # read with the default ',' the header is one column: the error says which key splits it
    path = _write(tmp_path, "semi.csv", "user_id;item_id;ts\n1;2;3\n")
    with pytest.raises(SourceSchemaError, match=r"holding ';': if that separates the fields, --set 'ingest.csv_sep=;'"):
        _run(spark, IngestConfig(format="csv", path=path))
    assert _run(spark, IngestConfig(format="csv", path=path, csv_sep=";"))[1] == [(1, 2, 3, None, None)]


def test_csv_header_with_the_canonical_names_needs_no_mapping_and_an_empty_file_says_so(spark, tmp_path):
    path = _write(tmp_path, "canon.csv", "user_id,item_id,ts\n1,2,3\n")
    _, good, _ = _run(spark, IngestConfig(format="csv", path=path))
    assert good == [(1, 2, 3, None, None)]
    empty = _write(tmp_path, "empty.csv", "")
    with pytest.raises(SourceSchemaError, match="the file is empty"):
        read_source(spark, IngestConfig(format="csv", path=empty), "")
    # without a header, csv_schema naming the canonical fields needs no mapping either
    bare = _write(tmp_path, "bare.csv", "1,2,3\n")
    _, good, _ = _run(spark, IngestConfig(format="csv", path=bare, csv_header=False,
                                          csv_schema=["user_id", "item_id", "ts"]))
    assert good == [(1, 2, 3, None, None)]
    # one renamed column mapped: the others keep their names (before, the mapping had to name every
    # field, and with allow_extra_columns the category and behaviour were dropped without a word)
    part = _write(tmp_path, "part.csv", "user_id,product,category_id,behavior,ts\n1,2,7,pv,3\n")
    _, good, _ = _run(spark, IngestConfig(format="csv", path=part, columns={"item_id": "product"}))
    assert good == [(1, 2, 3, "pv", 7)]
    # a column the mapping reads as another field is not also its namesake's
    swap = _write(tmp_path, "swap.csv", "user_id,item_id,ts,sku\n1,2,3,9\n")
    _, good, _ = _run(spark, IngestConfig(format="csv", path=swap, columns={"item_id": "sku", "category_id": "item_id"}))
    assert good == [(1, 9, 3, None, 2)]


@pytest.mark.parametrize("fmt", ["csv", "taobao", "parquet", "delta", "ml1m", "sasrec"])
def test_a_missing_source_path_is_one_error_naming_it(spark, tmp_path, fmt):
    from ml.errors import MissingInput

    gone = str(tmp_path / "nonexistent")
    with pytest.raises(MissingInput, match=rf"ingest.path='{gone}': nothing there \(ingest.format={fmt}\)"):
        read_source(spark, IngestConfig(format=fmt, path=gone), "unused")


def test_globs_and_hadoop_style_local_uris_still_read(spark, tmp_path):
    # Spark resolves these itself (a driver-side os.path check refused them)
    _write(tmp_path, "a.csv", "user_id,item_id,ts\n1,2,3\n")
    for path in (str(tmp_path / "*.csv"), f"file:{tmp_path}/a.csv"):
        _, good, _ = _run(spark, IngestConfig(format="csv", path=path))
        assert good == [(1, 2, 3, None, None)]


def test_a_film_listed_twice_is_one_items_row_and_no_rating_is_doubled(spark, tmp_path, caplog):
    # before: movies.dat listing film 2 twice gave two items rows, the join onto them doubled every
    # rating of film 2, and dedupe rejected the copies as duplicates of rows the source never had
    d = tmp_path / "ml"
    d.mkdir()
    _write(d, "ratings.dat", "1::1::5::978300760\n1::2::3::978300761\n2::2::4::978300000\n2::3::4::978300001\n")
    _write(d, "movies.dat", MOVIES + "2::Café, again (1996)::Drama\n", encoding="latin-1")
    with caplog.at_level("WARNING", logger="ml.data.formats"):
        src, good, bad = _run(spark, IngestConfig(format="ml1m", path=str(d)))
    assert bad == [] and len(good) == 4
    items = {r.item_id: (r.title, r.category_name) for r in src.items.collect()}
    assert src.items.count() == len(items) == 3
    assert items[2] == ("Café (1996)", "Comedy")  # the smaller line, whatever order the lines are read in
    assert "movies.dat: 0 lines left out" in caplog.text and "1 lines for ids already listed" in caplog.text
    # the losing line is kept, with its file and reason
    assert [tuple(r) for r in src.rejected.collect()] == [(str(d / "movies.dat"), "2::Café, again (1996)::Drama",
                                                            "duplicate_id")]


def test_a_sas_id_mapped_twice_is_one_items_row(spark, tmp_path):
    d = tmp_path / "sas"
    d.mkdir()
    _write(d, "train_input.txt", "1 2\n2 1\n")
    _write(d, "sas_to_original_items.txt", "1 3\n2 2\n1 1\n")  # sas id 1 -> films 3 and 1: film 1 kept
    _write(d, "movies.dat", MOVIES, encoding="latin-1")
    src, good, bad = _run(spark, IngestConfig(format="sasrec", path=str(d / "train_input.txt")))
    assert bad == [] and good == [(1, 1, 0, None, 3), (1, 2, 1, None, 5), (2, 1, 1, None, 3), (2, 2, 0, None, 5)]
    assert sorted((r.item_id, r.title) for r in src.items.collect()) == [(1, "Toy Story (1995)"), (2, "Café (1996)")]


@pytest.mark.parametrize("ansi", ["true", "false"])
def test_unreadable_companion_lines_are_counted_and_left_out_whatever_ansi(spark, tmp_path, caplog, ansi):
    # before: a header line made the plain cast fail the job under ANSI (Spark 4's default), and
    # vanish unseen without it
    d = tmp_path / "ml"
    d.mkdir()
    _write(d, "ratings.dat", "1::1::5::978300760\n2::3::4::978300000\n")
    _write(d, "movies.dat", "movieId::title::genres\n" + MOVIES + "4::Two fields only\n", encoding="latin-1")
    _write(d, "users.dat", "UserID::Gender::Age::Occupation::Zip\n1::F::1::10::48067\n2::M::56::16::70072\n")
    sas = tmp_path / "sas"
    sas.mkdir()
    _write(sas, "train_input.txt", "1 2\n")
    _write(sas, "sas_to_original_items.txt", "sas orig\n1 1\n2 x\n")
    _write(sas, "movies.dat", MOVIES, encoding="latin-1")
    previous = spark.conf.get("spark.sql.ansi.enabled")
    spark.conf.set("spark.sql.ansi.enabled", ansi)
    try:
        with caplog.at_level("WARNING", logger="ml.data.formats"):
            src, good, bad = _run(spark, IngestConfig(format="ml1m", path=str(d)))
            sas_src, sas_good, _ = _run(spark, IngestConfig(format="sasrec", path=str(sas / "train_input.txt")))
        assert good == [(1, 1, 978300760, "5", 3), (2, 3, 978300000, "4", 1)] and bad == []
        assert sorted(r.item_id for r in src.items.collect()) == [1, 2, 3]
        assert sorted(r.user_id for r in src.users.collect()) == [1, 2]
        assert sas_good == [(1, 1, 0, None, 3), (1, 2, 1, None, None)]  # sas id 2 has no usable map line
        assert [r.item_id for r in sas_src.items.collect()] == [1]
    finally:
        spark.conf.set("spark.sql.ansi.enabled", previous)
    assert "movies.dat: 2 lines left out" in caplog.text and "users.dat: 1 lines left out" in caplog.text
    assert "sas_to_original_items.txt: 2 lines left out" in caplog.text
    # every line left out is kept: the file, the line as read, the reason
    rows = sorted((os.path.basename(r.file), r.line, r.reason) for r in src.rejected.unionByName(sas_src.rejected).collect())
    assert rows == [("movies.dat", "4::Two fields only", "malformed_line"),
                    ("movies.dat", "movieId::title::genres", "malformed_line"),
                    ("sas_to_original_items.txt", "2 x", "malformed_line"),
                    ("sas_to_original_items.txt", "sas orig", "malformed_line"),
                    ("users.dat", "UserID::Gender::Age::Occupation::Zip", "malformed_line")]


def test_a_companion_file_without_a_usable_line_is_an_error_naming_it(spark, tmp_path):
    d = tmp_path / "ml"
    d.mkdir()
    _write(d, "ratings.dat", "1::1::5::978300760\n")
    _write(d, "movies.dat", "1,Toy Story (1995),Animation\n2,Heat (1995),Action\n")  # commas, not ::
    with pytest.raises(SourceSchemaError, match=r"movies.dat: none of its 2 lines has the expected fields"):
        read_source(spark, IngestConfig(format="ml1m", path=str(d)), "")


def test_a_blank_behaviour_is_rejected_where_the_behaviours_are_set(spark, tmp_path):
    # before: a Taobao line with an empty behaviour was a good action with behavior NULL
    path = _write(tmp_path, "ub.csv", "1,10,5,pv,1511600000\n1,11,5,,1511600001\n1,12,5, ,1511600002\n")
    _, good, bad = _run(spark, IngestConfig(format="taobao", path=path))
    assert good == [(1, 10, 1511600000, "pv", 5)]
    assert [b[0] for b in bad] == [I.MISSING_BEHAVIOR] * 2
    csv = _write(tmp_path, "log.csv", "user_id,item_id,ts,behavior\n1,10,1,click\n1,11,2,\n")
    _, good, bad = _run(spark, IngestConfig(format="csv", path=csv, behaviors=["click"]))
    assert [g[1] for g in good] == [10] and [b[0] for b in bad] == [I.MISSING_BEHAVIOR]
    _, good, bad = _run(spark, IngestConfig(format="csv", path=csv))  # no allowed list: blank is kept as null
    assert [g[3] for g in good] == ["click", None] and bad == []


@pytest.mark.parametrize("fmt", ["YYYY-MM-dd HH:mm:ss", "EEE MMM dd HH:mm:ss yyyy", "'x"])
def test_a_ts_format_spark_cannot_parse_with_is_a_config_error_naming_the_key(spark, tmp_path, fmt):
    # before: Spark's own exception from inside the query, a traceback that named no key
    from ml.config import ConfigError

    path = _write(tmp_path, "log.csv", "user_id,item_id,ts\n1,10,2020-01-01 00:00:00\n")
    with pytest.raises(ConfigError, match=r"ingest.ts_format="):
        _run(spark, IngestConfig(format="csv", path=path, ts_unit="string", ts_format=fmt))


def test_every_ts_unreadable_says_to_check_ts_unit_and_ts_format(spark, tmp_path, caplog):
    from jobs import ingest as ingest_job
    from ml.config import load_config

    # a stray line of another shape does not hide the hint (it needed every row to be bad_ts)
    path = _write(tmp_path, "log.csv", "u,i,t\n1,2,2020-01-01 10:00:00\n1,3,2020-01-01 11:00:00\n1,2\n")
    cfg = load_config(None, ["ingest.format=csv", "ingest.columns={user_id: u, item_id: i, ts: t}",
                             f"warehouse={tmp_path / 'wh'}", f"ingest.path={path}", "ingest.ts_unit=string",
                             "ingest.ts_format=yyyy-MM-dd hh:mm:ss a"])  # AM/PM the data does not have
    with pytest.raises(ingest_job.NoActionsError, match=r"'bad_ts': 2.*check ingest.ts_unit / ingest.ts_format "
                                                        r"\(ingest.ts_unit=string, ingest.ts_format='yyyy-MM-dd hh"):
        ingest_job.run(cfg, spark)
    # most rows unreadable but one: the job runs on that one, and says what to check
    path = _write(tmp_path, "most.csv", "u,i,t\n1,2,2020-01-01 10:00:00\n1,3,2020-01-01 11:00:00\n1,4,1700000000\n")
    cfg = load_config(None, ["ingest.format=csv", "ingest.columns={user_id: u, item_id: i, ts: t}",
                             f"warehouse={tmp_path / 'wh'}", f"ingest.path={path}"])
    with caplog.at_level("WARNING", logger="jobs.ingest"):
        assert ingest_job.run(cfg, spark)["actions"] == 1
    assert "most input rows were rejected; no ts could be read: check ingest.ts_unit" in caplog.text
    # seconds read as ms land in January 1970: said, not silently used
    path = _write(tmp_path, "secs.csv", "u,i,t\n1,2,1700000000\n1,3,1700000100\n")
    cfg = load_config(None, ["ingest.format=csv", "ingest.columns={user_id: u, item_id: i, ts: t}", "ingest.ts_unit=ms",
                             f"warehouse={tmp_path / 'wh'}", f"ingest.path={path}"])
    caplog.clear()
    with caplog.at_level("WARNING", logger="jobs.ingest"):
        ingest_job.run(cfg, spark)
    assert "every ts is before 1973 (the latest: 1700000 s since the epoch) with ingest.ts_unit=ms" in caplog.text


def test_the_ingest_log_counts_users_and_items_without_an_exact_distinct(spark, tmp_path, monkeypatch):
    # an exact distinct count of billions of actions is a full shuffle (two, with an Expand doubling
    # every row) only for a log line
    from jobs import ingest as ingest_job
    from ml.config import load_config

    def refuse(*_a, **_k):
        raise AssertionError("exact distinct count")

    monkeypatch.setattr(F, "countDistinct", refuse)
    monkeypatch.setattr(F, "count_distinct", refuse)
    path = _write(tmp_path, "log.csv", "user_id,item_id,ts\n1,10,1\n1,11,2\n2,10,3\n3,12,4\n")
    out = ingest_job.run(load_config(None, ["ingest.format=csv", f"warehouse={tmp_path / 'wh'}",
                                            f"ingest.path={path}"]), spark)
    assert (out["actions"], out["users"], out["items"]) == (4, 3, 3)  # approximate, exact at this size


def test_seconds_from_finer_units_are_floored_exactly(spark):
    # the double quotient corrected in BIGINT arithmetic, against Python's exact // on random times
    # of years 1 to 9999 in each unit, the boundaries of a second, and values no time is
    import random

    rng = random.Random(7)
    for unit, n in (("ms", 1_000), ("us", 1_000_000), ("ns", 1_000_000_000)):
        lo, hi = max(I.MIN_TS_SECONDS * n, -2**63), min(I.MAX_TS_SECONDS * n + n - 1, 2**63 - 1)
        values = [rng.randint(lo, hi) for _ in range(2000)] + [s * n + d for s in (-1, 0, 1, 1_500_000_000)
                                                               for d in (-1, 0, 1, n - 1)]
        values += [2**63 - 1, -2**63, hi, lo]
        got = spark.createDataFrame([(str(v),) for v in values], "ts string").select(
            I._to_seconds(unit, "").alias("s")).collect()
        want = [v // n if I.MIN_TS_SECONDS <= v // n <= I.MAX_TS_SECONDS else None for v in values]
        for v, w, r in zip(values, want, got):
            edge = min(v + 2**63, 2**63 - 1 - v) < n  # within a second of BIGINT's ends: null is documented
            assert r.s == w or (edge and r.s is None), (unit, v, w, r.s)


def test_category_names_of_the_ids_asked_for(spark):
    from ml.data.ingest import category_names

    items = spark.createDataFrame([(1, -7, "Shoes"), (2, -7, "Shoes"), (3, 5, "Toys"), (4, 5, "toys"), (5, 9, None),
                                   (6, None, None), (7, 11, "Books")], "item_id long, category_id long, category_name string")
    assert category_names(items, [-7, 5, 9, None, 42]) == {-7: "Shoes", 5: "Toys"}  # the smallest of two names
    assert category_names(items, []) == {}


def test_a_file_unlike_the_others_is_one_line_naming_it(spark, tmp_path, capsys):
    # Spark reads a folder with the first file's schema and fails on the one that differs, with a
    # Java stack of 140 frames; the command line now prints Spark's sentence naming the file
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs import ingest as ingest_job

    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"user_id": [1, 2], "item_id": [3, 4], "ts": [5, 6]}), folder / "a.parquet")
    pq.write_table(pa.table({"user_id": ["u1", "u2"], "item_id": [3, 4], "ts": [7, 8]}), folder / "b.parquet")
    csv = tmp_path / "csv"
    csv.mkdir()
    (csv / "a.csv").write_text("user_id,item_id,ts\n1,2,3\n")
    (csv / "b.csv").write_text("item_id,user_id,ts\n2,1,4\n")  # the same columns in another order
    unreadable = (r"error: UnreadableFile: Encountered error while reading file .*{}"
                  r".*the files of one input must have the same columns and types")
    for fmt, path, what in (("parquet", folder, unreadable.format(r"[ab].parquet. Data type mismatches when reading "
                                                                  r"Parquet column \[user_id\]")),
                            # the ingest job's own error (in run(), for notebooks too), naming both headers
                            ("csv", csv, r"error: SourceSchemaError: .*b\.csv: its header \(item_id, user_id, ts\) is "
                                         r"not the header the source was read with \(user_id, item_id, ts, the first file's\)")):
        with pytest.raises(SystemExit) as e:
            ingest_job.main(["--set", f"warehouse={tmp_path / 'wh'}", "--set", f"ingest.format={fmt}",
                             "--set", f"ingest.path={path}"])
        err = capsys.readouterr().err
        assert e.value.code == 1 and "Traceback" not in err, err[-2000:]
        line = [l for l in err.splitlines() if l.startswith("error: ")]
        assert len(line) == 1 and re.search(what, line[0]), line


def _run_keys(spark, cfg):
    src = read_source(spark, cfg, default_path="unused")
    v = I.validate_actions(src.actions, string_ids=True)
    good = sorted((r[S.USER_ID], r[S.ITEM_ID]) for r in I.good_actions(v).collect())
    bad = sorted((r[S.REASON], r[S.ITEM_ID]) for r in I.rejected_actions(v).collect())
    return good, bad, sorted((r.kind, r.key) for r in I.id_keys(v).collect())


def test_white_space_of_any_kind_around_a_key_is_not_part_of_it(spark, tmp_path):
    # Spark's trim takes spaces only: a tab-only item was a key of its own, and "b\t" another key than "b"
    path = _write(tmp_path, "log.csv", "user_id,item_id,ts\nu1,\t,1\nu1,b\t,2\nu1, b,3\n\tu2,\t \x0b,4\n"
                                       "u1,\u00a0b\u3000,5\nu1,\u00a0,6\nu1,b c,7\n")
    good, bad, keys = _run_keys(spark, IngestConfig(format="csv", path=path, string_ids=True))
    assert bad == [(I.MISSING_ITEM, "\t"), (I.MISSING_ITEM, "\t \x0b"), (I.MISSING_ITEM, "\u00a0")]
    # "b\t", " b" and no-break / ideographic spaces around b are one key; "b c" keeps its inner space
    assert len(good) == 4 and len(set(good)) == 2
    assert keys == [("item", "b"), ("item", "b c"), ("user", "u1")]
    # integer ids: a tab is a missing id, not a bad one
    ints = _write(tmp_path, "ints.csv", "user_id,item_id,ts\n1,\t,1\n\t,2,2\n3,4,5\n\u00a07\u00a0,8,9\n")
    _, good, rejected = _run(spark, IngestConfig(format="csv", path=ints))
    assert [b[0] for b in rejected] == [I.MISSING_ITEM, I.MISSING_USER] and [g[:2] for g in good] == [(3, 4), (7, 8)]


def test_undecodable_bytes_make_a_bad_key_and_csv_encoding_reads_them(spark, tmp_path):
    # café and cafè in Latin-1 bytes: read as UTF-8 both are caf\ufffd, one key for two items
    path = tmp_path / "log.csv"
    path.write_bytes("user_id,item_id,ts\nu,café,1\nu,cafè,2\nu,tea,3\n".encode("latin-1"))
    good, bad, keys = _run_keys(spark, IngestConfig(format="csv", path=str(path), string_ids=True))
    assert [r for r, _ in bad] == [I.BAD_ITEM, I.BAD_ITEM] and len(good) == 1
    good, bad, keys = _run_keys(spark, IngestConfig(format="csv", path=str(path), string_ids=True,
                                                    csv_encoding="ISO-8859-1"))
    assert bad == [] and len(set(good)) == 3
    assert [k for kind, k in keys if kind == "item"] == ["cafè", "café", "tea"]
    # one Spark 4's CSV reader takes, refused before the read, naming the key (Spark's own error names none)
    for name in ("latin-9x", "rot13", "windows-1252"):
        with pytest.raises(ConfigError, match=f"ingest.csv_encoding='{name}' is not a character set Spark reads "
                                              r"CSV in; expected one of \['utf-8'.*legacy.javaCharsets=true"):
            read_source(spark, IngestConfig(format="csv", path=str(path), csv_encoding=name), "unused")


def test_a_delta_table_read_as_parquet_is_refused(spark, tmp_path, monkeypatch):
    # as Parquet, a Delta table's folder is every file any version wrote: the rows version 1 replaced
    # came back as live actions
    import pyarrow as pa
    from deltalake import write_deltalake

    path = str(tmp_path / "delta_source")
    write_deltalake(path, pa.table({"user_id": [1, 1], "item_id": [5, 6], "ts": [1700000000, 1700000001]}))
    write_deltalake(path, pa.table({"user_id": [2], "item_id": [7], "ts": [1700000002]}), mode="overwrite")
    with pytest.raises(SourceSchemaError, match=r"delta_source is a Delta table \(it has a _delta_log\); read it with "
                                                r"ingest.format=delta"):
        read_source(spark, IngestConfig(format="parquet", path=path), "")
    _, good, bad = _run(spark, IngestConfig(format="delta", path=path))
    assert good == [(2, 7, 1700000002, None, None)] and bad == []  # the current version only
    # a URI is looked up through the session's Hadoop file system (here file://, as s3a:// would be)
    from ml.data import formats

    monkeypatch.setattr(formats.files, "local_path", lambda p: None)
    assert formats._is_delta_table(spark, f"file://{path}")
    assert not formats._is_delta_table(spark, f"file://{tmp_path}")
