"""``i2i_topk`` + ``eval_targets`` -> ``metrics`` (Pre@K and MRR over all eval users; per category);
``u2i_topk`` too for models that have one (DAT / two-tower, and ``<model>_recent``: HR@K and MRR of the
user's last item). Without ``--model``: the config's model, and ``<model>_recent`` when
``recent.triggers`` > 0 (its lists are scored only then, or when named with ``--model``). With ``eval.compare_to`` (or ``--compare-to``), each model is also compared with
those baselines user by user into ``metrics_paired`` (difference, 95 % interval, p-value).

    python -m jobs.evaluate --conf conf/ml1m_natm.yaml --model pop --model cooc
    python -m jobs.evaluate --conf conf/ml1m_natm.yaml --model natm --compare-to cooc
"""
from __future__ import annotations

import datetime as dt
import logging
from typing import List, Optional, Sequence

from pyspark.sql import functions as F

from ml import schemas as S
from ml.config import Config
from ml.data import io
from ml.data.ingest import category_names
from ml.data.session import get_spark
from ml.errors import InvalidInput
from ml.eval.metrics import (comparison_key, comparison_name, format_paired, format_table, paired_comparisons,
                             score_lists, stale_comparisons, target_ranks, targets_fingerprint)

from jobs._cli import command, parse, print_tables

log = logging.getLogger("jobs.evaluate")


def _check_one_split(cfg: Config) -> None:
    """``eval_targets`` and ``sequences`` are one split, committed one after the other by one run of
    jobs.sequences: written by two runs, that run was killed between its commits, and the
    targets may be actions the lists were built from (a targets table of another split beside the
    sequences). Tables whose commits do not say who wrote them (another writer's) are not checked."""
    targets, sequences = cfg.table_path(S.T_EVAL_TARGETS), cfg.table_path(S.T_SEQUENCES)
    if io.written_by_two_runs(targets, sequences):
        raise InvalidInput(f"{targets} and {sequences} were written by different runs of jobs.sequences (one "
                           "killed between its two commits?): the targets may not be this split's; rerun "
                           "jobs.sequences (the pipeline reruns it and the stages after it)")


def _check_one_topk_run(cfg: Config, models: List[str]) -> None:
    """A model's ``i2i_topk`` and ``u2i_topk`` lists (DAT, two-tower) are committed one after the
    other by one run of jobs.topk: written by two runs, that run was killed between its commits (or
    found no user vectors), and one kind of list is another model's, scored as this one's."""
    i2i, u2i = cfg.table_path(S.T_I2I_TOPK), cfg.table_path(S.T_U2I_TOPK)
    for m in models:
        if io.written_by_two_runs(i2i, u2i, {S.MODEL: m}):
            raise InvalidInput(f"i2i_topk and u2i_topk of model {m!r} were written by different runs (jobs.topk "
                               "killed between its two commits?): one kind of list is of other vectors; rerun "
                               f"jobs.topk for model={m} (the pipeline reruns it)")


