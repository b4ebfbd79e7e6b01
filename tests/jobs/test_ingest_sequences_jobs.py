"""The ingest and sequences jobs on a reused warehouse: no table of a previous dataset survives into
the new one, and a run that would empty the training tables stops instead."""
import pytest

from jobs import ingest, sequences
from ml import schemas as S
from ml.config import load_config
from ml.data import io
from ml.data.io import table_version


def _csv(tmp_path, behavior="pv"):
    p = tmp_path / "log.csv"
    rows = [(u, i, t) for u in (1, 2, 3) for t, i in enumerate((u, u + 1, u + 2, u + 3))]
    p.write_text("user_id,item_id,ts,behavior\n" + "".join(f"{u},{i},{t},{behavior}\n" for u, i, t in rows))
    return str(p)


def test_reingest_from_a_source_without_users_empties_the_users_and_companion_tables(spark, tmp_path):
    from ml.train.dat_task import load_user_features
    from ml.train.tables import build_vocab

    sas = tmp_path / "sas"
    sas.mkdir()
    (sas / "train.txt").write_text("1 2 3\n2 3 4\n")
    (sas / "sas_to_original_users.txt").write_text("1 10\n2 20\n")
    (sas / "users.dat").write_text("UserID::Gender::Age::Occupation::Zip\n10::F::25::3::12345\n20::M::35::7::54321\n"
                                   "20::M::45::7::\n")
    base = [f"warehouse={tmp_path / 'wh'}"]
    out = ingest.run(load_config(None, base + ["ingest.format=sasrec", f"ingest.path={sas / 'train.txt'}"]), spark)
    cfg = load_config(None, base + ["ingest.format=csv", f"ingest.path={_csv(tmp_path)}"])
    assert io.read_table(spark, cfg.table_path(S.T_USERS)).count() == 2
    # the companion lines left out are a table, like the actions rejected: the header, and user 20's later
    # line (its empty zip kept as an empty field)
    lines = sorted((r.line, r.reason) for r in io.read_table(spark, cfg.table_path(S.T_COMPANIONS_REJECTED)).collect())
    assert lines == [("20::M::45::7::", "duplicate_id"), ("UserID::Gender::Age::Occupation::Zip", "malformed_line")]
    assert out["companion_lines_rejected"] == {(str(sas / "users.dat"), "duplicate_id"): 1,
                                               (str(sas / "users.dat"), "malformed_line"): 1}
    out = ingest.run(cfg, spark)
    # the csv has no users: the sasrec source's features must not be given to the csv's users 1 and 2
    assert S.T_USERS in out["tables"] and io.read_table(spark, cfg.table_path(S.T_USERS)).count() == 0
    # nor its rejected companion lines be taken for the csv's
    assert S.T_COMPANIONS_REJECTED in out["tables"] and out["companion_lines_rejected"] == {}
    assert io.read_table(spark, cfg.table_path(S.T_COMPANIONS_REJECTED)).count() == 0
    import torch

    feats, sizes = load_user_features(cfg.table_path(S.T_USERS), build_vocab(torch.tensor([1, 2, 3]).numpy()),
                                      ["gender", "age"])
    assert sizes == () and feats.shape[1] == 0  # as for a source that never had users


def test_sequences_job_stops_instead_of_emptying_the_tables(spark, tmp_path):
    base = [f"warehouse={tmp_path / 'wh'}", "ingest.format=csv", f"ingest.path={_csv(tmp_path)}",
            "sequences.min_length=3"]
    ingest.run(load_config(None, base), spark)
    cfg = load_config(None, base)
    assert sequences.run(cfg, spark)["users"] == 3
    before = table_version(cfg.table_path(S.T_SEQUENCES)), table_version(cfg.table_path(S.T_EVAL_TARGETS))
    with pytest.raises(sequences.NoSequencesError, match=r"sequences.behaviors=\['click'\].*\['pv'\]"):
        sequences.run(load_config(None, base + ["sequences.behaviors=[click]"]), spark)
    with pytest.raises(sequences.NoSequencesError, match="sequences.min_length=5"):
        sequences.run(load_config(None, base + ["sequences.min_length=5"]), spark)
    after = table_version(cfg.table_path(S.T_SEQUENCES)), table_version(cfg.table_path(S.T_EVAL_TARGETS))
    assert after == before and io.read_table(spark, cfg.table_path(S.T_SEQUENCES)).count() == 3


def test_sequences_counts_the_users_left_out_from_its_own_aggregation(spark, tmp_path, monkeypatch):
    # before: a distinct count of every action's user, a full shuffle of the actions only for a log line
    path = _csv(tmp_path)
    with open(path, "a") as f:
        f.write("4,9,0,pv\n5,9,0,pv\n5,8,1,pv\n")
    base = [f"warehouse={tmp_path / 'wh'}", "ingest.format=csv", f"ingest.path={path}", "sequences.min_length=3"]
    ingest.run(load_config(None, base), spark)

    def refuse(*_a, **_k):
        raise AssertionError("a distinct count of the actions")

    monkeypatch.setattr(type(spark.range(1)), "distinct", refuse)  # the session's DataFrame class
    out = sequences.run(load_config(None, base), spark)
    assert (out["users"], out["excluded_users"]) == (3, 2)  # users 4 and 5 have 1 and 2 actions


