"""i2i retrieval metrics: Pre@K (= HitRate@K, the NATM paper's name) and MRR over **all** eval users.

For each eval target the trigger's top-K list is looked up and the target's rank found; a trigger
with no list, or a target not in it, is a miss (hit 0, reciprocal rank 0). Nothing is averaged over
"users we could score" only: that would flatter a model with sparse coverage.
"""
from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from ml import schemas as S
from ml.errors import InvalidInput
from ml.eval.offline import p_text, paired_stats


_RECIPROCAL = "decimal(20,18)"


def _reciprocal(rank):
    """1 / rank (a column or its name), 0 for a miss, as a decimal: a sum of decimals is exact, so MRR
    does not depend on the order in which a shuffle merges partial sums (a double sum does, in its
    last bits)."""
    rank = F.col(rank) if isinstance(rank, str) else rank
    return F.coalesce((F.lit(1.0) / rank).cast(_RECIPROCAL), F.lit(0).cast(_RECIPROCAL))


def _mean_reciprocal(total, n):
    """A sum of :func:`_reciprocal` values (decimal(30,18)) over ``n`` users as the double ``avg()``
    gives over the n values: Spark's Average divides its decimal(30,18) sum by the count to 38
    significant digits and rounds that once, half up, to decimal(24,22). A decimal(34,18) over a
    decimal(20,0) is a decimal(38,22): the same two roundings (the decimal(30,18) sum divided
    directly is a decimal(38,26), rounded a third time on the cast, which differs in the last bit
    when digits 23-26 are 4999 and the next is 5 or more)."""
    return (total.cast("decimal(34,18)") / n.cast("decimal(20,0)")).cast("decimal(24,22)").cast("double")


def metric_names(kind: str) -> Tuple[str, str]:
    """(hit metric, MRR metric) names of a list kind in ``metrics`` / ``metrics_paired``."""
    return ("pre", "mrr") if kind == "i2i" else ("u2i_hr", "u2i_mrr")


def metric_order(row: dict) -> tuple:
    """Sort key of metric rows: Pre@K by K, then MRR (k null)."""
    return row[S.K] is None, row[S.K] or 0


def check_lists(topk: DataFrame, kind: str, model: Optional[str], eval_targets: DataFrame) -> None:
    """Refuse lists the metrics would score wrongly, before anything is written: a neighbour listed
    twice in one list (the target's row joined twice counts a user twice), ranks other than 1..n
    (two items at rank 1 are two hits at K = 1; a rank of 0 or below), a null or NaN score, and, for i2i,
    the trigger in its own list (a target equal to its trigger would be a hit). ``model``: the name
    the lists go by; None: every model in ``topk``'s ``model`` column, each list checked within its
    model. One more pass over the lists: a semi-join on the eval targets' keys, then one aggregation
    over at most models x eval users x K rows. (:func:`target_ranks` makes the same checks, in a
    pass of their own over the lists before the join that ranks the targets.)"""
    named = topk.withColumn(S.MODEL, F.lit(model)) if model is not None else topk
    _refuse_bad_lists(_per_list(named, kind, eval_targets), kind)


def _list_key(kind: str) -> Tuple[str, str, str]:
    """(the column a list is keyed by, its items' column) in the lists table of ``kind``, and the
    eval targets' column that names the list a target reads."""
    if kind not in ("i2i", "u2i"):
        raise ValueError(f"kind={kind!r}; expected i2i or u2i")
    return (S.ITEM_ID, S.NEIGHBOR_ID, S.TRIGGER_ITEM) if kind == "i2i" else (S.USER_ID, S.ITEM_ID, S.USER_ID)


def _per_list(named: DataFrame, kind: str, eval_targets: DataFrame) -> DataFrame:
    """One row per (model, list) an eval target reads: the model, the list's key, ``why`` the list
    cannot be scored (null: it can) and its length ``n``."""
    key, item, target_key = _list_key(kind)
    wanted = eval_targets.select(F.col(target_key).alias(key)).distinct()
    per = named.join(wanted, key, "left_semi").groupBy(S.MODEL, key).agg(
        F.count(F.lit(1)).alias("n"), F.size(F.array_distinct(F.collect_list(item))).alias("items"),
        F.size(F.array_distinct(F.collect_list(S.RANK))).alias("ranks"), F.min(S.RANK).alias("lo"),
        F.max(S.RANK).alias("hi"), F.count(F.when(~F.isnan(S.SCORE), F.col(S.SCORE))).alias("scored"),
        F.sum((F.col(item) == F.col(key)).cast("int") if kind == "i2i" else F.lit(0)).alias("self"))
    reason = (F.when(F.col("self") > 0, "its own item in the list")
              .when(F.col("items") < F.col("n"), "an item listed twice (or a null one)")
              .when((F.col("ranks") < F.col("n")) | (F.col("lo") != 1) | (F.col("hi") != F.col("n")),
                    "ranks other than 1..n (repeated, missing, null, or below 1)")
              .when(F.col("scored") < F.col("n"), "a null or NaN score"))
    return per.select(S.MODEL, key, reason.alias("why"), "n")


