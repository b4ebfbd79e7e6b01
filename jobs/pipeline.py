"""The main job: run the stages for one config, every table under ``warehouse``.

    python -m jobs.pipeline --conf conf/synthetic.yaml [--set warehouse=DIR]

Stages: generate (synthetic configs only) -> ingest -> sequences -> graph -> samples -> train -> embed
-> topk -> recent -> baselines -> evaluate. For the baselines (``model`` = pop | cooc) the topk stage
writes their lists and samples/train/embed are skipped; recent (each user's list fused from the i2i
lists of their last items, model ``<model>_recent``) runs when ``recent.triggers`` > 0. For a learned
model, the baselines stage builds the lists (topk, recent) of every baseline named in
``eval.compare_to``, and evaluate scores them beside the model and compares the model with them.

A stage is skipped when its config, its inputs (Delta table ids and versions, one model's files of a
shared table, source files) and its outputs are what they were when it last finished: the state
lives in ``<warehouse>/_pipeline/`` (a local or mounted warehouse only: under a URI every stage runs). ``--from
STAGE`` reruns from that stage on, ``--force`` reruns everything; evaluate always runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
import time
import uuid
from typing import Optional, Sequence
from urllib.parse import unquote, urlparse

from ml import schemas as S
from ml.config import Config, ConfigError
from ml.data import io
from ml.data.delta_files import is_uri
from ml.data.formats import source_files
from ml.data.session import get_spark

from jobs import baseline, embed, evaluate, generate, graph, ingest, recent, samples, sequences, topk, train
from jobs._cli import command, parse, print_tables

log = logging.getLogger("jobs.pipeline")

STAGES = ("generate", "ingest", "sequences", "graph", "samples", "train", "embed", "topk", "recent", "baselines",
          "evaluate")


PER_MODEL = ("train", "embed", "topk", "recent")


def _stage_io(cfg: Config, stage: str) -> tuple[list, list, list]:
    """(config keys, inputs, outputs) of a stage; inputs/outputs are table names (``table[M]``: the
    ``model = M`` partition of a table every model shares) or file paths. Inputs are what the
    stage's job reads, keys the config it uses: anything else would rerun it for nothing."""
    from jobs.recent import model_name
    from jobs.train import _INPUTS, _NOT_SETTINGS, SAMPLES_GUARDS

    m = cfg.model
    model_dir = os.path.join("models", m)
    learned = m not in baseline.BASELINES
    user_model = m in embed.USER_MODELS  # DAT / two-tower also have the user side
    users, u2i = ([f"{S.T_USER_EMBEDDINGS}[{m}]"], [f"{S.T_U2I_TOPK}[{m}]"]) if user_model else ([], [])
    # plus where it trains: batch_size and max_steps are per rank and the reader shards by rank, so
    # the number of processes changes the model, and the device decides what train.amp=auto means
    train_keys = [f"train.{k}" for k in dataclasses.asdict(cfg.train) if k not in _NOT_SETTINGS] + [
        "train.launcher", "train.num_processes", "train.device"]
    section = "natm" if m == "natm" else "dat"
    train_io = (["seed", "model", *train_keys, section] + (["samples.num_negatives"] if m == "natm" else []),
                list(_INPUTS[section]))  # the tables the training reads
    index_keys = ["seed", "model", "baseline.k", "baseline.index", "baseline.exact_max", "baseline.nlist",
                  "baseline.nprobe"]
    return {
        "generate": (["seed", "generate"], [], [cfg.generate.table]),
        "ingest": (["ingest", "generate.table"], ["@source"],
                   [S.T_ACTIONS, S.T_ACTIONS_REJECTED, S.T_ITEMS, S.T_USERS, S.T_COMPANIONS_REJECTED]
                   + ([S.T_ID_KEYS] if cfg.ingest.string_ids else [])),
        "sequences": (["sequences"], [S.T_ACTIONS], [S.T_SEQUENCES, S.T_EVAL_TARGETS]),
        "graph": (["graph"], [S.T_SEQUENCES], [S.T_ITEM_GRAPH, S.T_ITEM_COUNTS]),
        "samples": (["seed", *[f"samples.{k}" for k in dataclasses.asdict(cfg.samples) if k not in SAMPLES_GUARDS]],
                    [S.T_SEQUENCES, S.T_ITEMS, S.T_USERS],
                    ["samples_natm", "samples_dat", "noise_q"]),
        "train": (*train_io, [os.path.join(model_dir, "model.pt")]),
        "embed": (["model"], [os.path.join(model_dir, "model.pt"), "noise_q", S.T_ITEMS]
                  + ([S.T_SEQUENCES] if user_model else []), [f"{S.T_ITEM_EMBEDDINGS}[{m}]"] + users),
        "topk": ((index_keys, [f"{S.T_ITEM_EMBEDDINGS}[{m}]"] + users, [f"{S.T_I2I_TOPK}[{m}]"] + u2i) if learned
                 else (["model", "baseline", "graph.max_user_length"], [S.T_SEQUENCES, S.T_ITEMS],
                       [f"{S.T_I2I_TOPK}[{m}]"])),
        "recent": (["model", "recent"], [S.T_SEQUENCES, f"{S.T_I2I_TOPK}[{m}]"],
                   [f"{S.T_U2I_TOPK}[{model_name(cfg)}]"]),
    }[stage]