def test_sequences_caps_long_users_by_default_and_counts_them(spark, tmp_path):
    # A bot or a shared anonymous id must not become one multi-GB row: the cap is on unless lifted
    from ml.config import SequencesConfig

    assert SequencesConfig().max_length == 10_000
    base = [f"warehouse={tmp_path / 'wh'}", "ingest.format=csv", f"ingest.path={_csv(tmp_path)}"]
    ingest.run(load_config(None, base), spark)
    out = sequences.run(load_config(None, base + ["sequences.max_length=2"]), spark)
    # 4 actions each: 3 training actions, of which the last 2 are kept
    assert (out["users"], out["truncated_users"], out["max_length"]) == (3, 3, 2)
    rows = io.read_table(spark, load_config(None, base).table_path(S.T_SEQUENCES)).orderBy(S.USER_ID).collect()
    assert [r[S.ITEMS] for r in rows] == [[2, 3], [3, 4], [4, 5]]
    out = sequences.run(load_config(None, base + ["sequences.max_length=null"]), spark)
    assert (out["truncated_users"], out["max_length"]) == (0, 3)
    assert sequences.run(load_config(None, base), spark)["truncated_users"] == 0


def test_string_ids_are_hashed_kept_in_id_keys_and_reach_the_sequences(spark, tmp_path):
    # SKUs and UUIDs: before, every such row was a bad_user_id / bad_item_id row
    from pyspark.sql import functions as F

    p = tmp_path / "skus.csv"
    p.write_text("user_id,item_id,ts\n"
                 "u-7f3a,SKU-A,1\nu-7f3a, SKU-B ,2\nu-7f3a,SKU-A,3\n"  # " SKU-B " is SKU-B
                 "anon-1,SKU-B,1\nanon-1,42,2\nanon-1,SKU-C,3\n"       # a key of digits is a key like any other
                 ",SKU-A,4\n")                                         # a blank user: missing, rejected
    base = [f"warehouse={tmp_path / 'wh'}", "ingest.format=csv", f"ingest.path={p}", "sequences.min_length=2"]
    cfg = load_config(None, base + ["ingest.string_ids=true"])
    out = ingest.run(cfg, spark)
    assert out["actions"] == 6 and out["rejected"] == {"missing_user_id": 1} and out["id_collisions"] == {}
    keys = {(r.kind, r.key): r.id for r in io.read_table(spark, cfg.table_path(S.T_ID_KEYS)).collect()}
    hashed = spark.createDataFrame([(k,) for _, k in keys], "k string").select("k", F.xxhash64("k").alias("h"))
    assert {r.k: r.h for r in hashed.collect()} == {k: i for (_, k), i in keys.items()}  # Spark's xxhash64
    assert sorted(keys) == [("item", "42"), ("item", "SKU-A"), ("item", "SKU-B"), ("item", "SKU-C"),
                            ("user", "anon-1"), ("user", "u-7f3a")]
    sequences.run(cfg, spark)
    seqs = {r.user_id: r.items for r in io.read_table(spark, cfg.table_path(S.T_SEQUENCES)).collect()}
    assert seqs == {keys[("user", "u-7f3a")]: [keys[("item", "SKU-A")], keys[("item", "SKU-B")]],
                    keys[("user", "anon-1")]: [keys[("item", "SKU-B")], keys[("item", "42")]]}
    # the same source again: the same ids (a rerun, or tomorrow's log with the same keys)
    ingest.run(cfg, spark)
    again = {(r.kind, r.key): r.id for r in io.read_table(spark, cfg.table_path(S.T_ID_KEYS)).collect()}
    assert again == keys
    # text categories are keys too: hashed, in id_keys, and named by their key in items
    p.write_text("user_id,item_id,ts,category_id\n"
                 "u1,SKU-A,1,Shoes > Running\nu1,SKU-B,2, Toys \nu2,SKU-A,1,Shoes > Running\nu2,SKU-C,2,\n")
    ingest.run(cfg, spark)
    cats = {r.key: r.id for r in io.read_table(spark, cfg.table_path(S.T_ID_KEYS)).where("kind = 'category'").collect()}
    assert sorted(cats) == ["Shoes > Running", "Toys"]
    items = {r.item_id: (r.category_id, r.category_name) for r in io.read_table(spark, cfg.table_path(S.T_ITEMS)).collect()}
    item = {r.key: r.id for r in io.read_table(spark, cfg.table_path(S.T_ID_KEYS)).where("kind = 'item'").collect()}
    assert items == {item["SKU-A"]: (cats["Shoes > Running"], "Shoes > Running"), item["SKU-B"]: (cats["Toys"], "Toys"),
                     item["SKU-C"]: (None, None)}
    # integer ids again: id_keys is emptied, not left naming other ids
    out = ingest.run(load_config(None, [f"warehouse={tmp_path / 'wh'}", "ingest.format=csv",
                                        f"ingest.path={_csv(tmp_path)}"]), spark)
    assert S.T_ID_KEYS in out["tables"] and io.read_table(spark, cfg.table_path(S.T_ID_KEYS)).count() == 0


