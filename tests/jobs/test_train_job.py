"""jobs.samples -> jobs.train (NATM) on tiny synthetic data: artifact, metrics, resume, strata per batch."""
import json
import logging
import os

import pytest
import torch

from jobs import pipeline, samples, train
from ml.config import load_config
from ml.errors import InvalidInput
from ml.train.natm_task import embed_items, load_artifact
from ml.train.reader import DeltaBatchDataset
from tests.conftest import ROOT

TINY = ["generate.num_users=200", "generate.num_items=300", "generate.actions_per_user=15",
        "generate.num_categories=6", "generate.partitions=2", "natm.dim=16", "natm.layers=1", "natm.heads=2",
        "train.batch_size=64", "train.log_every=5", "train.checkpoint_every=5", "train.shuffle_buffer=500",
        "samples.num_negatives=4", "samples.dat_negatives=2",
        # NATM as the paper has it (a transformer layer, NCE + MLM, one encoder), not synthetic.yaml's ML-1M choice
        "natm.residual=false", "natm.neighbor_pointer=false", "natm.separate_encoders=false", "natm.loss=nce",
        "natm.mlm_weight=0.1"]


def test_samples_then_natm_training_and_resume(spark, warehouse, monkeypatch):
    cfg = load_config(ROOT / "conf" / "synthetic.yaml", [f"warehouse={warehouse}", *TINY, "model=cooc",
                                                         "eval.compare_to=[]"])
    pipeline.run(cfg, spark)  # the tables up to the graph (a baseline's pipeline trains nothing)
    out = samples.run(cfg, spark)
    assert out["natm"] > 0 and out["dat"] > 0 and len(out["dat_categories"]) >= 3
    # a catalogue (or DAT's user count) above its limit stops the job before it writes anything
    from ml.data.io import table_version

    tables = [cfg.table_path(t) for t in ("noise_q", "samples_natm", "samples_dat")]
    before = [table_version(t) for t in tables]
    for model, key, what in (("cooc", "samples.max_items=10", r"\d+ training items, above samples.max_items=10\b"),
                             ("dat", "samples.max_users=100", r"\d+ users, above samples.max_users=100\b")):
        over = load_config(ROOT / "conf" / "synthetic.yaml", [f"warehouse={warehouse}", *TINY, f"model={model}", key])
        with pytest.raises(samples.CatalogueTooLarge, match=what):
            samples.run(over, spark)
    assert [table_version(t) for t in tables] == before
    # a model without a user tower holds nothing per user: its users are not limited
    natm_users = load_config(ROOT / "conf" / "synthetic.yaml", [f"warehouse={warehouse}", *TINY, "model=natm",
                                                                "samples.max_users=100"])

    class Written(Exception):
        pass

    def write(*_a, **_k):
        raise Written  # past the checks; nothing is written (the versions below stay those of the first run)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(samples.io, "write_table", write)
        with pytest.raises(Written):
            samples.run(natm_users, spark)
    # the limits are guards, not settings: raising one reruns nothing and resumes any checkpoint
    assert train.run_settings(natm_users, 0, {}) == train.run_settings(
        load_config(ROOT / "conf" / "synthetic.yaml", [f"warehouse={warehouse}", *TINY, "model=natm"]), 0, {})
    assert not {"samples.max_items", "samples.max_users"} & set(pipeline._stage_io(natm_users, "samples")[0])

    natm = load_config(ROOT / "conf" / "synthetic.yaml", [f"warehouse={warehouse}", *TINY, "model=natm",
                                                          "train.max_steps=8"])
    res = train.run(natm)
    assert res["steps"] == 8
    mdir = train.model_dir(natm)
    model, vocab, extra = load_artifact(os.path.join(mdir, "model.pt"))
    # the id tables hold the training items (what samples.max_items checked), not catalogue items
    # nothing trains (here the held-out targets' items seen nowhere else)
    from ml.train.tables import read_columns

    trained = sorted(read_columns(natm.table_path("noise_q"), ["item_id"]).column("item_id").to_pylist())
    catalogue = set(read_columns(natm.table_path("items"), ["item_id"]).column("item_id").to_pylist())
    assert vocab.ids.tolist() == trained and catalogue - set(trained), (len(trained), len(catalogue))
    vecs, _ = embed_items(model, torch.arange(1, vocab.size + 1))
    assert vecs.shape == (vocab.size, 16) and torch.isfinite(vecs).all()
    lines = [json.loads(l) for l in open(os.path.join(mdir, "train_metrics.jsonl"))]
    assert lines and all("loss" in l for l in lines)
    run = json.load(open(os.path.join(mdir, "run.json")))
    assert run["samples_version"] == extra["samples_version"] == 0

    more = load_config(ROOT / "conf" / "synthetic.yaml", [f"warehouse={warehouse}", *TINY, "model=natm",
                                                          "train.max_steps=12"])
    # a commit to samples_natm since the checkpoint (a rerun of samples: the same rows) does not stop the
    # resume, which reads the version the checkpoint trained on (it was refused: "checkpoint 0, this run 1")
    from ml.data import io as delta_io

    samples_path = more.table_path("samples_natm")
    delta_io.write_table(spark, delta_io.read_table(spark, samples_path).localCheckpoint(), samples_path)
    assert delta_io.table_version(samples_path) == 1
    assert train.run(more, resume=True)["steps"] == 12
    assert json.load(open(os.path.join(mdir, "run.json")))["samples_version"] == 0
    # continued from the step-8 checkpoint: the same run (a run started over has a new id), each
    # logged step once (steps 5 and 10), the step-8 epoch record kept and a step-12 one added
    resumed = [json.loads(l) for l in open(os.path.join(mdir, "train_metrics.jsonl"))]
    assert {r["run"] for r in resumed} == {r["run"] for r in lines} and len({r["run"] for r in lines}) == 1
    assert [r["step"] for r in resumed if r["event"] == "step"] == [5, 10]
    assert [r["step"] for r in resumed if r["event"] == "epoch"] == [8, 12]

    # a run killed while training, or while writing the model folder, leaves that folder as the
    # last finished run left it: before, a run without --resume removed its metrics at the start
    # and wrote its own next to the old model, and run.json was written in place after model.pt
    import ml.train.loop as loop

    def folder():
        return {n: open(os.path.join(mdir, n), "rb").read() for n in sorted(os.listdir(mdir))}

    done = folder()
    assert sorted(done) == ["model.pt", "run.json", "train_metrics.jsonl"]
    real_train = loop.train

    def killed_at_step_7(model, make, loss_fn, *args, **kwargs):
        calls = iter(range(7))

        def loss(m, b):
            if next(calls, None) is None:
                raise RuntimeError("killed")
            return loss_fn(m, b)

        return real_train(model, make, loss, *args, **kwargs)

    other = load_config(ROOT / "conf" / "synthetic.yaml", [f"warehouse={warehouse}", *TINY, "model=natm",
                                                           "train.max_steps=9", f"train.checkpoint_dir={warehouse}/ck_kill"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "train", killed_at_step_7)
        with pytest.raises(RuntimeError, match="killed"):
            train.run(other)
    assert folder() == done
    # the pipeline continues a killed run of the same training (same settings, same table versions)
    # from its checkpoint (step 5), where it trained it again from scratch
    killed_run = {json.loads(line)["run"] for line in open(os.path.join(train.checkpoint_dir(other), "train_metrics.jsonl"))}
    assert train.run(other, resume=train.SAME_RUN)["steps"] == 9
    assert {json.loads(line)["run"] for line in open(os.path.join(mdir, "train_metrics.jsonl"))} == killed_run
    # a finished run's last checkpoint is not continued (it trained nothing and published the old
    # weights again, under a device or run length the pipeline had rerun training for)
    assert train.run(other, resume=train.SAME_RUN)["steps"] == 9
    assert {json.loads(line)["run"] for line in open(os.path.join(mdir, "train_metrics.jsonl"))}.isdisjoint(killed_run)
    # and starts over when its checkpoints are another training's (here: another seed)
    reseeded = load_config(ROOT / "conf" / "synthetic.yaml", [f"warehouse={warehouse}", *TINY, "model=natm", "seed=7",
                                                              "train.max_steps=9", f"train.checkpoint_dir={warehouse}/ck_kill"])
    assert train.run(reseeded, resume=train.SAME_RUN)["steps"] == 9
    assert {json.loads(line)["run"] for line in open(os.path.join(mdir, "train_metrics.jsonl"))}.isdisjoint(killed_run)
    done = folder()

    def dump_half(obj, f, **kwargs):
        f.write("{")
        raise OSError("no space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(json, "dump", dump_half)
        with pytest.raises(OSError, match="no space left"):
            train.run(other)
    assert folder() == done

    # embed in Spark tasks, Faiss top-K, evaluation: the i2i_topk contract for a learned model
    from jobs import embed, evaluate, topk
    from ml import schemas as S
    from ml.data import io

    n_trained = io.read_table(spark, more.table_path("noise_q")).count()
    monkeypatch.setattr(embed, "ITEMS_PER_TASK", -(-n_trained // 5))  # five tasks' worth of items
    emb = embed.run(more, spark)
    assert emb["items"] == n_trained == vocab.size  # the training items, each with its vector
    # the items are spread by their number, not by noise_q's files (at most 2 here: 2 shuffle partitions)
    from deltalake import DeltaTable

    files = len(DeltaTable(more.table_path("item_embeddings")).file_uris([("model", "=", "natm")]))
    assert 3 <= files <= 5, files
    # run_id names the training run (run.json's, the tag of that run's records in the metrics file) and
    # the step of the published weights (the reseeded run's 9): a run resumed to more steps is other weights
    mdir = train.model_dir(more)
    run_id = json.load(open(os.path.join(mdir, "run.json")))["run_id"]
    assert len(run_id) == 16 and emb["run_id"] == f"{run_id}:9"
    assert {l["run"] for l in map(json.loads, open(os.path.join(mdir, "train_metrics.jsonl")))} == {run_id}
    assert {r.run_id for r in io.read_table(spark, more.table_path("item_embeddings")).collect()} == {f"{run_id}:9"}
    # a training killed between publishing model.pt and run.json leaves new weights beside the old
    # run.json: embed refuses them instead of tagging them with the other run's id
    run_json = os.path.join(mdir, "run.json")
    kept = open(run_json).read()
    with open(run_json, "w") as f:
        json.dump({**json.loads(kept), "run_id": "0123456789abcdef"}, f)
    before = io.table_version(more.table_path("item_embeddings"))
    try:
        with pytest.raises(Exception, match="mixes two runs"):
            embed.run(more, spark)
    finally:
        with open(run_json, "w") as f:
            f.write(kept)
    assert io.table_version(more.table_path("item_embeddings")) == before
    topk.run(more, spark, k=10)
    lists = io.read_table(spark, more.table_path(S.T_I2I_TOPK)).cache()
    natm_rows = lists.where("model = 'natm'").collect()
    assert natm_rows and all(r.item_id != r.neighbor_id for r in natm_rows)
    by_item = {}
    for r in natm_rows:
        by_item.setdefault(r.item_id, []).append(r)
    assert len(by_item) == n_trained
    for rows in by_item.values():
        rows.sort(key=lambda r: r.rank)
        assert [r.rank for r in rows] == list(range(1, 11))
        assert all(a.score >= b.score for a, b in zip(rows, rows[1:]))
    assert lists.where("model = 'cooc'").count() > 0  # the baseline's partition is untouched

    # initial weights are a function of train.seed, whatever the process's global RNG holds
    from ml.train.dat_task import build_dat
    from ml.train.natm_task import build_natm

    dat = load_config(ROOT / "conf" / "synthetic.yaml", [f"warehouse={warehouse}", *TINY, "model=dat"])
    for build, c in ((build_natm, natm), (build_dat, dat)):
        torch.manual_seed(1)
        first = build(c)[0].state_dict()
        torch.manual_seed(2)
        second = build(c)[0].state_dict()
        assert all(torch.equal(first[k], second[k]) for k in first)

    # natm.loss=full, with the popularity coordinate and the neighbour pointer: the reader fetches
    # (trigger, positive) only, and one training run through the job gives dim + 1 wide unit vectors
    from ml.train.natm_task import natm_batches

    full = load_config(ROOT / "conf" / "synthetic.yaml", [f"warehouse={warehouse}", *TINY, "model=natm",
                                                          "natm.loss=full", "natm.item_bias=true",
                                                          "natm.neighbor_pointer=true",
                                                          "train.max_steps=3", f"train.checkpoint_dir={warehouse}/ck_full"])
    make, _ = natm_batches(full, build_natm(full)[1], 0, 1)
    assert set(next(iter(make(0)))) == {"trigger", "positive"}
    assert train.run(full)["steps"] == 3
    fmodel, fvocab, _ = load_artifact(os.path.join(train.model_dir(full), "model.pt"))
    assert fmodel.cfg.neighbor_pointer and fmodel.pointer_rank.shape == (fmodel.cfg.num_neighbors,)
    ft, fc = embed_items(fmodel, torch.arange(1, fvocab.size + 1))
    assert ft.shape[1] == fc.shape[1] == 17 and torch.allclose(fc.norm(dim=-1), torch.ones(len(fc)), atol=1e-5)
    # natm.loss=softmax corrects its logits with the positives' distribution: item_counts' shares
    from ml.train.natm_task import positive_distribution

    sampled = load_config(ROOT / "conf" / "synthetic.yaml", [f"warehouse={warehouse}", *TINY, "model=natm",
                                                             "natm.loss=softmax", "train.max_steps=2",
                                                             f"train.checkpoint_dir={warehouse}/ck_sampled"])
    svocab = build_natm(sampled)[1]
    share = positive_distribution(sampled, svocab)
    counts = {r.item_id: r["count"] for r in io.read_table(spark, sampled.table_path(S.T_ITEM_COUNTS)).collect()}
    some = sorted(counts)[:5]
    assert share[0] == 0 and float(share.sum()) == pytest.approx(1.0)
    assert share[svocab.index(torch.tensor(some))].tolist() == pytest.approx(
        [counts[i] / sum(counts.values()) for i in some])
    from ml.train.tables import Vocab

    with pytest.raises(InvalidInput, match="item_counts counts none of the 2 training items"):
        positive_distribution(sampled, Vocab(torch.tensor([max(counts) + 1, max(counts) + 2])))
    assert train.run(sampled)["steps"] == 2
    metrics = evaluate.run(more, spark, ["natm", "cooc"])["rows"]
    assert {r["model"] for r in metrics} == {"natm", "cooc"}

    # DAT and the plain two-tower train from samples_dat through the same job
    from ml.train.dat_task import embed as dat_embed
    from ml.train.dat_task import load_dat_artifact

    for model in ("dat", "two_tower"):
        c = load_config(ROOT / "conf" / "synthetic.yaml", [f"warehouse={warehouse}", *TINY, f"model={model}",
                                                           "train.max_steps=5", "dat.hidden=[16, 8]"])
        assert train.run(c)["steps"] == 5
        m, users, items = load_dat_artifact(os.path.join(train.model_dir(c), "model.pt"))
        assert m.cfg.use_amm == (model == "dat") and m.cfg.use_cal == (model == "dat")
        assert dat_embed(m, torch.arange(1, users.size + 1), "user").shape == (users.size, 8)
    emb = embed.run(c, spark)  # two_tower's item and user towers through the embed job
    trained_ids = sorted(r.item_id for r in io.read_table(spark, c.table_path("noise_q")).collect())
    assert emb["items"] == len(trained_ids) and emb["users"] == users.size
    assert emb["skipped_items"] == 0 and emb["skipped_users"] == 0  # every trained item and user has a vector
    # catalogue items in no training sequence: not in the vocabulary (nothing could train them); they
    # get no vector and so take no one's top-K places
    catalogue = {r.item_id for r in io.read_table(spark, c.table_path(S.T_ITEMS)).collect()}
    assert emb["untrained_items"] == len(catalogue - set(trained_ids)) > 0
    embedded = {r.item_id for r in io.read_table(spark, c.table_path(S.T_ITEM_EMBEDDINGS))
                .where("model = 'two_tower'").collect()}
    assert embedded == set(trained_ids)
    # a model that knows none of noise_q's items (trained on other data: a re-ingest and samples without
    # training) embeds nothing: refused, and the model's previous vectors stay (they were replaced by
    # an empty partition). The real job, its tasks' output emptied as such a model's is
    real = embed.embed_partitions

    def knows_none(*args, **kwargs):
        score = real(*args, **kwargs)

        def tasks(batches):
            for out in score(batches):
                yield out.slice(0, 0)
        return tasks

    before = table_version(c.table_path(S.T_ITEM_EMBEDDINGS))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(embed, "embed_partitions", knows_none)
        with pytest.raises(InvalidInput, match=rf"none of noise_q's {len(trained_ids)} items is in model two_tower's "
                                               r"vocabulary .*item_embeddings\[two_tower\] is left as it was"):
            embed.run(c, spark)
    assert table_version(c.table_path(S.T_ITEM_EMBEDDINGS)) == before
    assert io.read_table(spark, c.table_path(S.T_ITEM_EMBEDDINGS)).where("model = 'two_tower'").count() == len(trained_ids)
    res = topk.run(c, spark, k=5)
    assert res["rows"] == 5 * len(trained_ids) and res["u2i_rows"] == 5 * users.size

    # user_embeddings = the query tower; u2i_topk = exact top-5 items by inner product, ranks 1..5
    import numpy as np

    uv = dat_embed(m, torch.arange(1, users.size + 1), "user").numpy()
    iv = dat_embed(m, items.index(torch.tensor(trained_ids)), "item").numpy()
    ue = {r.user_id: np.array(r.vector) for r in io.read_table(spark, c.table_path(S.T_USER_EMBEDDINGS))
          .where("model = 'two_tower'").collect()}
    assert set(ue) == set(users.ids.tolist())
    u0 = int(users.ids[0])
    np.testing.assert_allclose(ue[u0], uv[0], atol=1e-5)
    u2i = io.read_table(spark, c.table_path(S.T_U2I_TOPK)).where(f"model = 'two_tower' AND user_id = {u0}")
    got = [r.item_id for r in sorted(u2i.collect(), key=lambda r: r.rank)]
    scores = iv @ uv[0]
    want = np.array(trained_ids)[np.lexsort((np.arange(len(trained_ids)), -scores))[:5]]
    assert got == want.tolist()
    # the IVF index searching every list returns the exact lists (the path large catalogues take)
    flat = {(r.item_id, r.rank): r.neighbor_id for r in io.read_table(spark, c.table_path(S.T_I2I_TOPK))
            .where("model = 'two_tower'").collect()}
    ivf = load_config(ROOT / "conf" / "synthetic.yaml", [f"warehouse={warehouse}", *TINY, "model=two_tower",
                                                         "train.max_steps=5", "dat.hidden=[16, 8]", "baseline.index=ivf",
                                                         "baseline.nlist=4", "baseline.nprobe=4"])
    topk.run(ivf, spark, k=5)
    approx = {(r.item_id, r.rank): r.neighbor_id for r in io.read_table(spark, c.table_path(S.T_I2I_TOPK))
              .where("model = 'two_tower'").collect()}
    assert approx.keys() == flat.keys()
    assert sum(approx[k] == flat[k] for k in flat) >= 0.98 * len(flat)  # float ties may swap a few
    rows = evaluate.run(c, spark, ["two_tower"])["rows"]
    u2i_rows = [r for r in rows if r["metric"].startswith("u2i_")]
    assert {r["metric"] for r in u2i_rows} == {"u2i_hr", "u2i_mrr"}
    assert all(r["n_users"] == rows[0]["n_users"] for r in u2i_rows)

    # DAT samples keep several categories, the major one included, in every reader batch
    ds = DeltaBatchDataset(cfg.table_path("samples_dat"), columns=["category_id", "label"], batch_size=64,
                           shuffle_buffer=500, seed=1)
    major = max(out["dat_categories"], key=out["dat_categories"].get)
    batches = list(ds)
    full = [b for b in batches if len(b["label"]) == 64]
    with_major = sum(int(major in b["category_id"].tolist()) for b in full)
    assert all(len(set(b["category_id"].tolist())) >= 3 for b in full)
    assert with_major >= 0.9 * len(full)

    # user vectors from another run than the item vectors (an embed killed between its two commits):
    # topk refuses rather than pairing them, and writes nothing
    from pyspark.sql import functions as F

    stale = io.read_table(spark, c.table_path(S.T_USER_EMBEDDINGS)).where("model = 'two_tower'").withColumn(
        "run_id", F.lit("an older run"))
    io.replace_model_partition(spark, stale.localCheckpoint(), c.table_path(S.T_USER_EMBEDDINGS), "two_tower")
    before = io.table_version(c.table_path(S.T_I2I_TOPK))
    with pytest.raises(ValueError, match=r"user_embeddings\[two_tower\] is from run \['an older run'\].*rerun jobs.embed"):
        topk.run(c, spark, k=5)
    assert io.table_version(c.table_path(S.T_I2I_TOPK)) == before

    # an empty samples table (a graph or sequences stage that produced nothing) is an error naming the
    # table, before any checkpoint or the last trained model is touched
    samples_path = cfg.table_path("samples_natm")
    empty = io.read_table(spark, samples_path).limit(0)
    io.write_table(spark, empty.localCheckpoint(), samples_path, mode="overwrite")
    artifact = os.path.join(train.model_dir(more), "model.pt")
    kept = (os.path.getmtime(artifact), sorted(os.listdir(train.checkpoint_dir(more))))
    with pytest.raises(ValueError, match=r"samples_natm \(version \d+\) has no rows: nothing to train on"):
        train.run(more)
    assert (os.path.getmtime(artifact), sorted(os.listdir(train.checkpoint_dir(more)))) == kept


def test_a_set_checkpoint_dir_holds_one_folder_per_model_and_settings_name_the_warehouse(tmp_path, monkeypatch, caplog):
    # a train.checkpoint_dir set in ml1m_natm.yaml is inherited by ml1m_dat / ml1m_two_tower: one
    # folder for all three, and a run that does not continue the folder's checkpoint clears it, so the
    # two-tower's first run deleted a killed NATM run's checkpoints
    import pyarrow as pa
    from deltalake import write_deltalake

    shared = [f"train.checkpoint_dir={tmp_path}/ck"]
    dirs = {m: train.checkpoint_dir(load_config(ROOT / "conf" / "synthetic.yaml", [*shared, f"model={m}"]))
            for m in ("natm", "dat", "two_tower")}
    assert dirs == {m: str(tmp_path / "ck" / m) for m in dirs}
    # checkpoints an older version left at the folder's top level are named, to be moved
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "ckpt-000000004.pt").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="jobs.train"):
        train.checkpoint_dir(load_config(ROOT / "conf" / "synthetic.yaml", shared))
    assert f"{tmp_path / 'ck'} holds checkpoints written before each model got its own subfolder" in caplog.text
    # the validation split's warehouse reaches the same table versions as the test split's: the settings
    # a checkpoint is continued under name the warehouse (absolute) and the tables' ids
    test_wh, val_wh = tmp_path / "test_wh", tmp_path / "val_wh"
    settings = {}
    for wh in (test_wh, val_wh):
        write_deltalake(str(wh / "noise_q"), pa.table({"item_id": [1, 2], "q": [0.5, 0.5]}))
        cfg = load_config(ROOT / "conf" / "synthetic.yaml", [*shared, f"warehouse={wh}"])
        settings[wh] = train.run_settings(cfg, 0, {cfg.table_path("noise_q"): 0})
        assert settings[wh]["warehouse"] == str(wh) and settings[wh]["noise_q version"] == 0
    a, b = settings[test_wh], settings[val_wh]
    assert a["table ids"]["noise_q"] != b["table ids"]["noise_q"]
    assert {k for k in a if a[k] != b.get(k)} == {"warehouse", "table ids"}
    # the same warehouse rebuilt in place (another table at the same version): another id
    import shutil

    shutil.rmtree(test_wh / "noise_q")
    write_deltalake(str(test_wh / "noise_q"), pa.table({"item_id": [3], "q": [1.0]}))
    cfg = load_config(ROOT / "conf" / "synthetic.yaml", [*shared, f"warehouse={test_wh}"])
    again = train.run_settings(cfg, 0, {cfg.table_path("noise_q"): 0})
    assert again["table ids"] != a["table ids"] and {k for k in a if a[k] != again.get(k)} == {"table ids"}
    # relative and absolute spellings of one warehouse are one warehouse
    monkeypatch.chdir(tmp_path)
    rel = load_config(ROOT / "conf" / "synthetic.yaml", [*shared, "warehouse=val_wh"])
    assert train.run_settings(rel, 0, {})["warehouse"] == os.path.join(os.getcwd(), "val_wh")


def test_samples_and_noise_q_of_two_runs_of_the_samples_job_are_refused(spark, warehouse, monkeypatch):
    # jobs.samples commits noise_q, then samples_natm and samples_dat: killed between them, a model
    # trained on the old samples with the new vocabulary (new items: untrained rows, embedded and ranked)
    from ml.data import io

    cfg = load_config(ROOT / "conf" / "synthetic.yaml", [f"warehouse={warehouse}", "model=natm"])
    q = spark.createDataFrame([(1, 0.5), (2, 0.5)], "item_id bigint, q double")
    monkeypatch.setattr(io, "PROCESS_ID", "the-killed-run")
    io.write_table(spark, q, cfg.table_path("samples_natm"))  # any rows: the check reads the commits only
    monkeypatch.undo()
    io.write_table(spark, q, cfg.table_path("noise_q"))
    with pytest.raises(InvalidInput, match=r"samples_natm and .*noise_q were written by different runs of jobs.samples"):
        train.run(cfg)
    with pytest.raises(InvalidInput, match=r"samples_natm and .*noise_q were written"):
        train.run(cfg, resume=train.SAME_RUN)
