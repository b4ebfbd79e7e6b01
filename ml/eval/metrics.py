"""i2i retrieval metrics: Pre@K (= HitRate@K, the NATM paper's name) and MRR over **all** eval users.

For each eval target the trigger's top-K list is looked up and the target's rank found; a trigger
with no list, or a target not in it, is a miss (hit 0, reciprocal rank 0). Nothing is averaged over
"users we could score" only: that would flatter a model with sparse coverage.
"""
from __future__ import annotations

import datetime as dt
import math
from fractions import Fraction
from typing import Iterable, List, Optional, Sequence, Tuple

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from ml import schemas as S
from ml.errors import InvalidInput
from ml.eval.offline import p_text, paired_stats


def _lists(topk: DataFrame, kind: str, rank_col: str) -> Tuple[DataFrame, List[str]]:
    """A model's lists as (join keys..., rank_col) for a left join onto ``eval_targets``."""
    if kind == "i2i":
        return topk.select(F.col(S.ITEM_ID).alias(S.TRIGGER_ITEM), F.col(S.NEIGHBOR_ID).alias(S.TARGET_ITEM),
                           F.col(S.RANK).alias(rank_col)), [S.TRIGGER_ITEM, S.TARGET_ITEM]
    if kind == "u2i":
        return topk.select(S.USER_ID, F.col(S.ITEM_ID).alias(S.TARGET_ITEM),
                           F.col(S.RANK).alias(rank_col)), [S.USER_ID, S.TARGET_ITEM]
    raise ValueError(f"kind={kind!r}; expected i2i or u2i")


_RECIPROCAL = "decimal(20,18)"


def _reciprocal(rank_col: str):
    """1 / rank, 0 for a miss, as a decimal: a sum of decimals is exact, so MRR does not depend on the
    order in which a shuffle merges partial sums (a double sum does, in its last bits)."""
    return F.coalesce((F.lit(1.0) / F.col(rank_col)).cast(_RECIPROCAL), F.lit(0).cast(_RECIPROCAL))


def metric_names(kind: str) -> Tuple[str, str]:
    """(hit metric, MRR metric) names of a list kind in ``metrics`` / ``metrics_paired``."""
    return ("pre", "mrr") if kind == "i2i" else ("u2i_hr", "u2i_mrr")


def metric_order(row: dict) -> tuple:
    """Sort key of metric rows: Pre@K by K, then MRR (k null)."""
    return row[S.K] is None, row[S.K] or 0


def check_lists(topk: DataFrame, kind: str, model: str, eval_targets: DataFrame) -> None:
    """Refuse lists the metrics would score wrongly, before anything is written: a neighbour listed
    twice in one list (the target's row joined twice counts a user twice), ranks other than 1..n
    (two items at rank 1 are two hits at K = 1; a rank of 0 or below), a null or NaN score, and, for i2i,
    the trigger in its own list (a target equal to its trigger would be a hit). One more pass over
    the model's lists: a semi-join on the eval targets' keys, then one aggregation over at most eval
    users x K rows."""
    key, item = (S.ITEM_ID, S.NEIGHBOR_ID) if kind == "i2i" else (S.USER_ID, S.ITEM_ID)
    wanted = eval_targets.select(F.col(S.TRIGGER_ITEM if kind == "i2i" else S.USER_ID).alias(key)).distinct()
    per = topk.join(wanted, key, "left_semi").groupBy(key).agg(
        F.count(F.lit(1)).alias("n"), F.size(F.array_distinct(F.collect_list(item))).alias("items"),
        F.size(F.array_distinct(F.collect_list(S.RANK))).alias("ranks"), F.min(S.RANK).alias("lo"),
        F.max(S.RANK).alias("hi"), F.count(F.when(~F.isnan(S.SCORE), F.col(S.SCORE))).alias("scored"),
        F.sum((F.col(item) == F.col(key)).cast("int") if kind == "i2i" else F.lit(0)).alias("self"))
    reason = (F.when(F.col("self") > 0, "its own item in the list")
              .when(F.col("items") < F.col("n"), "an item listed twice (or a null one)")
              .when((F.col("ranks") < F.col("n")) | (F.col("lo") != 1) | (F.col("hi") != F.col("n")),
                    "ranks other than 1..n (repeated, missing, null, or below 1)")
              .when(F.col("scored") < F.col("n"), "a null or NaN score"))
    bad = (per.select(key, reason.alias("why")).where(F.col("why").isNotNull())
           .groupBy("why").agg(F.count(F.lit(1)).alias("lists"), F.min(key).alias("example")).collect())  # <= 4 rows
    if bad:
        what = "; ".join(f"{r['lists']:,} lists with {r['why']} (e.g. {key} {r['example']})"
                         for r in sorted(bad, key=lambda r: r["why"]))
        table = S.T_I2I_TOPK if kind == "i2i" else S.T_U2I_TOPK
        raise InvalidInput(f"{table}, model {model!r}: {what}; each list must hold distinct items at ranks 1..n "
                           f"with a score{', without the item itself' if kind == 'i2i' else ''}: rerun its "
                           "topk (or recent) stage")