def _refuse_bad_lists(per: DataFrame, kind: str) -> Dict[str, int]:
    """:class:`InvalidInput` naming each model with lists :func:`_per_list` found unscorable, why,
    how many and an example; else {model: items in its longest list}."""
    key = _list_key(kind)[0]
    rows = (per.groupBy(S.MODEL, "why").agg(F.count(F.lit(1)).alias("lists"), F.min(key).alias("example"),
                                            F.max("n").alias("longest"))
            .collect())  # <= 5 rows per model
    bad = [r for r in rows if r["why"] is not None]
    if bad:
        by_model: dict = {}
        for r in sorted(bad, key=lambda r: (r[S.MODEL], r["why"])):
            by_model.setdefault(r[S.MODEL], []).append(f"{r['lists']:,} lists with {r['why']} (e.g. {key} {r['example']})")
        what = "; ".join(f"model {m!r}: {'; '.join(w)}" for m, w in by_model.items())
        table = S.T_I2I_TOPK if kind == "i2i" else S.T_U2I_TOPK
        raise InvalidInput(f"{table}, {what}; each list must hold distinct items at ranks 1..n "
                           f"with a score{', without the item itself' if kind == 'i2i' else ''}: rerun its "
                           "topk (or recent) stage")
    return {r[S.MODEL]: r["longest"] for r in rows}


_TARGET = [S.USER_ID, S.TRIGGER_ITEM, S.TARGET_ITEM]


@dataclass(frozen=True)
class TargetRanks:
    """:func:`target_ranks`' rows and the (model, kind) lists they were found in: a list the rows do
    not cover would read as all misses, so the functions that take them refuse it instead."""
    rows: DataFrame
    lists: FrozenSet[Tuple[str, str]]
    longest: Mapping[Tuple[str, str], int] = field(default_factory=dict)  # (model, kind): items in the
    # longest list the targets read (checked lists only)

    def require(self, wanted, what: str) -> None:
        missing = sorted(set(wanted) - self.lists)
        if missing:
            raise ValueError(f"{what}: the ranks given were not found in the lists of {missing} "
                             f"(they cover {sorted(self.lists)})")

    def unpersist(self) -> None:
        self.rows.unpersist()


def target_ranks(eval_targets: DataFrame, parts: Sequence[Tuple[str, DataFrame, Sequence[str]]],
                 persist: bool = False, check: bool = True) -> TargetRanks:
    """Every eval target's rank in every list it reads: ``model, kind, user_id, trigger_item,
    target_item, w, rank``, one row per distinct target (``w``: how many times ``eval_targets`` lists
    it; each is a user) and model whose list holds the target (a miss has no row: it adds 0 to every
    sum). ``parts``: (kind, lists with a ``model`` column, the models to take from them), as
    :func:`score_lists` takes them. Both :func:`score_lists` and :func:`paired_comparisons` take the
    result (``ranks``, a :class:`TargetRanks`), so the evaluation job joins the lists with the targets
    once, not once per use.

    ``check``: first :func:`check_lists`' checks of the lists the targets read (one more pass), and
    :class:`InvalidInput` naming the model whose lists cannot be scored; without it (as
    :func:`score_lists` and :func:`paired_comparisons` read lists on their own) a list holding the
    target twice would count it twice. ``persist``: the result is cached (MEMORY_AND_DISK) and
    computed before it is returned; the caller unpersists it."""
    weighted = eval_targets.groupBy(*_TARGET).agg(F.count(F.lit(1)).alias("w"))
    ranks, longest = None, {}
    for kind, topk, models in parts:
        key, item, target_key = _list_key(kind)
        lists = topk.where(F.col(S.MODEL).isin(*models))
        if check:
            longest.update({(m, kind): n for m, n in _refuse_bad_lists(_per_list(lists, kind, eval_targets),
                                                                       kind).items()})
        r = (weighted.join(lists.select(S.MODEL, F.col(key).alias(target_key), F.col(item).alias(S.TARGET_ITEM),
                                        S.RANK), [target_key, S.TARGET_ITEM])
             .select(S.MODEL, F.lit(kind).alias("kind"), *_TARGET, "w", S.RANK))
        ranks = r if ranks is None else ranks.unionByName(r)
    if ranks is None:
        raise ValueError("target_ranks: no lists")
    if persist:
        ranks = ranks.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            ranks.count()
        except BaseException:
            ranks.unpersist()
            raise
    return TargetRanks(ranks, frozenset((m, kind) for kind, _, models in parts for m in models), longest)


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
    """Metrics rows in the ``metrics`` contract of one model's lists (``topk``, named ``model``):
    :func:`score_lists` with one part."""
    return score_lists(eval_targets, [(kind, topk.withColumn(S.MODEL, F.lit(model)), [model])], ks, items, run_ts,
                       targets_id)


