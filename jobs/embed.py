"""Model artifact + the training items (``noise_q``) -> ``item_embeddings`` (item_id, model, vector,
candidate_vector, run_id); for DAT / two-tower also ``user_embeddings`` (user_id, model, vector, run_id)
from the query tower.

    python -m jobs.embed --conf conf/ml1m_natm.yaml

Scores every item of the training data (the model's vocabulary; a catalogue item that no training
sequence holds gets no vector) and, for DAT / two-tower, every user of ``sequences``, in Spark tasks
(the model is loaded once per executor process); rerunning one model replaces only its partition.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional, Sequence

from pyspark.sql.types import ArrayType, FloatType, LongType, StringType, StructField, StructType

from ml import schemas as S
from ml.config import Config
from ml.data import files, io
from ml.data.session import get_spark, ship_path, tasks_for
from ml.errors import InvalidInput, MissingInput
from ml.index.spark_topk import embed_partitions, run_tag

from jobs._cli import command, parse, print_tables
from jobs.baseline import BASELINES
from jobs.train import TRAINABLE, model_dir

log = logging.getLogger("jobs.embed")
ITEMS_PER_TASK = 20_000  # items embedded per task (at 10^7 items: 500 tasks)
T_ITEM_EMBEDDINGS = S.T_ITEM_EMBEDDINGS
T_USER_EMBEDDINGS = S.T_USER_EMBEDDINGS
USER_MODELS = ("dat", "two_tower")  # models with a query (user) tower
ITEM_EMBEDDINGS = StructType([
    StructField(S.ITEM_ID, LongType(), False),
    StructField(S.MODEL, StringType(), False),
    StructField("vector", ArrayType(FloatType(), False), False),  # trigger / query side, L2-normalised
    StructField("candidate_vector", ArrayType(FloatType(), False), True),  # set when the towers differ
    StructField("run_id", StringType(), False),
])
USER_EMBEDDINGS = StructType([
    StructField(S.USER_ID, LongType(), False),
    StructField(S.MODEL, StringType(), False),
    StructField("vector", ArrayType(FloatType(), False), False),  # query tower, L2-normalised
    StructField("run_id", StringType(), False),
])


@io.job_run
def run(cfg: Config, spark=None) -> dict:
    if cfg.model in BASELINES:
        raise InvalidInput(f"model={cfg.model!r} is a baseline: it has no embeddings (its i2i_topk rows come "
                           f"from `python -m jobs.baseline --model {cfg.model}`); embed a trained model, one of "
                           f"{list(TRAINABLE)}")
    spark = spark or get_spark(cfg.spark)
    mode = cfg.io.delta_mode
    artifact = os.path.join(model_dir(cfg), "model.pt")
    if not files.exists(artifact):
        raise MissingInput(f"no trained model at {artifact}: run jobs.train for model={cfg.model} first")
    # "<training run>:<steps>": the run's id (its records' tag in the metrics file) and the weights'
    # step: a run resumed to more steps publishes other weights under another id, so item and user
    # vectors of two publications never pass as one model (artifacts from before run ids: the time
    # the run finished). The tasks check it against the artifact's own.
    meta = json.loads(files.read_text(os.path.join(model_dir(cfg), "run.json")))
    run_id = run_tag(meta) or meta.get("finished_at", "unknown")
    shipped = ship_path(f"{cfg.model}.pt")  # a uniquely named copy, removed when the driver exits
    files.copy_to_local(artifact, shipped)
    user_side = None
    if cfg.model in USER_MODELS:
        # Two one-sided copies: the item pass's executors load no table per user, the user pass's none per item
        import torch

        from ml.train.dat_task import side_artifact

        blob = torch.load(shipped, map_location="cpu", weights_only=False)
        user_side = ship_path(f"{cfg.model}-users.pt")
        torch.save(side_artifact(blob, "user"), user_side)
        torch.save(side_artifact(blob, "item"), shipped)
        del blob
        spark.sparkContext.addFile(user_side)
    spark.sparkContext.addFile(shipped)
    # The items of the training data only (noise_q: every item of the training sequences, the model's
    # vocabulary). A catalogue item no training sequence holds has no id row: nothing could have been
    # learned about it, and random vectors in the index would take top-K places from trained items. It
    # gets a vector once it has interactions (and the model is retrained).
    items = io.read_table(spark, cfg.table_path("noise_q"), delta_mode=mode).select(S.ITEM_ID)
    n_items = items.count()  # Parquet footers
    # one task per ITEMS_PER_TASK items: noise_q is small in bytes, so its files (one per task that
    # wrote it, or a compacted few) can be far fewer than the encoder's work needs (a vector is the
    # same bits in any batch but for ~10^-9 of the values: widen_to_float64), sorted within each task,
    # so which items share a batch does not follow the order the shuffle fetched its blocks in
    spread = items.repartition(tasks_for(spark, n_items, ITEMS_PER_TASK), S.ITEM_ID).sortWithinPartitions(S.ITEM_ID)
    emb = spread.mapInArrow(embed_partitions(os.path.basename(shipped), cfg.model, run_id, ITEM_EMBEDDINGS),
                            ITEM_EMBEDDINGS)
    # a model that knows none of the training items (trained on other data: a re-ingest and samples
    # without training) would leave an empty partition in place of its vectors
    _, n = io.replace_model_partition(spark, emb, cfg.table_path(T_ITEM_EMBEDDINGS), cfg.model, mode,
                                      refuse_empty=lambda: InvalidInput(
                                          (f"none of noise_q's {n_items} items is in model {cfg.model}'s vocabulary "
                                           f"(trained on other data?): retrain (jobs.train --set model={cfg.model}) first"
                                           if n_items else "noise_q has no items: rerun jobs.samples")
                                          + f"; item_embeddings[{cfg.model}] is left as it was"))
    out = {"items": n, "run_id": run_id, "skipped_items": n_items - n, "untrained_items": 0}
    log.info("item_embeddings[%s]: %d items (run %s)", cfg.model, n, run_id)
    _log_skipped(out["skipped_items"], "items", "noise_q", cfg.model)
    if io.table_exists(cfg.table_path(S.T_ITEMS)):
        catalogue = io.read_table(spark, cfg.table_path(S.T_ITEMS), delta_mode=mode).select(S.ITEM_ID)
        out["untrained_items"] = catalogue.join(items, S.ITEM_ID, "left_anti").distinct().count()
        if out["untrained_items"]:
            log.info("%d items of the catalogue (items) are in no training sequence and get no vector (no "
                     "list of theirs, in no list): they have nothing a model could have learned them from",
                     out["untrained_items"])
    if cfg.model in USER_MODELS:
        users = io.read_table(spark, cfg.table_path(S.T_SEQUENCES), delta_mode=mode).select(S.USER_ID)
        uemb = users.mapInArrow(embed_partitions(os.path.basename(user_side), cfg.model, run_id, USER_EMBEDDINGS,
                                                 side="user"), USER_EMBEDDINGS)
        _, out["users"] = io.replace_model_partition(
            spark, uemb, cfg.table_path(T_USER_EMBEDDINGS), cfg.model, mode,
            refuse_empty=lambda: InvalidInput(
                f"none of the users of sequences is in model {cfg.model}'s vocabulary (trained on other data?): "
                f"retrain first; user_embeddings[{cfg.model}] is left as it was"))
        out["skipped_users"] = users.count() - out["users"]
        log.info("user_embeddings[%s]: %d users (run %s)", cfg.model, out["users"], run_id)
        _log_skipped(out["skipped_users"], "users", S.T_SEQUENCES, cfg.model)
    return out


def _log_skipped(n: int, what: str, source: str, model: str) -> None:
    """Ids of the tables that the trained model has no vector for (they arrived after training)."""
    if n:
        log.warning("%d %s of %s are not in model %s's vocabulary (added after it was trained) and got no "
                    "vector; retrain (jobs.train) to cover them", n, what, source, model)


@command
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg, _ = parse(__doc__, argv)
    out = run(cfg)
    print(f"item_embeddings[{cfg.model}]: {out['items']:,} items")
    if "users" in out:
        print(f"user_embeddings[{cfg.model}]: {out['users']:,} users")
    print_tables(cfg, [T_ITEM_EMBEDDINGS] + ([T_USER_EMBEDDINGS] if "users" in out else []))


if __name__ == "__main__":
    main()