def target_ranks(eval_targets: DataFrame, topk: DataFrame, kind: str = "i2i") -> DataFrame:
    """``eval_targets`` + the target's ``rank`` in the trigger's list (i2i) or the user's list (u2i),
    null when absent."""
    lists, keys = _lists(topk, kind, S.RANK)
    return eval_targets.join(lists, keys, "left")


def targets_fingerprint(eval_targets: DataFrame) -> str:
    """Which eval targets a run scored: their count and the exact sum of a 64-bit hash of each (user,
    trigger, target). The same targets give the same string in any order; the validation and the test
    split of ML-1M, both 6,040 users, do not (a count alone could not tell them apart). No targets:
    :class:`InvalidInput`."""
    h = F.xxhash64(S.USER_ID, S.TRIGGER_ITEM, S.TARGET_ITEM).cast("decimal(38,0)")
    row = eval_targets.agg(F.count(F.lit(1)).alias("n"), F.sum(h).alias("h")).first()
    if row["n"] == 0:  # every metric would be an average over no one
        raise InvalidInput("eval_targets is empty: nothing to evaluate (rerun jobs.sequences)")
    return f"{row['n']}:{int(row['h'] or 0) & 0xFFFFFFFFFFFFFFFF:016x}"


def compute_metrics(eval_targets: DataFrame, topk: DataFrame, ks: Sequence[int], model: str,
                    items: Optional[DataFrame] = None, run_ts: Optional[dt.datetime] = None,
                    kind: str = "i2i", targets_id: Optional[str] = None) -> DataFrame:
    """Metrics rows in the ``metrics`` contract: overall, plus per target category when ``items`` given.

    kind="i2i" scores ``i2i_topk`` (metrics "pre", "mrr"); kind="u2i" scores ``u2i_topk`` against the
    same targets (metrics "u2i_hr", "u2i_mrr"). MRR is the mean reciprocal rank over the whole list
    (its length is the largest K written). ``targets_id`` (:func:`targets_fingerprint`) goes with every
    row, so that a report can tell which models were scored on which targets.
    """
    run_ts = run_ts or dt.datetime.now(dt.timezone.utc).replace(microsecond=0, tzinfo=None)
    ranked = target_ranks(eval_targets, topk, kind)
    aggs = [F.count(F.lit(1)).alias(S.N_USERS), F.avg(_reciprocal(S.RANK)).cast("double").alias("mrr")]
    aggs += [F.avg(F.when(F.col(S.RANK) <= k, 1.0).otherwise(0.0)).alias(f"pre_{k}") for k in ks]
    # One row per target: the join cannot repeat one, since each list holds an item once (check_lists).
    out = _long_format(ranked.agg(*aggs).withColumn(S.CATEGORY_ID, F.lit(None)), ks, *metric_names(kind))
    if items is not None:
        # One category per item (the smallest, should `items` list one twice), so that no target
        # counts twice; targets without a category are in the overall row only (a group of null
        # categories would be a second row with category_id null, the contract's mark of the overall row).
        cats = (items.where(F.col(S.CATEGORY_ID).isNotNull()).groupBy(F.col(S.ITEM_ID).alias(S.TARGET_ITEM))
                .agg(F.min(S.CATEGORY_ID).alias(S.CATEGORY_ID)))
        per_cat = ranked.join(cats, S.TARGET_ITEM).groupBy(S.CATEGORY_ID).agg(*aggs)
        out = out.unionByName(_long_format(per_cat, ks, *metric_names(kind)))
    return out.select(F.lit(model).alias(S.MODEL), S.METRIC, F.col(S.K).cast("int"),
                      F.col(S.CATEGORY_ID).cast("long"), F.col(S.VALUE).cast("double"),
                      F.col(S.N_USERS).cast("long"), F.lit(run_ts).cast("timestamp").alias(S.RUN_TS),
                      F.lit(targets_id).cast("string").alias(S.TARGETS))