def score_lists(eval_targets: DataFrame, parts: Sequence[Tuple[str, DataFrame, Sequence[str]]], ks: Sequence[int],
                items: Optional[DataFrame] = None, run_ts: Optional[dt.datetime] = None,
                targets_id: Optional[str] = None, ranks: Optional[TargetRanks] = None) -> DataFrame:
    """Metrics rows in the ``metrics`` contract: overall, plus per target category when ``items`` given,
    for every model of every part, all from one aggregation over :func:`target_ranks` of the parts
    (``ranks``, when the caller has them already, for these parts or more).

    ``parts``: (kind, lists, models): kind="i2i" scores ``i2i_topk`` rows (metrics "pre", "mrr"),
    kind="u2i" ``u2i_topk`` rows against the same targets (metrics "u2i_hr", "u2i_mrr"); the lists'
    ``model`` column names their model, and each of ``models`` is scored over all eval targets (a
    model with no hit gets its rows, of zeros). MRR is the mean reciprocal rank over the whole list
    (its length is the largest K written). ``targets_id`` (:func:`targets_fingerprint`) goes with every
    row, so that a report can tell which models were scored on which targets.

    Only the hits are summed: a miss adds 0 to every sum, and each mean is its sum over the eval
    users (the same value, to the bit, as a mean over a left join with the misses in it). A target
    listed w times counts w times. The overall and the per-category sums come from one aggregation
    (grouping sets).
    """
    spark = eval_targets.sparkSession
    run_ts = run_ts or dt.datetime.now(dt.timezone.utc).replace(microsecond=0, tzinfo=None)
    if not parts:
        raise ValueError("score_lists: no lists to score")
    pairs = list(dict.fromkeys((m, kind) for kind, _, models in parts for m in models))
    names = spark.createDataFrame(pairs, f"{S.MODEL} string, kind string")
    ranks = ranks if ranks is not None else target_ranks(eval_targets, parts, check=False)
    ranks.require(pairs, "score_lists")
    hits = ranks.rows.join(F.broadcast(names), [S.MODEL, "kind"], "left_semi")
    w = F.col("w")
    # w as a decimal(10,0): a decimal(20,18) times a long (a decimal(20,0)) would round each
    # reciprocal rank to 15 places; times a decimal(10,0) the products are exact
    sums = [F.sum(_reciprocal(S.RANK) * w.cast("decimal(10,0)")).alias("rr")] + [
        F.sum(F.when(F.col(S.RANK) <= k, w).otherwise(0)).alias(f"hit_{k}") for k in ks]
    users = eval_targets.select(S.TARGET_ITEM)
    if items is None:
        hit_sums = hits.groupBy(S.MODEL, "kind").agg(*sums).withColumn(S.CATEGORY_ID, F.lit(None).cast("long"))
        counts = users.agg(F.count(F.lit(1)).alias(S.N_USERS)).withColumn(S.CATEGORY_ID, F.lit(None).cast("long"))
    else:
        # One category per item (the smallest, should `items` list one twice), so that no target
        # counts twice; targets without a category are in the overall rows only (a group of null
        # categories would be a second row with category_id null, the contract's mark of the overall row).
        cats = (items.where(F.col(S.CATEGORY_ID).isNotNull()).groupBy(F.col(S.ITEM_ID).alias(S.TARGET_ITEM))
                .agg(F.min(S.CATEGORY_ID).alias(S.CATEGORY_ID)))

        def by_category(df: DataFrame, keys: list, aggs: list) -> DataFrame:
            """The sums overall (category_id null) and per category, in one aggregation."""
            sets = [keys, [*keys, S.CATEGORY_ID]]
            out = (df.join(cats, S.TARGET_ITEM, "left").groupingSets(sets, *keys, S.CATEGORY_ID)
                   .agg(*aggs, F.grouping(S.CATEGORY_ID).alias("overall")))
            return out.where((F.col("overall") == 1) | F.col(S.CATEGORY_ID).isNotNull()).drop("overall")

        hit_sums = by_category(hits, [S.MODEL, "kind"], sums)
        counts = by_category(users, [], [F.count(F.lit(1)).alias(S.N_USERS)])
    same_category = F.col("c." + S.CATEGORY_ID).eqNullSafe(F.col("h." + S.CATEGORY_ID))
    joined = (names.crossJoin(counts).alias("c")
              .join(hit_sums.alias("h"), [F.col("c." + S.MODEL) == F.col("h." + S.MODEL),
                                          F.col("c.kind") == F.col("h.kind"), same_category], "left")
              .select("c.*", "h.rr", *[f"h.hit_{k}" for k in ks]))
    n = F.col(S.N_USERS)
    mrr = _mean_reciprocal(F.coalesce(F.col("rr"), F.lit(0).cast("decimal(30,18)")), n)
    (hit_i2i, mrr_i2i), (hit_u2i, mrr_u2i), i2i = metric_names("i2i"), metric_names("u2i"), F.col("kind") == "i2i"
    values = [F.struct(F.when(i2i, hit_i2i).otherwise(hit_u2i).alias(S.METRIC), F.lit(k).alias(S.K),
                       (F.coalesce(F.col(f"hit_{k}"), F.lit(0)) / n).cast("double").alias(S.VALUE)) for k in ks]
    values.append(F.struct(F.when(i2i, mrr_i2i).otherwise(mrr_u2i).alias(S.METRIC), F.lit(None).cast("int").alias(S.K),
                           mrr.alias(S.VALUE)))
    return joined.select(S.MODEL, S.CATEGORY_ID, S.N_USERS, F.explode(F.array(*values)).alias("m")).select(
        S.MODEL, "m." + S.METRIC, F.col("m." + S.K).cast("int").alias(S.K), F.col(S.CATEGORY_ID).cast("long"),
        F.col("m." + S.VALUE).cast("double").alias(S.VALUE), F.col(S.N_USERS).cast("long"),
        F.lit(run_ts).cast("timestamp").alias(S.RUN_TS), F.lit(targets_id).cast("string").alias(S.TARGETS))