@io.job_run
def run(cfg: Config, spark=None, models: Optional[List[str]] = None,
        compare_to: Optional[List[str]] = None, primary: Optional[List[str]] = None) -> dict:
    """Evaluate ``models`` and compare each with the baselines. ``primary``: the models this run
    produced (default: all of ``models``); their earlier comparisons are replaced by this run's even
    when it makes none. A model evaluated only beside them (the pipeline's baselines, scored so the
    report has them) keeps its earlier comparisons unless this run compares it with something."""
    spark = spark or get_spark(cfg.spark)
    mode = cfg.io.delta_mode
    models = list(dict.fromkeys(models or default_models(cfg)))  # each once
    _check_one_split(cfg)
    # at one version: with the Delta jars an unpinned DataFrame reads the latest version at each action,
    # and the fingerprint, the ranks and the user counts are several (a sequences run committing in
    # between would divide one split's hits by the other's users)
    targets_path = cfg.table_path(S.T_EVAL_TARGETS)
    targets = io.read_table(spark, targets_path, version=io.table_version(targets_path), delta_mode=mode)
    items = None
    if cfg.eval.per_category and io.table_exists(cfg.table_path(S.T_ITEMS)):
        items = io.read_table(spark, cfg.table_path(S.T_ITEMS), delta_mode=mode)
    # each model's lists read from its own partition (its files only), every read at the version of now
    sources = [(kind, path, io.table_version(path)) for kind, path in
               (("i2i", cfg.table_path(S.T_I2I_TOPK)), ("u2i", cfg.table_path(S.T_U2I_TOPK))) if io.table_exists(path)]
    from jobs.recent import SUFFIX

    named = list(compare_to if compare_to is not None else cfg.eval.compare_to)
    # which of the models, the baselines and the baselines' fused lists (see _like_for_like) have rows
    # in each list table: from the tables' logs, before any data is read
    fused = [b + SUFFIX for b in named] if any(m.endswith(SUFFIX) for m in models) else []
    wanted = list(dict.fromkeys([*models, *named, *fused]))
    present = {kind: io.partitions_with_rows(spark, path, S.MODEL, wanted, version, mode)
               for kind, path, version in sources}

    def model_lists(model: str) -> list:
        """The kinds of list table the model has rows in (none: an empty list)."""
        return [kind for kind, _, _ in sources if model in present[kind]]

    run_ts = dt.datetime.now(dt.timezone.utc).replace(microsecond=0, tzinfo=None)
    # Every model and baseline is checked, and every metric and comparison computed, before anything
    # is written; then each table gets one commit for all the models (a run that fails before the
    # commits leaves both tables as they were; one killed between them, metrics new and metrics_paired
    # the earlier run's, both with their run_ts, until the next evaluation removes the comparisons that
    # metrics no longer agrees with: _drop_stale_comparisons).
    lists = {}
    for m in models:
        lists[m] = model_lists(m)
        if not lists[m]:
            raise InvalidInput(f"model {m!r} has no rows in i2i_topk or u2i_topk: run its topk (or recent) stage first")
    explicit = compare_to is not None
    baselines = {}
    for b in named:
        baselines[b] = lists.get(b) or model_lists(b)
        if not baselines[b]:
            base = b[: -len("_recent")] if b.endswith("_recent") else None
            how = (f"the pipeline with model={base} and recent.triggers > 0" if base
                   else f"the pipeline with model={b}")
            msg = f"baseline {b!r} has no rows in i2i_topk or u2i_topk (run {how} into this warehouse first)"
            if explicit:  # asked for on the command line: an error; from the config (nightly): a warning
                raise InvalidInput(f"--compare-to: {msg}")
            log.warning("eval.compare_to: %s; no comparison with it", msg)
    # the lists each comparison will read
    compared = {m: [_like_for_like(m, b, base, lists, model_lists) for b, base in baselines.items()
                    if m != b and base] for m in models}
    used = set(models) | {b for pairs in compared.values() for b, _ in pairs}
    _check_one_topk_run(cfg, sorted(m for m in used if len(lists.get(m) or model_lists(m)) == 2))
    targets_id = targets_fingerprint(targets)
    # every list an eval target reads, of every model scored or compared, checked and looked up in one
    # pass per table; the ranks (one row per eval target and list that holds it) serve the metrics and
    # the comparisons both
    parts = []
    for kind, path, version in sources:
        read = sorted(used & present[kind])
        if read:
            parts.append((kind, io.read_table(spark, path, version=version, delta_mode=mode,
                                              partitions={S.MODEL: read}), read))
    ranks = target_ranks(targets, parts, persist=True)
    _warn_short_lists(ranks.longest, max(cfg.eval.ks))
    try:
        # every model's lists, of both kinds, scored in one aggregation
        scored = [(kind, t, [m for m in models if m in read]) for kind, t, read in parts]
        metrics = score_lists(targets, [p for p in scored if p[2]], list(cfg.eval.ks), items, run_ts, targets_id,
                              ranks=ranks).localCheckpoint()
        # every comparison, of every model, in one more: (model, kind) against (baseline, kind) lists
        pairs = []
        for m in models:
            done = set()
            for b, base in compared[m]:
                if b in done:  # asked for both cooc and cooc_recent: one comparison with cooc_recent
                    continue
                done.add(b)
                for kind in lists[m]:  # the baseline's lists of the same kind when it has them, else its first
                    pairs.append(((m, kind), (b, kind if kind in base else base[0])))
        by_pair = (paired_comparisons(targets, None, pairs, list(cfg.eval.ks), run_ts, ranks=ranks)
                   if pairs else [])
    finally:
        ranks.unpersist()
    _add_targets_column(spark, cfg)
    version = io.write_table(spark, metrics, cfg.table_path(S.T_METRICS), mode="overwrite", partition_by=[S.MODEL],
                             replace_where={S.MODEL: list(models)}, delta_mode=mode)
    written = io.read_table(spark, cfg.table_path(S.T_METRICS), version=version, delta_mode=mode,
                            partitions={S.MODEL: list(models)}).where(F.col(S.CATEGORY_ID).isNull())
    by_model: dict = {}
    for r in written.collect():  # models x (len(ks) + 1) x kinds rows
        by_model.setdefault(r[S.MODEL], []).append(r.asDict())
    rows = [r for m in models for r in by_model.get(m, [])]
    paired, all_prs, replaced = [], [], []
    for m in models:
        prs = []
        for ((model, _), _), prs_pair in zip(pairs, by_pair):
            if model == m:
                paired.append(format_paired(prs_pair))
                log.info("%s", paired[-1])
                prs += prs_pair
        # a produced model's comparisons are this run's: earlier ones (other lists, other baselines) go
        if prs or primary is None or m in primary:
            replaced.append(m)
            all_prs += prs
    # the other models' comparisons that these metrics no longer agree with go in the same commit
    replaced, all_prs = _drop_stale_comparisons(cfg, spark, version, rows, replaced, all_prs)
    if replaced and (all_prs or io.table_exists(cfg.table_path(S.T_METRICS_PAIRED))):
        io.write_table(spark, spark.createDataFrame(all_prs, S.METRICS_PAIRED), cfg.table_path(S.T_METRICS_PAIRED),
                       mode="overwrite", partition_by=[S.MODEL, S.BASELINE], replace_where={S.MODEL: replaced},
                       delta_mode=mode)
    table = format_table(rows, list(cfg.eval.ks))
    log.info("metrics\n%s", table)
    report = write_evaluation_report(cfg, spark, rows[0][S.N_USERS], targets_id)  # every model's rows: every eval user
    log.info("report: %s", report)
    return {"rows": rows, "table": table, "report": report, "paired": "\n\n".join(paired)}