def paired_comparison(eval_targets: DataFrame, topk: DataFrame, baseline_topk: DataFrame, ks: Sequence[int],
                      model: str, baseline: str, kind: str = "i2i", baseline_kind: str = "i2i",
                      run_ts: Optional[dt.datetime] = None) -> List[dict]:
    """``model`` against ``baseline`` on the same eval targets, user by user: rows of the
    ``metrics_paired`` contract, one per Pre@K and one for MRR.

    Each target gets both models' values (hit within K, or reciprocal rank; 0 for a miss, as in
    :func:`compute_metrics`); the difference d = model - baseline is averaged over all targets, with
    a 95 % interval mean(d) +- 1.96 sd(d) / sqrt(n) and a two-sided p-value from z = mean / (sd /
    sqrt(n)) (the paired t-test at large n; for hits close to McNemar's test of wins vs losses; when
    every user's difference is the same, the sign test; NaN for a single user). Paired,
    because the two models see the same users: most of the user-to-user spread cancels, and the
    interval says whether a difference of a few tenths of a percent is more than noise. One
    aggregation over the targets (two left joins, no per-user rows leave Spark).
    """
    run_ts = run_ts or dt.datetime.now(dt.timezone.utc).replace(microsecond=0, tzinfo=None)
    la, ka = _lists(topk, kind, "rank_a")
    lb, kb = _lists(baseline_topk, baseline_kind, "rank_b")
    ranked = eval_targets.join(la, ka, "left").join(lb, kb, "left")
    values = {k: (F.when(F.col("rank_a") <= k, 1).otherwise(0), F.when(F.col("rank_b") <= k, 1).otherwise(0))
              for k in ks}
    values[None] = (_reciprocal("rank_a"), _reciprocal("rank_b"))
    # Exact sums (integers; decimals for MRR), the mean and spread taken from them on the driver: a rerun
    # gives the same bits whatever order the shuffle merges partial sums in.
    aggs = [F.count(F.lit(1)).alias("n")]
    for i, (k, (a, b)) in enumerate(values.items()):
        d = a - b
        aggs += [F.sum(a).alias(f"a{i}"), F.sum(b).alias(f"b{i}"), F.sum(d).alias(f"d{i}"),
                 F.sum(d * d if k is not None else (d * d).cast(_RECIPROCAL)).alias(f"q{i}"),
                 F.sum(F.when(d > 0, 1).otherwise(0)).alias(f"w{i}"),
                 F.sum(F.when(d < 0, 1).otherwise(0)).alias(f"l{i}")]
    agg = ranked.agg(*aggs).collect()[0]  # one row
    n = agg["n"]
    if n == 0:
        raise InvalidInput("eval_targets is empty: nothing to compare")
    rows, (hit_name, mrr_name) = [], metric_names(kind)
    for i, k in enumerate(values):
        sum_a, sum_b, sum_d, sum_dd = (Fraction(agg[f"{c}{i}"]) for c in "abdq")
        var = (sum_dd - sum_d * sum_d / n) / (n - 1) if n > 1 else Fraction(0)  # stddev_samp's; 0 for one user
        mean, sd, wins, losses = float(sum_d / n), math.sqrt(max(var, 0)), agg[f"w{i}"], agg[f"l{i}"]
        lo, hi, p = paired_stats(mean, sd, n, wins, losses, hits=k is not None)
        rows.append({S.MODEL: model, S.BASELINE: baseline, S.METRIC: hit_name if k is not None else mrr_name, S.K: k,
                     "baseline_kind": baseline_kind,
                     S.VALUE: float(sum_a / n), "baseline_value": float(sum_b / n), "diff": mean,
                     "ci_low": lo, "ci_high": hi, "p_value": p,
                     "wins": wins, "losses": losses, S.N_USERS: n, S.RUN_TS: run_ts})
    return rows


def format_paired(rows: Sequence[dict]) -> str:
    """``metrics_paired`` rows of one model and baseline as a text table, Pre@K by K, then MRR."""
    if not rows:
        return ""
    rows = sorted(rows, key=metric_order)
    r0 = rows[0]
    m, n = display_name(r0[S.MODEL], r0[S.METRIC], r0[S.K])[0], r0[S.N_USERS]
    b = r0[S.BASELINE] + (" u2i" if r0["baseline_kind"] == "u2i" else "")
    w = max(11, len(r0[S.MODEL]) + 2, len(r0[S.BASELINE]) + 2)  # the two value columns, named by model
    lines = [f"{m} vs {b}, paired over {n:,} eval users (95 % interval of the difference; run {r0[S.RUN_TS]})",
             f"{'metric':<9}{r0[S.MODEL]:>{w}}{r0[S.BASELINE]:>{w}}{'diff':>10}{'95 % interval':>22}{'ratio':>8}"
             f"{'wins':>8}{'losses':>8}{'p':>8}"]
    for r in rows:
        name = display_name(r[S.MODEL], r[S.METRIC], r[S.K])[1]
        ratio = r[S.VALUE] / r["baseline_value"] if r["baseline_value"] else float("nan")
        interval = f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
        lines.append(f"{name:<9}{r[S.VALUE]:>{w}.4f}{r['baseline_value']:>{w}.4f}{r['diff']:>+10.4f}"
                     f"{interval:>22}{ratio:>8.3f}"
                     f"{r['wins']:>8,}{r['losses']:>8,}{p_text(r['p_value']):>8}")
    return "\n".join(lines)


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
    w = max([14] + [len(m) + 2 for m in by_model])
    lines = [f"{'model':<{w}}" + "".join(f"{c:>9}" for c in cols) + f"{'users':>9}"]
    for m, vals in by_model.items():
        lines.append(f"{m:<{w}}" + "".join(f"{vals.get(c, float('nan')):>9.4f}" for c in cols) + f"{n_users[m]:>9,}")
    return "\n".join(lines)