def paired_comparison(eval_targets: DataFrame, topk: DataFrame, baseline_topk: DataFrame, ks: Sequence[int],
                      model: str, baseline: str, kind: str = "i2i", baseline_kind: str = "i2i",
                      run_ts: Optional[dt.datetime] = None) -> List[dict]:
    """``model``'s lists ``topk`` against ``baseline``'s: :func:`paired_comparisons` of one pair."""
    if (model, kind) == (baseline, baseline_kind):
        raise ValueError(f"paired_comparison: {model!r} ({kind}) against itself")
    lists = {(model, kind): topk, (baseline, baseline_kind): baseline_topk}
    return paired_comparisons(eval_targets, lists, [((model, kind), (baseline, baseline_kind))], ks, run_ts)[0]


def paired_comparisons(eval_targets: DataFrame, lists: Optional[Mapping[Tuple[str, str], DataFrame]],
                       pairs: Sequence[Tuple[Tuple[str, str], Tuple[str, str]]], ks: Sequence[int],
                       run_ts: Optional[dt.datetime] = None, ranks: Optional[TargetRanks] = None) -> List[List[dict]]:
    """Models against baselines on the same eval targets, user by user: for each of ``pairs``, rows
    of the ``metrics_paired`` contract, one per Pre@K and one for MRR. ``lists``: {(name, kind):
    lists} (kind "i2i": ``i2i_topk`` rows, "u2i": ``u2i_topk`` rows), read only without ``ranks``
    (None then); ``pairs``: ((model, kind), (baseline, kind)) keys of ``lists`` (or of ``ranks``).

    Each target gets both models' values (hit within K, or reciprocal rank; 0 for a miss, as in
    :func:`score_lists`); the difference d = model - baseline is averaged over all targets, with
    a 95 % interval mean(d) +- 1.96 sd(d) / sqrt(n) and a two-sided p-value from z = mean / (sd /
    sqrt(n)) (the paired t-test at large n; for hits close to McNemar's test of wins vs losses; when
    every user's difference is the same, the sign test; NaN for a single user). Paired,
    because the two models see the same users: most of the user-to-user spread cancels, and the
    interval says whether a difference of a few tenths of a percent is more than noise.

    One pass for every pair: each target's ranks in every list side by side, from :func:`target_ranks`
    (``ranks``: (model, kind) as ``lists``' keys; computed from ``lists`` when not given), only
    targets some list hits (a target no list hits adds 0 to every sum), then one aggregation; no
    per-user rows leave Spark. A target listed twice in ``eval_targets`` counts twice, as in
    :func:`score_lists`.
    """
    run_ts = run_ts or dt.datetime.now(dt.timezone.utc).replace(microsecond=0, tzinfo=None)
    ids = {key: i for i, key in enumerate(dict.fromkeys(k for pair in pairs for k in pair))}
    if ranks is None:
        if lists is None:
            raise ValueError("paired_comparisons: neither lists nor ranks")
        ranks = target_ranks(eval_targets, [(kind, lists[(name, kind)].withColumn(S.MODEL, F.lit(name)), [name])
                                            for name, kind in ids], check=False)
    ranks.require(ids, "paired_comparisons")
    spark = eval_targets.sparkSession
    tags = spark.createDataFrame([(name, kind, i) for (name, kind), i in ids.items()],
                                 f"{S.MODEL} string, kind string, list int")
    tagged = ranks.rows.join(F.broadcast(tags), [S.MODEL, "kind"]).select(*_TARGET, "w", "list", S.RANK)
    # each target's rank in every list (null: not in it), targets hit by some list only
    wide = tagged.groupBy(*_TARGET, "w").pivot("list", list(ids.values())).agg(F.min(S.RANK))
    # Exact sums (integers; decimals for MRR), the mean and spread taken from them on the driver: a rerun
    # gives the same bits whatever order the shuffle merges partial sums in.
    aggs, metrics = [], [*ks, None]
    for p, (ka, kb) in enumerate(pairs):
        ra, rb = F.col(f"`{ids[ka]}`"), F.col(f"`{ids[kb]}`")
        for i, k in enumerate(metrics):
            a, b = ((F.when(ra <= k, 1).otherwise(0), F.when(rb <= k, 1).otherwise(0)) if k is not None
                    else (_reciprocal(ra), _reciprocal(rb)))
            # w as a decimal(10,0): a decimal(20,18) times a long (a decimal(20,0)) would be a
            # decimal(38,15), each reciprocal rounded to 15 places; times a decimal(10,0), exact
            d, count = a - b, F.col("w")
            w = count.cast("decimal(10,0)") if k is None else count
            aggs += [F.sum(a * w).alias(f"a{p}_{i}"), F.sum(b * w).alias(f"b{p}_{i}"), F.sum(d * w).alias(f"d{p}_{i}"),
                     F.sum((d * d if k is not None else (d * d).cast(_RECIPROCAL)) * w).alias(f"q{p}_{i}"),
                     F.sum(F.when(d > 0, count).otherwise(0)).alias(f"w{p}_{i}"),
                     F.sum(F.when(d < 0, count).otherwise(0)).alias(f"l{p}_{i}")]
    n_users = eval_targets.agg(F.count(F.lit(1)).alias("n"))
    agg = wide.agg(*aggs).crossJoin(n_users).collect()[0]  # one row
    n = agg["n"]
    if n == 0:
        raise InvalidInput("eval_targets is empty: nothing to compare")
    out = []
    for p, ((model, kind), (baseline, baseline_kind)) in enumerate(pairs):
        rows, (hit_name, mrr_name) = [], metric_names(kind)
        for i, k in enumerate(metrics):
            # a sum over no hit at all is null: 0
            sum_a, sum_b, sum_d, sum_dd = (Fraction(agg[f"{c}{p}_{i}"] or 0) for c in "abdq")
            var = (sum_dd - sum_d * sum_d / n) / (n - 1) if n > 1 else Fraction(0)  # stddev_samp's; 0 for one user
            mean, sd = float(sum_d / n), math.sqrt(max(var, 0))
            wins, losses = agg[f"w{p}_{i}"] or 0, agg[f"l{p}_{i}"] or 0
            lo, hi, pv = paired_stats(mean, sd, n, wins, losses, hits=k is not None)
            rows.append({S.MODEL: model, S.BASELINE: baseline, S.METRIC: hit_name if k is not None else mrr_name,
                         S.K: k, "baseline_kind": baseline_kind,
                         S.VALUE: float(sum_a / n), "baseline_value": float(sum_b / n), "diff": mean,
                         "ci_low": lo, "ci_high": hi, "p_value": pv,
                         "wins": wins, "losses": losses, S.N_USERS: n, S.RUN_TS: run_ts})
        out.append(rows)
    return out


