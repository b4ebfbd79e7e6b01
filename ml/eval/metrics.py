"""i2i retrieval metrics: Pre@K (= HitRate@K, the NATM paper's name) and MRR over **all** eval users.

For each eval target the trigger's top-K list is looked up and the target's rank found; a trigger
with no list, or a target not in it, is a miss (hit 0, reciprocal rank 0). Nothing is averaged over
"users we could score" only: that would flatter a model with sparse coverage.
"""
from __future__ import annotations

import datetime as dt
from typing import Iterable, List, Optional, Sequence, Tuple

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from ml import schemas as S


def target_ranks(eval_targets: DataFrame, topk: DataFrame, kind: str = "i2i") -> DataFrame:
    """``eval_targets`` + the target's ``rank`` in the trigger's list (i2i) or the user's list (u2i),
    null when absent."""
    if kind == "i2i":
        lists = topk.select(F.col(S.ITEM_ID).alias(S.TRIGGER_ITEM), F.col(S.NEIGHBOR_ID).alias(S.TARGET_ITEM),
                            F.col(S.RANK))
        return eval_targets.join(lists, [S.TRIGGER_ITEM, S.TARGET_ITEM], "left")
    if kind == "u2i":
        lists = topk.select(S.USER_ID, F.col(S.ITEM_ID).alias(S.TARGET_ITEM), F.col(S.RANK))
        return eval_targets.join(lists, [S.USER_ID, S.TARGET_ITEM], "left")
    raise ValueError(f"kind={kind!r}; expected i2i or u2i")


def compute_metrics(eval_targets: DataFrame, topk: DataFrame, ks: Sequence[int], model: str,
                    items: Optional[DataFrame] = None, run_ts: Optional[dt.datetime] = None,
                    kind: str = "i2i") -> DataFrame:
    """Metrics rows in the ``metrics`` contract: overall, plus per target category when ``items`` given.

    kind="i2i" scores ``i2i_topk`` (metrics "pre", "mrr"); kind="u2i" scores ``u2i_topk`` against the
    same targets (metrics "u2i_hr", "u2i_mrr"). MRR is the mean reciprocal rank over the whole list
    (its length is the largest K written).
    """
    run_ts = run_ts or dt.datetime.now(dt.timezone.utc).replace(microsecond=0, tzinfo=None)
    ranked = target_ranks(eval_targets, topk, kind)
    group_cols: List[Optional[str]] = [None]
    if items is not None:
        cats = items.select(F.col(S.ITEM_ID).alias(S.TARGET_ITEM), S.CATEGORY_ID)
        ranked = ranked.join(cats, S.TARGET_ITEM, "left")
        group_cols.append(S.CATEGORY_ID)
    aggs = [F.count(F.lit(1)).alias(S.N_USERS),
            F.avg(F.coalesce(1.0 / F.col(S.RANK), F.lit(0.0))).alias("mrr")]
    aggs += [F.avg(F.when(F.col(S.RANK) <= k, 1.0).otherwise(0.0)).alias(f"pre_{k}") for k in ks]
    out = None
    for g in group_cols:
        agg = (ranked.groupBy(g).agg(*aggs) if g else ranked.agg(*aggs).withColumn(S.CATEGORY_ID, F.lit(None)))
        rows = _long_format(agg, ks, "pre" if kind == "i2i" else "u2i_hr", "mrr" if kind == "i2i" else "u2i_mrr")
        out = rows if out is None else out.unionByName(rows)
    return out.select(F.lit(model).alias(S.MODEL), S.METRIC, F.col(S.K).cast("int"),
                      F.col(S.CATEGORY_ID).cast("long"), F.col(S.VALUE).cast("double"),
                      F.col(S.N_USERS).cast("long"), F.lit(run_ts).cast("timestamp").alias(S.RUN_TS))


def _long_format(agg: DataFrame, ks: Iterable[int], hit_name: str, mrr_name: str) -> DataFrame:
    metrics = [F.struct(F.lit(hit_name).alias(S.METRIC), F.lit(k).alias(S.K), F.col(f"pre_{k}").alias(S.VALUE))
               for k in ks]
    metrics.append(F.struct(F.lit(mrr_name).alias(S.METRIC), F.lit(None).cast("int").alias(S.K),
                            F.col("mrr").alias(S.VALUE)))
    return agg.select(S.CATEGORY_ID, S.N_USERS, F.explode(F.array(*metrics)).alias("m")).select(
        S.CATEGORY_ID, S.N_USERS, "m.*")


def display_name(model: str, metric: str, k) -> Tuple[str, str]:
    """(row, column) a ``metrics`` row is shown under: u2i metrics get their own row "<model> u2i", in the
    same Pre@K / MRR columns (HR@K = Pre@K against the same targets)."""
    row = f"{model} u2i" if metric.startswith("u2i_") else model
    return row, ("MRR" if metric.endswith("mrr") else f"Pre@{int(k)}")


def format_table(rows: Sequence[dict], ks: Sequence[int]) -> str:
    """Overall metrics per model as a text table (rows: ``metrics`` rows with category_id null).

    u2i rows (DAT / two-tower) get their own line, "<model> u2i", in the same columns (HR@K = Pre@K).
    """
    by_model: dict = {}
    n_users: dict = {}
    for r in rows:
        if r[S.CATEGORY_ID] is not None:
            continue
        name, key = display_name(r[S.MODEL], r[S.METRIC], r[S.K])
        by_model.setdefault(name, {})[key] = r[S.VALUE]
        n_users[name] = r[S.N_USERS]
    cols = [f"Pre@{k}" for k in ks] + ["MRR"]
    lines = [f"{'model':<14}" + "".join(f"{c:>9}" for c in cols) + f"{'users':>9}"]
    for m, vals in by_model.items():
        lines.append(f"{m:<14}" + "".join(f"{vals.get(c, float('nan')):>9.4f}" for c in cols) + f"{n_users[m]:>9,}")
    return "\n".join(lines)