_PARTITION = re.compile(r"(.+)\[(.+)\]")


def _state(cfg: Config, name: str) -> object:
    """What a table or file is now: a Delta table's id and version (a table deleted and written again
    starts at version 0 again, with a new id), the files of one model's partition of a shared
    table, or (size, mtime) of files; None when absent."""
    if name == "@source":
        if not cfg.ingest.path:
            return _state(cfg, cfg.generate.table)
        if is_uri(cfg.ingest.path) and not cfg.ingest.path.startswith("file:"):  # file: is read here
            try:  # a Delta source has an id and a version wherever it is
                if io.table_exists(cfg.ingest.path):
                    return [_table_state(cfg.ingest.path)]
            except Exception:  # noqa: BLE001 - delta-rs cannot reach it (credentials, scheme)
                pass
            return time.time()  # files this process cannot stat (s3a://, dbfs:/): never taken as unchanged
        states = [(p, _source_state(p)) for p in source_files(cfg.ingest)]
        if all(st is None for _, st in states) or dict(states).get(cfg.ingest.path, 0) is None:
            # nothing this process can stat: a path Spark resolves on the cluster's file system (HDFS, a
            # mount only the executors have); taken as unchanged, new data there was never ingested
            return time.time()
        return states
    part = _PARTITION.fullmatch(name)
    if part:
        return _partition_state(cfg.table_path(part[1]), part[2])
    path = name if os.path.isabs(name) else cfg.table_path(name)
    if io.table_exists(path):
        return _table_state(path)
    return _path_state(path)


def _source_state(path: str) -> object:
    """A source path's state: a Delta table's, a file's or folder's, or, for a glob, of every file it
    matches (``file:`` paths read locally); None when nothing is there."""
    if path.startswith("file:"):
        path = unquote(urlparse(path).path)
    if io.table_exists(path):
        return _table_state(path)
    state = _path_state(path)
    if state is None and glob.has_magic(path):
        matched = sorted(glob.glob(path))
        if matched:
            return hashlib.sha256(json.dumps([(m, _path_state(m)) for m in matched]).encode()).hexdigest()
    return state


def _table_state(path: str) -> list:
    from deltalake import DeltaTable

    dt = DeltaTable(io.table_uri(path))
    return [dt.metadata().id, io.data_version(path)]  # a vacuum's commits change no data: not a new state


def _partition_state(path: str, model: str) -> object:
    """The table's id and a hash of the data files of its ``model`` partition: another model's
    rewrite of its own partition leaves this one's state unchanged."""
    if not io.table_exists(path):
        return None
    from deltalake import DeltaTable

    from ml.data.delta_files import data_files

    dt = DeltaTable(io.table_uri(path))
    files = sorted(os.path.basename(f) for f, values in data_files(dt, path) if values.get(S.MODEL) == model)
    if not files:
        return None
    return [dt.metadata().id, hashlib.sha256(json.dumps(files).encode()).hexdigest()]