def _warn_short_lists(longest: dict, k: int) -> None:
    """A model whose lists (those the eval targets read) all hold fewer than the largest K items
    scores the same at every K past its lists' length: Pre@100 of 10-item lists is their Pre@10, and a
    comparison with 100-item lists is between unequal lists. Named in a warning (not an error: in a
    catalogue of fewer than K + 1 items every list is short)."""
    for (m, kind), n in sorted(longest.items()):
        if n < k:
            stage = "recent stage with recent.k" if m.endswith("_recent") else "topk (or baseline) stage with baseline.k"
            log.warning("%s: its %s lists hold at most %d items, and eval.ks goes to %d: its metrics at K > %d "
                        "are those of the %d-item lists (rerun its %s >= %d; fine where the catalogue has "
                        "no more items)", m, kind, n, k, n, n, stage, k)


def _drop_stale_comparisons(cfg: Config, spark, version: int, scored: List[dict], replaced: List[str],
                            rows: List[dict]):
    """(models whose partitions of metrics_paired to replace, their rows): this run's, plus the models of
    earlier comparisons that ``metrics`` at ``version`` no longer agrees with
    (:func:`~ml.eval.metrics.stale_comparisons`: their baseline evaluated again on other lists since,
    or a run killed between the two commits), each rewritten without those comparisons, which are named
    in a warning with the command that makes them again. ``scored``: this run's overall ``metrics``
    rows, as written at ``version``; those of the other models the comparisons name are read."""
    path = cfg.table_path(S.T_METRICS_PAIRED)
    if not io.table_exists(path):
        return replaced, rows
    mode = cfg.io.delta_mode
    # models x baselines x (K + 1) rows and models x kinds x (K + 1) rows: small
    earlier = io.read_table(spark, path, delta_mode=mode)
    if replaced:
        earlier = earlier.where(~F.col(S.MODEL).isin(*replaced))
    kept = [r.asDict() for r in earlier.collect()]
    if not kept:
        return replaced, rows
    others = sorted({m for r in kept for m in (r[S.MODEL], r[S.BASELINE])} - {r[S.MODEL] for r in scored})
    overall = list(scored)
    if others:
        overall += [r.asDict() for r in io.read_table(spark, cfg.table_path(S.T_METRICS), version=version,
                                                      delta_mode=mode, partitions={S.MODEL: others})
                    .where(F.col(S.CATEGORY_ID).isNull()).collect()]
    stale = stale_comparisons(overall, kept)
    for key, why in sorted(stale.items()):
        log.warning("metrics_paired: %s no longer agrees with metrics (%s): removed; rerun jobs.evaluate "
                    "--model %s --compare-to %s to compare them again", comparison_name(key), why, key[0], key[2])
    touched = sorted({key[0] for key in stale})
    return ([*replaced, *touched],
            rows + [r for r in kept if r[S.MODEL] in touched and comparison_key(r) not in stale])