def comparison_key(row: dict) -> Tuple[str, str, str, str]:
    """(model, the model's list kind, baseline, the baseline's list kind) of a ``metrics_paired`` row:
    one comparison, whose rows are its K's and MRR. A model with i2i and u2i lists compared with a
    baseline that has i2i lists only makes two."""
    return (row[S.MODEL], "u2i" if row[S.METRIC].startswith("u2i_") else "i2i", row[S.BASELINE], row["baseline_kind"])


def comparison_name(key: Tuple[str, str, str, str]) -> str:
    """"natm vs cooc", "dat u2i vs two_tower u2i": as :func:`format_paired` heads it."""
    m, mk, b, bk = key
    return f"{m}{' u2i' if mk == 'u2i' else ''} vs {b}{' u2i' if bk == 'u2i' else ''}"


def stale_comparisons(overall: Sequence[dict], paired: Sequence[dict], tol: float = 1e-9) -> Dict[tuple, str]:
    """The comparisons of ``metrics_paired`` rows that ``metrics`` no longer agrees with, by
    :func:`comparison_key`, each with the reason.

    A comparison is stale when the model's or the baseline's value in it (or its eval-user count) is
    not the value of a later (or the same) evaluation of theirs in ``overall`` (``metrics`` rows with
    category_id null): the baseline was evaluated again on other lists (another window, a retrained
    model), or a run of jobs.evaluate was killed between its two commits, its metrics new and its
    comparisons the earlier run's. A side whose ``metrics`` row is older than the comparison says
    nothing about it (a baseline is compared with, not scored: its row can predate lists or eval
    targets the comparison read), nor one with no row. Values are compared within ``tol``: the two
    tables sum the same ranks in other orders. The reason names the first metric (by K, then MRR)
    that differs."""
    scored = {(r[S.MODEL], r[S.METRIC], r[S.K]): r for r in overall if r[S.CATEGORY_ID] is None}
    out: Dict[tuple, str] = {}
    for r in sorted(paired, key=lambda r: (comparison_key(r), metric_order(r))):
        key = comparison_key(r)
        if key in out:
            continue
        hit, mrr = metric_names(r["baseline_kind"])
        sides = ((r[S.MODEL], (r[S.MODEL], r[S.METRIC], r[S.K]), r[S.VALUE]),
                 (r[S.BASELINE], (r[S.BASELINE], hit if r[S.K] is not None else mrr, r[S.K]), r["baseline_value"]))
        for who, at, value in sides:
            now = scored.get(at)
            if now is None or now[S.RUN_TS] < r[S.RUN_TS]:
                continue
            if now[S.N_USERS] != r[S.N_USERS] or abs(now[S.VALUE] - value) > tol:
                name = " ".join(display_name(*at))
                out[key] = (f"{name} is {now[S.VALUE]:.4f} over {now[S.N_USERS]:,} eval users in metrics (run "
                            f"{now[S.RUN_TS]}), {value:.4f} over {r[S.N_USERS]:,} in the comparison (run {r[S.RUN_TS]})")
                break
    return out


def format_paired(rows: Sequence[dict]) -> str:
    """``metrics_paired`` rows of one model and baseline as a text table, Pre@K by K, then MRR."""
    if not rows:
        return ""
    rows = sorted(rows, key=metric_order)
    r0 = rows[0]
    w = max(11, len(r0[S.MODEL]) + 2, len(r0[S.BASELINE]) + 2)  # the two value columns, named by model
    lines = [f"{comparison_name(comparison_key(r0))}, paired over {r0[S.N_USERS]:,} eval users (95 % interval of "
             f"the difference; run {r0[S.RUN_TS]})",
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
