"""``sequences`` + ``i2i_topk`` -> ``u2i_topk`` (model ``<model>_recent``): each user's list fused from
the i2i lists of their last ``recent.triggers`` items (see ``ml/index/recent.py``).

    python -m jobs.recent --conf conf/ml1m_natm.yaml --set model=cooc --set recent.triggers=5
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

from ml import schemas as S
from ml.config import Config, ConfigError
from ml.data import io
from ml.data.session import get_spark
from ml.errors import InvalidInput
from ml.index.recent import fuse_recent

from jobs._cli import command, parse, print_tables
from jobs.baseline import BASELINES

log = logging.getLogger("jobs.recent")
SUFFIX = "_recent"


def model_name(cfg: Config) -> str:
    """The ``u2i_topk`` / ``metrics`` model of the fused lists of ``cfg.model``."""
    return cfg.model + SUFFIX


@io.job_run
def run(cfg: Config, spark=None) -> dict:
    if cfg.recent.triggers <= 0:
        raise ConfigError("recent.triggers=0: set the number of recent items to fuse (e.g. --set recent.triggers=5)")
    spark = spark or get_spark(cfg.spark)
    mode = cfg.io.delta_mode
    i2i_path = cfg.table_path(S.T_I2I_TOPK)
    # a baseline's lists come from its own job, a trained model's from the topk job
    make = (f"jobs.baseline --model {cfg.model}" if cfg.model in BASELINES
            else f"the topk stage (jobs.topk) for model={cfg.model}")
    if not io.table_exists(i2i_path):
        raise InvalidInput(f"{i2i_path} does not exist: run {make} first")
    i2i = io.read_table(spark, i2i_path, delta_mode=mode, partitions={S.MODEL: [cfg.model]})
    if not i2i.limit(1).count():
        raise InvalidInput(f"i2i_topk has no rows for model={cfg.model!r}: run {make} first (a run that wrote "
                           f"none has said why)")
    seqs = io.read_table(spark, cfg.table_path(S.T_SEQUENCES), delta_mode=mode)
    name = model_name(cfg)
    lists = fuse_recent(seqs, i2i, cfg.recent, name)
    r = cfg.recent
    # before: evaluate said "run its topk (or recent) stage first", of the stage that had just run
    version, n = io.replace_model_partition(spark, lists, cfg.table_path(S.T_U2I_TOPK), name, mode,
                                            refuse_empty=lambda: InvalidInput(
                                                f"u2i_topk[{name}]: every user's list is empty: the items "
                                                f"recent.exclude={r.exclude} leaves out cover every item of their "
                                                f"lists in i2i_topk[{cfg.model}] (a catalogue of a few items?); "
                                                "--set recent.triggers=0 leaves the stage out; the fused lists "
                                                "are left as they were"))
    log.info("u2i_topk[%s]: %d rows (last %d items, decay %g, rrf_k %g, k %d, excluding %s), version %d",
             name, n, r.triggers, r.decay, r.rrf_k, r.k, r.exclude, version)
    return {"model": name, "rows": n, "version": version}


@command
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg, _ = parse(__doc__, argv)
    out = run(cfg)
    print(f"u2i_topk[{out['model']}]: {out['rows']:,} rows")
    print_tables(cfg, [S.T_U2I_TOPK])


if __name__ == "__main__":
    main()