def _add_targets_column(spark, cfg: Config) -> None:
    """A ``metrics`` table written before the ``targets`` column: rewritten once with it (null for its
    rows, whose targets were not recorded), so that this run's rows, which have it, can be added."""
    path = cfg.table_path(S.T_METRICS)
    if not io.table_exists(path):
        return
    for attempt in range(io.COMMIT_ATTEMPTS):
        version = io.table_version(path)
        old = io.read_table(spark, path, version=version, delta_mode=cfg.io.delta_mode)
        if S.TARGETS in old.columns:  # (another evaluation may have added it meanwhile)
            return
        log.info("metrics: adding the targets column (null for the %s rows written before it)", path)
        # a rewrite of every model's rows from this read: it fails, rather than replace another job's
        # newer rows with this copy, if that job committed since; then read again
        try:
            io.write_table(spark, old.withColumn(S.TARGETS, F.lit(None).cast("string")).localCheckpoint(), path,
                           mode="overwrite", partition_by=[S.MODEL], delta_mode=cfg.io.delta_mode,
                           overwrite_schema=True, base_version=version)
            return
        except io.ConcurrentWriteError:
            if attempt == io.COMMIT_ATTEMPTS - 1:
                raise


def _like_for_like(model: str, b: str, base: list, lists: dict, model_lists) -> tuple:
    """A fused recent-items model (``natm_recent``) is compared with the baseline's fused lists
    (``cooc_recent``) when they exist: the same fusion over the other model's lists. Otherwise, and
    for every other model, with the baseline itself."""
    from jobs.recent import SUFFIX

    fused = b + SUFFIX
    if not model.endswith(SUFFIX) or model == fused:
        return b, base
    fused_lists = lists.get(fused) or model_lists(fused)
    return (fused, fused_lists) if fused_lists else (b, base)


def default_models(cfg: Config) -> List[str]:
    """The config's model, and its fused recent-items lists when the recent stage is on."""
    from jobs.recent import model_name

    return [cfg.model] + ([model_name(cfg)] if cfg.recent.triggers > 0 else [])