def _path_state(path: str) -> object:
    """(size, mtime) of a file, or of every file under a folder (a Parquet folder, a model dir),
    hashed; None when absent. Only ``path`` itself: the companion files a format reads beside
    its input are listed by :func:`ml.data.formats.source_files`, not found by walking the input's
    folder (which may hold the warehouse, or anything else)."""
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    stats, seen = [], set()
    # through symlinked folders, as Spark reads them (each real folder once: a link cycle ends)
    for root, dirs, files in os.walk(path, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        for f in sorted(files):
            st = os.stat(os.path.join(root, f))
            stats.append((os.path.relpath(os.path.join(root, f), path), st.st_size, st.st_mtime_ns))
    return hashlib.sha256(json.dumps(sorted(stats)).encode()).hexdigest()


# Keys added to a fingerprinted section after warehouses were built with it: at their default they
# change nothing the stage does, so they are left out of its fingerprint (with them in, an upgrade
# reran every stage of every warehouse once, training included).
ADDED_AT_DEFAULT = {"ingest.string_ids": False}
# Outputs added to a stage after warehouses were built: a state saved before them does not list them,
# and is compared without them (else an upgrade reran the stage and every stage after it, once).
ADDED_OUTPUTS = {S.T_COMPANIONS_REJECTED}


def _fingerprint(cfg: Config, stage: str) -> Optional[dict]:
    """The stage's config keys and the state of its inputs; None under a URI warehouse, where no
    state is kept (the state files are plain local files: under s3a:// or dbfs:/ they would land in
    a local folder of that name on the driver, lost in cluster deploy mode), so every stage runs."""
    if is_uri(cfg.warehouse):
        return None
    keys, inputs, _ = _stage_io(cfg, stage)
    conf = dataclasses.asdict(cfg)
    picked = {}
    for k in keys:
        v = conf
        for part in k.split("."):
            v = v[part]
        picked[k] = v
    for key, default in ADDED_AT_DEFAULT.items():  # left out while at their default
        section, name = key.split(".")
        if isinstance(picked.get(section), dict) and picked[section].get(name) == default:
            del picked[section][name]
    return {"config": picked, "inputs": {i: _state(cfg, i) for i in inputs}}


def _state_file(cfg: Config, stage: str) -> str:
    return cfg.table_path(os.path.join("_pipeline", f"{stage}-{cfg.model}.json" if stage in PER_MODEL else f"{stage}.json"))


def _up_to_date(cfg: Config, stage: str) -> bool:
    if is_uri(cfg.warehouse):  # no state kept there (_fingerprint): every stage runs
        return False
    try:
        saved = json.load(open(_state_file(cfg, stage)))
    except (OSError, ValueError):
        return False
    outputs, before = _stage_io(cfg, stage)[2], saved.get("outputs") or {}
    outputs = [o for o in outputs if o in before or o not in ADDED_OUTPUTS]
    return (saved.get("fingerprint") == json.loads(json.dumps(_fingerprint(cfg, stage)))
            and saved.get("outputs") == {o: _state(cfg, o) for o in outputs})


def _outputs_changed(cfg: Config, stage: str) -> bool:
    """Whether ``stage``'s output tables are no longer those its last finished run recorded (a run
    killed between its commits leaves some new); False without a record (its jobs run by hand, a
    URI warehouse) or where they cannot be read now. Inputs are not compared: a source only the
    cluster sees is always "changed"."""
    if is_uri(cfg.warehouse):
        return False
    try:
        saved = json.load(open(_state_file(cfg, stage))).get("outputs") or {}
        return any(saved[o] != json.loads(json.dumps(_state(cfg, o), default=str)) for o in saved)
    except Exception:  # noqa: BLE001 - only the warning is lost
        return False


def _record(cfg: Config, stage: str, fingerprint: Optional[dict]) -> None:
    if is_uri(cfg.warehouse):  # no state kept there (_fingerprint)
        return
    outputs = _stage_io(cfg, stage)[2]
    # An output table whose latest commit is another process's (a second pipeline on this warehouse
    # wrote it after this stage did): its state now is not what this stage wrote, and recorded it
    # would make the stage skip on that other job's data. Not recorded: the stage runs next time.
    foreign = [o for o in outputs if not _PARTITION.fullmatch(o) and not os.path.isabs(o)
               and io.table_exists(cfg.table_path(o)) and io.last_writer(cfg.table_path(o)) not in (io.PROCESS_ID, None)]
    if foreign:
        log.warning("stage %s (%s): %s committed by another job since; its state is not recorded (it runs "
                    "again next time)", stage, cfg.model, ", ".join(foreign))
        return
    path = _state_file(cfg, stage)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # a temporary file of this writer's own: two pipelines record a shared stage (the cooc lists: the
    # cooc pipeline's and a learned model's baselines stage) at once, and one name for both made one
    # writer's rename fail after the other's had taken the file
    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump({"fingerprint": fingerprint, "outputs": {o: _state(cfg, o) for o in outputs},
                       "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, f, indent=1, default=str)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def compared_baselines(cfg: Config) -> list:
    """The baselines of ``eval.compare_to`` (pop, cooc) that a learned model's pipeline builds itself."""
    if cfg.model in baseline.BASELINES:
        return []
    return [b for b in dict.fromkeys(cfg.eval.compare_to) if b in baseline.BASELINES]


def run(cfg: Config, spark=None, start_from: Optional[str] = None, force: bool = False) -> dict:
    spark = spark or get_spark(cfg.spark)
    if is_uri(cfg.warehouse):
        log.info("warehouse %s is a URI: stage state is not kept, every stage runs", cfg.warehouse)
    stages = list(STAGES)
    # generate only when ingest reads the generator's table
    if not (cfg.ingest.format == "delta" and not cfg.ingest.path):
        stages.remove("generate")
    if cfg.model in baseline.BASELINES:
        stages = [s for s in stages if s not in ("samples", "train", "embed")]
    if cfg.recent.triggers <= 0:
        stages.remove("recent")
    base_cfgs = [dataclasses.replace(cfg, model=b) for b in compared_baselines(cfg)]
    if not base_cfgs:
        stages.remove("baselines")
    if start_from:  # the stages before it are not run (their records stay as they are)
        before = [s for s in stages if STAGES.index(s) < STAGES.index(start_from) and s != "baselines"]
        stages = [s for s in stages if STAGES.index(s) >= STAGES.index(start_from)]
        changed = [s for s in before if _outputs_changed(cfg, s)]
        if changed:  # a run killed in one of them, or a table written by hand: said, not refused
            log.warning("--from %s: the tables of %s, not run, are not those %s last finished run wrote (a run "
                        "killed before it finished, or a table written since); the stages from %s read them as "
                        "they are", start_from, ", ".join(changed), "its" if len(changed) == 1 else "each one's",
                        start_from)
    if "train" in stages and (force or start_from is not None or not _up_to_date(cfg, "train")):
        # before ingest … samples have run for minutes; not when training is up to date (a model trained
        # on a GPU box, its lists rebuilt on a laptop); _run_stage checks again should earlier stages
        # change its inputs
        check_can_train(cfg)
    results = {}
    skipped = []
    for stage in stages:
        forced = force or (start_from is not None and STAGES.index(stage) >= STAGES.index(start_from))
        if stage == "baselines":  # each baseline's own topk / recent stages, with their own state
            subs = _baseline_stages(cfg, base_cfgs)
            done = {f"{b.model}.{sub}": _run_stage(b, sub, spark, forced) for b, sub in subs}
            results[stage] = {k: v for k, v in done.items() if v is not None}
            if not results[stage]:  # every baseline up to date: skipped, not also among the stages run
                skipped.append(stage)
                del results[stage]
            continue
        if stage == "evaluate":
            # Each stage was recorded with the fingerprint taken before it ran and the outputs it
            # wrote. Shared tables (i2i_topk, u2i_topk, the embeddings) are tracked per model
            # partition, so a later stage's write of another partition leaves those records true;
            # recording them again here, as the tables are at the end, also blessed a concurrent
            # job's writes (a stage then skipped on data it had never read).
            own = evaluate.default_models(cfg)
            models = own + [m for b in base_cfgs for m in evaluate.default_models(b) if m not in own]
            # the baselines are scored beside the model; their own comparisons (from their pipelines) stay
            results[stage] = _run_stage(cfg, stage, spark, forced, models=models, primary=own)
            continue
        results[stage] = _run_stage(cfg, stage, spark, forced)
        if results[stage] is None:
            skipped.append(stage)
            del results[stage]
    results["skipped"] = skipped
    return results


def check_can_train(cfg: Config) -> None:
    """The training settings the train stage would refuse, refused before any stage runs."""
    t = cfg.train
    if t.launcher == "torchrun" and t.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        raise ConfigError(f"train.launcher=torchrun with train.num_processes={t.num_processes}: the pipeline cannot "
                          "start torchrun itself; set train.launcher=distributor, or run the stages up to samples "
                          "here and jobs.train under torchrun")
    train.checkpoint_dir(cfg)  # a URI there is refused
    if t.launcher != "distributor" or t.distributor_local:  # on this machine: its device must exist
        from ml.train.distributed import resolve_device

        resolve_device(t.device)


def _baseline_stages(cfg: Config, base_cfgs: list) -> list:
    """(baseline config, stage): the topk, and recent when it is on, of each compared baseline."""
    subs = ["topk"] + (["recent"] if cfg.recent.triggers > 0 else [])
    return [(b, sub) for b in base_cfgs for sub in subs]


@contextlib.contextmanager
def _stage_lock(cfg: Config, stage: str):
    """Hold ``<state file>.lock`` while a stage is checked, run and recorded: a second pipeline on this
    warehouse (another model's) waits for the first's ingest, graph, ... and then skips them, where
    both used to run them and neither record them (the next run repeated them, training included).
    An advisory lock the kernel drops when its process dies, so a killed run leaves none behind; no
    lock where the file system takes none (nor under a URI warehouse, where no state is kept)."""
    if is_uri(cfg.warehouse):
        yield
        return
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    path = _state_file(cfg, stage) + ".lock"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("stage %s (%s): waiting for another pipeline on this warehouse to finish it (%s)",
                         stage, cfg.model, path)
                fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:  # a file system without locks (some network mounts): run unlocked
            log.warning("stage %s (%s): no lock on %s (%s); a concurrent pipeline may run it too", stage, cfg.model,
                        path, e)
        yield  # closing the file releases the lock


def _run_stage(cfg: Config, stage: str, spark, forced: bool, **kwargs) -> Optional[dict]:
    """Run one stage for ``cfg.model`` and record its state; None when it is up to date (skipped)."""
    if stage == "evaluate":  # not recorded, and two evaluations at once each commit their own rows
        return _run_stage_unlocked(cfg, stage, spark, forced, **kwargs)
    with _stage_lock(cfg, stage):
        return _run_stage_unlocked(cfg, stage, spark, forced, **kwargs)


def _run_stage_unlocked(cfg: Config, stage: str, spark, forced: bool, **kwargs) -> Optional[dict]:
    t = time.time()
    if stage != "evaluate" and not forced and _up_to_date(cfg, stage):
        log.info("stage %s (%s): inputs, config and outputs unchanged - skipped", stage, cfg.model)
        return None
    fingerprint = _fingerprint(cfg, stage) if stage != "evaluate" else None
    log.info("stage %s (%s) ...", stage, cfg.model)
    if stage == "train":
        check_can_train(cfg)
        # torch, no Spark; launcher from train.launcher. A killed run of this same training (its
        # checkpoints' settings and table versions are this run's) is continued, not trained again;
        # --force / --from start it over.
        result = train.run(cfg, resume=False if forced else train.SAME_RUN)
    elif stage == "topk" and cfg.model in baseline.BASELINES:
        result = baseline.run(cfg, spark)
    else:
        job = {"generate": generate, "ingest": ingest, "sequences": sequences, "graph": graph,
               "samples": samples, "embed": embed, "topk": topk, "recent": recent, "evaluate": evaluate}[stage]
        result = job.run(cfg, spark, **kwargs)
    if fingerprint is not None:
        _record(cfg, stage, fingerprint)
    log.info("stage %s (%s) done in %.1fs", stage, cfg.model, time.time() - t)
    return result


@command
def main(argv: Optional[Sequence[str]] = None) -> None:
    def extra(p):
        p.add_argument("--from", dest="start_from", choices=STAGES, help="rerun from this stage on")
        p.add_argument("--force", action="store_true", help="rerun every stage, changed or not")

    cfg, args = parse(__doc__, argv, extra)
    t = time.time()
    res = run(cfg, start_from=args.start_from, force=args.force)
    ing, seq = res.get("ingest"), res.get("sequences")
    print(f"\npipeline finished in {time.time() - t:.0f}s")
    if res["skipped"]:
        print(f"skipped (unchanged): {', '.join(res['skipped'])}")
    if ing:
        print(f"ingest: {ing['input_rows']:,} rows -> {ing['actions']:,} actions (about {ing['users']:,} users, "
              f"{ing['items']:,} items); rejected {ing['rejected'] or 'none'}")
    if seq:
        print(f"sequences: {seq['users']:,} users, {seq['train_actions']:,} training actions")
    if res.get("evaluate"):
        print(f"\nmetrics over all eval users ({cfg.model}):")
        print(res["evaluate"]["table"])
        if res["evaluate"]["paired"]:
            print(res["evaluate"]["paired"])
        print(f"report: {res['evaluate']['report']}")
    print("tables:")
    companions = [S.T_COMPANIONS_REJECTED] if cfg.ingest.format in ("ml1m", "sasrec") else []  # formats with companion files
    print_tables(cfg, ["actions", "actions_rejected", "items", "users"] + (["id_keys"] if cfg.ingest.string_ids else [])
                 + companions
                 + ["sequences", "eval_targets", "item_graph",
                       "item_counts"] + ([] if cfg.model in baseline.BASELINES else
                                         ["samples_natm", "samples_dat", "noise_q", "item_embeddings"])
                 + ["i2i_topk"]
                 + (["user_embeddings"] if cfg.model in embed.USER_MODELS else [])
                 + (["u2i_topk"] if cfg.model in embed.USER_MODELS or cfg.recent.triggers else []) + ["metrics"]
                 + (["metrics_paired"] if res.get("evaluate", {}).get("paired") else []))


if __name__ == "__main__":
    main()