def test_id_collisions_counts_ids_shared_by_two_keys(spark):
    from ml.data.ingest import id_collisions

    keys = spark.createDataFrame([("item", "a", 1), ("item", "b", 1), ("item", "c", 2), ("user", "x", 1),
                                  ("user", "y", 3), ("user", "z", 3), ("user", "w", 3)], S.ID_KEYS)
    assert id_collisions(keys) == {"item": 1, "user": 1}
    assert id_collisions(keys.where("id = 2")) == {}


def test_a_csv_folder_whose_files_order_the_columns_differently_is_an_error_naming_the_file(spark, tmp_path):
    from ml.data.formats import SourceSchemaError

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.csv").write_text("user_id,item_id,ts\n1,10,100\n1,11,101\n")
    (src / "b.csv").write_text("item_id,user_id,ts\n20,2,100\n21,2,101\n")
    cfg = load_config(None, [f"warehouse={tmp_path / 'wh'}", "ingest.format=csv", f"ingest.path={src}"])
    with pytest.raises(SourceSchemaError, match=r"b\.csv: its header \(item_id, user_id, ts\) is not the header the "
                                                r"source was read with \(user_id, item_id, ts, the first file's\)"):
        ingest.run(cfg, spark)
    assert not io.table_exists(cfg.table_path(S.T_ACTIONS))


def _three_users(tmp_path):
    """A CSV action log of three users with four actions each, and a config that ingests it."""
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,ts\n" + "".join(f"{u},{u * 10 + t},{t}\n" for u in (1, 2, 3) for t in range(4)))
    return log, load_config(None, [f"warehouse={tmp_path / 'wh'}", "ingest.format=csv", f"ingest.path={log}"])


def _killed_after(monkeypatch, commits_made: int, run, *args) -> list:
    """Run ``run(*args)`` killed at its commit after ``commits_made`` commits; the tables it committed."""
    from ml.data import io as data_io

    write, commits = data_io.write_table, []

    def killed(*a, **kw):
        if len(commits) == commits_made:
            raise KeyboardInterrupt
        commits.append(a[2])
        return write(*a, **kw)

    monkeypatch.setattr(data_io, "write_table", killed)
    with pytest.raises(KeyboardInterrupt):
        run(*args)
    monkeypatch.setattr(data_io, "write_table", write)
    return commits


def test_a_sequences_run_killed_between_its_commits_leaks_no_eval_target_into_training(spark, tmp_path, monkeypatch):
    # before: sequences was committed first, so a kill before eval_targets' commit left the previous
    # targets beside new sequences in which each user's previous last item is a training action
    log, cfg = _three_users(tmp_path)
    ingest.run(cfg, spark)
    sequences.run(cfg, spark)
    with open(log, "a") as f:  # the next night: one more action per user
        f.write("".join(f"{u},{u * 10 + 4},4\n" for u in (1, 2, 3)))
    ingest.run(cfg, spark)
    assert _killed_after(monkeypatch, 1, sequences.run, cfg, spark) == [cfg.table_path(S.T_EVAL_TARGETS)]
    last_training_ts = {r.user_id: max(r.timestamps) for r in io.read_table(spark, cfg.table_path(S.T_SEQUENCES)).collect()}
    targets = io.read_table(spark, cfg.table_path(S.T_EVAL_TARGETS)).collect()
    assert len(targets) == 3 and all(t.target_ts > last_training_ts[t.user_id] for t in targets)


def test_sequences_refuses_tables_of_two_ingest_runs(spark, tmp_path, monkeypatch):
    # ingest commits actions, actions_rejected, id_keys, items, users, companions_rejected one after
    # another: killed after items, the previous source's users (their features) stood beside the new
    # actions, and sequences went on without a word
    from ml.errors import InvalidInput

    _, cfg = _three_users(tmp_path)
    ingest.run(cfg, spark)
    assert _killed_after(monkeypatch, 4, ingest.run, cfg, spark)[-1] == cfg.table_path(S.T_ITEMS)
    with pytest.raises(InvalidInput, match=r"actions and .*users were written by different runs of jobs.ingest.*"
                                           r"rerun jobs.ingest"):
        sequences.run(cfg, spark)
    ingest.run(cfg, spark)
    assert sequences.run(cfg, spark)["users"] == 3