def write_evaluation_report(cfg: Config, spark, n_users: int, targets_id: str) -> str:
    """Report over every model in the metrics table; ``n_users`` and ``targets_id``: today's eval
    users and their :func:`~ml.eval.metrics.targets_fingerprint`, beside which the models scored on
    other targets are named."""
    import os

    from ml.eval.report import HITS, MAX_CATEGORIES, category_k, read_loss_curve, write_report

    mode = cfg.io.delta_mode
    metrics = io.read_table(spark, cfg.table_path(S.T_METRICS), delta_mode=mode)
    # to the driver: the overall rows (models x metrics x K) and, of the per-category rows (x categories:
    # 10⁵ hashed category keys are millions of rows), those the plot shows: its K, the categories with
    # the most eval users
    cat = F.col(S.CATEGORY_ID)
    plotted = metrics.where(cat.isNotNull() & (F.col(S.K) == category_k(cfg.eval.ks)) & F.col(S.METRIC).isin(*HITS))
    top = (plotted.groupBy(S.CATEGORY_ID).agg(F.max(S.N_USERS).alias("users"))
           .orderBy(F.desc("users"), S.CATEGORY_ID).limit(MAX_CATEGORIES).select(S.CATEGORY_ID))
    all_rows = [r.asDict() for r in metrics.where(cat.isNull()).unionByName(plotted.join(top, S.CATEGORY_ID))
                .collect()]
    overall = [r for r in all_rows if r[S.CATEGORY_ID] is None]
    names = None
    if io.table_exists(cfg.table_path(S.T_ITEMS)):
        # the names of the categories the plot shows
        names = category_names(io.read_table(spark, cfg.table_path(S.T_ITEMS), delta_mode=mode),
                               {r[S.CATEGORY_ID] for r in all_rows if r[S.CATEGORY_ID] is not None})
    models = sorted({r[S.MODEL] for r in all_rows})
    curves = {m: read_loss_curve(cfg.table_path(os.path.join("models", m, "train_metrics.jsonl"))) for m in models}
    paired, paired_text = [], ""
    if io.table_exists(cfg.table_path(S.T_METRICS_PAIRED)):  # models x baselines x (K + 1) rows: small
        table = io.read_table(spark, cfg.table_path(S.T_METRICS_PAIRED), delta_mode=mode)
        paired = [r.asDict() for r in table.collect()]
        groups: dict = {}
        for r in paired:
            groups.setdefault(comparison_key(r), []).append(r)
        paired_text = "\n\n".join(format_paired(g)
                                   for _, g in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])))
    table_text = format_table(overall, list(cfg.eval.ks))
    # metrics keeps each model's latest evaluation: a model not scored since the eval targets changed
    # would sit beside the others on other users
    # (by the targets' fingerprint: the validation and test splits of ML-1M have the same 6,040 users;
    # rows written before the fingerprint by their user count)
    def other_targets(r: dict) -> bool:
        return r[S.TARGETS] != targets_id if r[S.TARGETS] else r[S.N_USERS] != n_users

    stale = sorted({r[S.MODEL] for r in overall if other_targets(r)})
    if stale:
        note = (f"note: {', '.join(stale)} were scored on other eval targets than today's {n_users:,} users "
                f"(rerun jobs.evaluate --model for them before comparing)")
        log.warning("report: %s", note)
        table_text = note + "\n\n" + table_text
    return write_report(cfg.table_path("report"), all_rows, list(cfg.eval.ks), table_text,
                        curves, names, title=f"spark-i2i evaluation ({cfg.warehouse})", paired=paired,
                        paired_text=paired_text)


@command
def main(argv: Optional[Sequence[str]] = None) -> None:
    def extra(p):
        p.add_argument("--model", action="append", help="model(s) to evaluate (default: the config's model, and <model>_recent "
                                                        "when recent.triggers > 0)")
        p.add_argument("--compare-to", action="append", metavar="BASELINE",
                       help="compare each model with this baseline user by user (default: eval.compare_to)")

    cfg, args = parse(__doc__, argv, extra)
    out = run(cfg, models=args.model, compare_to=args.compare_to)
    print(out["table"])
    if out["paired"]:
        print(out["paired"])
    print_tables(cfg, [S.T_METRICS])
    print(f"  {'report':<18} {out['report']}")


if __name__ == "__main__":
    main()
