"""Train the configured model (``model`` = natm | dat | two_tower) from its sample table.

    python -m jobs.train --conf conf/ml1m_natm.yaml [--resume]
    torchrun --standalone --nproc_per_node=2 -m jobs.train --conf conf/ml1m_natm.yaml --set train.launcher=torchrun
    python -m jobs.train --conf ... --set train.launcher=distributor --set train.num_processes=2

Rank 0 logs, writes checkpoints under ``train.checkpoint_dir`` (default <warehouse>/checkpoints/<model>)
and next to them per-step metrics as JSON lines, and at the end the model artifact
<warehouse>/models/<model>/model.pt that the embed job loads, with the metrics and run.json. Under a
URI warehouse (s3a://, gs://, abfss://, ...) the model folder is written in a local folder of this
user's on the machine that trains, <tmp>/spark-i2i-<uid>/<warehouse>/, and copied to the URI at the
end (:mod:`ml.data.files`); checkpoints need a file system (atomic renames), so they default to that
folder too, or ``train.checkpoint_dir`` names a local or mounted one.
"""
from __future__ import annotations

import functools
import gc
import glob
import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Callable, Mapping, Optional, Sequence
from urllib.parse import quote

from ml.config import Config, ConfigError
from ml.data import files
from ml.errors import InvalidInput

from jobs._cli import command, parse

log = logging.getLogger("jobs.train")
TRAINABLE = ("natm", "dat", "two_tower")
METRICS = "train_metrics.jsonl"


def model_dir(cfg: Config) -> str:
    return cfg.table_path(os.path.join("models", cfg.model))


def checkpoint_dir(cfg: Config) -> str:
    """``train.checkpoint_dir``/<model>, else <warehouse>/checkpoints/<model>; a local or mounted folder:
    under a URI warehouse, <temp>/spark-i2i-<uid>/<warehouse, quoted>/checkpoints/<model> on this
    machine. One folder per model: a run that does not continue the folder's checkpoint clears it, so
    models sharing one (a ``checkpoint_dir`` set in a config the others inherit) cleared each other's."""
    if cfg.train.checkpoint_dir:
        local = files.local_path(cfg.train.checkpoint_dir)
        if local is None:
            raise ConfigError(f"train.checkpoint_dir={cfg.train.checkpoint_dir!r} is a URI; expected a local or "
                              "mounted folder (checkpoints are written with atomic renames)")
        if glob.glob(os.path.join(glob.escape(local), "ckpt-*.pt")):
            log.warning("%s holds checkpoints written before each model got its own subfolder there; this "
                        "run's are in %s: move them there to resume them (or delete them)", local,
                        os.path.join(local, cfg.model))
        return os.path.join(local, cfg.model)
    return files.local_path(cfg.table_path(os.path.join("checkpoints", cfg.model))) or os.path.join(
        _local_state(cfg), "checkpoints", cfg.model)


def _local_state(cfg: Config) -> str:
    """This machine's folder for a URI warehouse's checkpoints and the model files being written: the
    same for every run as this user (a resume finds them), another user's own."""
    uid = os.getuid() if hasattr(os, "getuid") else os.getlogin()
    return os.path.join(tempfile.gettempdir(), f"spark-i2i-{uid}", quote(cfg.warehouse.rstrip("/"), safe=""))


# Tables a model's training reads; their versions are part of what a checkpoint was trained on.
_INPUTS = {"natm": ("noise_q", "items", "item_graph", "item_counts", "samples_natm"),
           "dat": ("noise_q", "items", "sequences", "users", "samples_dat")}
# samples.* keys that are guards, not settings: they stop a run or let it through, and change no row
SAMPLES_GUARDS = ("max_items", "max_users")
# train.* keys that do not change what is trained (where, how often to log / checkpoint)
_NOT_SETTINGS = ("checkpoint_every", "checkpoint_dir", "log_every", "mlflow", "launcher", "num_processes", "distributor_local",
                 "device", "deterministic")


def run_settings(cfg: Config, samples_version: int, versions: Mapping[str, int]) -> dict:
    """What determines a training run: the model's, the samples' and the training config, the seed,
    and the versions of the tables it reads (``samples_version``, the one the reader pinned;
    ``versions``, the side tables' from :func:`ml.train.tables.agreed_versions`, which leaves out
    those that do not exist). A checkpoint written with other settings cannot be resumed (another
    config's weights and schedule would be handed back as this one's)."""
    from dataclasses import asdict

    section = "natm" if cfg.model == "natm" else "dat"
    # the warehouse too: two warehouses (the test and the validation split) sit at the same table
    # versions after the same jobs, and a checkpoint folder outside them is shared
    local = files.local_path(cfg.warehouse)
    out: dict = {"model": cfg.model, "seed": cfg.seed,
                 "warehouse": os.path.abspath(local) if local is not None else cfg.warehouse.rstrip("/")}
    out.update({f"train.{k}": v for k, v in asdict(cfg.train).items() if k not in _NOT_SETTINGS})
    out.update({f"{section}.{k}": v for k, v in asdict(getattr(cfg, section)).items()})
    out.update({f"samples.{k}": v for k, v in asdict(cfg.samples).items() if k not in SAMPLES_GUARDS})
    for table in _INPUTS[section]:
        version = samples_version if table.startswith("samples_") else versions.get(cfg.table_path(table))
        if version is not None:
            out[f"{table} version"] = version
    # and the side tables' ids (Delta's metaData id; those ``versions`` found): a warehouse rebuilt in
    # the same place, from other data, reaches the same versions
    ids = table_ids({t: cfg.table_path(t) for t in _INPUTS[section] if cfg.table_path(t) in versions})
    if ids:
        out["table ids"] = ids
    return json.loads(json.dumps(out, default=str))  # plain JSON types, as a checkpoint stores them


def table_ids(paths: Mapping[str, str]) -> dict:
    """{name: the Delta table's id} of the tables ``paths`` ({name: path}) names."""
    from deltalake import DeltaTable

    return {name: DeltaTable(p).metadata().id for name, p in paths.items()}


def publish(mdir: str, save_model: Callable[[str], None], metrics_path: str, run: dict) -> None:
    """Put a finished run's ``model.pt``, metrics and ``run.json`` into the model folder ``mdir``.

    Each is written in full next to its final name, then all three are renamed over the previous
    run's, back to back: a job killed while writing leaves that run's files whole (before,
    ``run.json`` was written in place, and a truncated one failed ``jobs.embed``, which tags the
    embeddings with its ``finished_at``; and it was written only after the model, so a kill in
    between tagged the new weights with the old run's id)."""
    model, metrics, run_json = (os.path.join(mdir, name) for name in ("model.pt", METRICS, "run.json"))
    staged = [model, *([metrics] if os.path.exists(metrics_path) else []), run_json]  # run.json renamed last
    try:
        save_model(model + ".new")
        if metrics in staged:
            shutil.copyfile(metrics_path, metrics + ".new")
        with open(run_json + ".new", "w") as f:
            json.dump(run, f, indent=1)
    except BaseException:
        for final in staged:
            if os.path.exists(final + ".new"):
                os.remove(final + ".new")
        raise
    for final in staged:
        os.replace(final + ".new", final)


SAME_RUN = "same_run"  # resume= value: resume only a checkpoint of this very run (the pipeline's)


def _is_same_run(ckpt_dir: str, settings: dict, cfg: Config, ctx) -> bool:
    """Whether the latest checkpoint in ``ckpt_dir`` is of this very training, killed before it
    finished: the same settings (config, run length and table versions) and world size, and short of
    ``train.epochs`` / ``train.max_steps``. The pipeline then continues it instead of starting over (a
    finished run's last checkpoint is not continued: a change of device or of anything else the
    pipeline reruns training for trains anew). Rank 0 decides for every rank."""
    from ml.train.checkpoint import latest_checkpoint, read_checkpoint
    from ml.train.distributed import rank0_value
    from ml.train.loop import differing_settings

    def decide() -> bool:
        path = latest_checkpoint(ckpt_dir)
        if path is None:
            return False
        state = read_checkpoint(path)
        extra = state["extra"]
        finished = state["epoch"] >= cfg.train.epochs or (
            cfg.train.max_steps is not None and state["step"] >= cfg.train.max_steps)
        saved = extra.get("settings")
        same = (not finished and saved is not None and not differing_settings(saved, settings)
                and extra.get("world_size", 1) == ctx.world_size)
        log.info("%s: %s", path, "a checkpoint of this training, killed before it finished: continuing it"
                 if same else "not a checkpoint of an unfinished run of this training: starting over")
        return same

    return rank0_value(decide)


def _checkpoint_versions(cfg: Config, section: str) -> dict:
    """{table: version} of the tables the latest checkpoint trained on ({} without one), as rank 0
    reads them, on every rank (a rank on another host with a node-local folder would otherwise build
    its vocabulary from other versions); a version no longer readable (its log cleaned up) is an
    error that says so."""
    from deltalake import DeltaTable

    from ml.train.checkpoint import latest_checkpoint, read_checkpoint
    from ml.train.distributed import rank0_value

    def read() -> dict:
        path = latest_checkpoint(checkpoint_dir(cfg))
        if path is None:
            return {}
        saved = read_checkpoint(path)["extra"].get("settings") or {}
        out = {t: int(saved[f"{t} version"]) for t in _INPUTS[section] if f"{t} version" in saved}
        for table, version in out.items():
            try:
                DeltaTable(cfg.table_path(table), version=version)
            except Exception as e:  # noqa: BLE001 - delta-rs raises several kinds for a version it cannot load
                raise InvalidInput(f"cannot resume from {path}: it trained on {table} version {version}, which "
                                   f"is no longer readable ({str(e).splitlines()[0]}); run without --resume") from e
            latest = DeltaTable(cfg.table_path(table)).version()
            if latest != version:
                log.info("resuming on %s version %d, the one %s trained on (the table is at version %d now)",
                         table, version, os.path.basename(path), latest)
        return out

    return rank0_value(read)


def train_worker(cfg: Config, resume: bool | str) -> dict:
    """Body of one training process (rank); the same function for local, torchrun and TorchDistributor."""
    from ml.train.distributed import cleanup, init_distributed, rank0_value
    from ml.train.loop import train
    from ml.train.tables import agreed_versions, pinned_versions

    ctx = init_distributed(cfg.train.device)
    try:
        section = "natm" if cfg.model == "natm" else "dat"
        # the side tables (vocabulary, graph, categories, users) at one version on every rank; the
        # samples table's version is agreed by its reader
        side = agreed_versions([cfg.table_path(t) for t in _INPUTS[section] if not t.startswith("samples_")])
        # a resumed run reads the tables at the versions its checkpoint trained on (every rank reads the
        # same checkpoint), so a commit since then, even a rerun of samples with the same rows, does not
        # stop it
        resumed = _checkpoint_versions(cfg, section) if resume is True else {}
        side.update({cfg.table_path(t): v for t, v in resumed.items() if not t.startswith("samples_")})
        samples_version = resumed.get(f"samples_{section}")
        with pinned_versions(side):
            if cfg.model == "natm":
                from ml.train.natm_task import (NATMTrainer, build_natm, natm_batches, positive_distribution,
                                                 save_artifact)

                model, vocab = build_natm(cfg)
                make, ds = natm_batches(cfg, vocab, ctx.rank, ctx.world_size, samples_version)
                trainer = NATMTrainer(model, cfg.natm.negatives or cfg.samples.num_negatives,
                                      positive_distribution(cfg, vocab) if cfg.natm.loss == "softmax" else None)
            else:
                from ml.train.dat_task import DATTrainer, build_dat, dat_batches, save_dat_artifact

                model, users, items = build_dat(cfg)
                make, ds = dat_batches(cfg, users, items, ctx.rank, ctx.world_size, samples_version)
                trainer = DATTrainer(model)
        if ds.num_rows() == 0:
            raise InvalidInput(f"{ds.table_path} (version {ds.version}) has no rows: nothing to train "
                               "on (rerun jobs.samples; are sequences and item_graph empty?)")
        # Exact: the longest rank's batches per epoch, from the reader's deterministic deal (rows
        # // (batch x ranks) assumed an even split; with 2 ranks on ML-1M's 2 row groups it was 238
        # against 413, and a cosine schedule sat at LR 0 for the last 42 % of the run).
        epochs = cfg.train.epochs
        steps_per_epoch = max(1, math.ceil(sum(ds.batches_per_epoch(e, cfg.train.num_workers)
                                                for e in range(epochs)) / epochs))
        ckpt_dir = checkpoint_dir(cfg)
        remote = files.local_path(model_dir(cfg)) is None
        if remote:
            files.check_reachable(model_dir(cfg))  # before training, not after it
            if ctx.is_main:
                log.info("model files go to %s at the end (written in %s first); checkpoints to %s on this "
                         "machine", model_dir(cfg), _local_state(cfg), ckpt_dir)
        # rank 0 writes the model folder (under a URI: in this machine's folder for it, copied to the
        # URI when training is done)
        staging = os.path.join(_local_state(cfg), "models", cfg.model) if remote else None
        with files.staged_dir(model_dir(cfg), upload=ctx.is_main, local_dir=staging) as mdir:
            # the metrics of the run in progress live with its checkpoints, and reach the model folder
            # with its model: a killed run leaves the previous run's folder as it was
            metrics_path = os.path.join(ckpt_dir, METRICS)
            published = os.path.join(model_dir(cfg), METRICS)
            if resume is True and ctx.is_main and not os.path.exists(metrics_path) and files.exists(published):
                # resumed on another machine (a shared train.checkpoint_dir) or from a checkpoint of a
                # version that kept them in the model folder: start from the published file; training
                # keeps the resumed run's records up to its checkpoint
                os.makedirs(ckpt_dir, exist_ok=True)
                files.copy_to_local(published, metrics_path)
            # rank 0's for every rank (the table ids are read here; a relative warehouse is resolved
            # against this process's folder)
            settings = rank0_value(lambda: run_settings(cfg, ds.version, side))
            if resume == SAME_RUN:
                resume = _is_same_run(ckpt_dir, settings, cfg, ctx)
            res = train(trainer, make, lambda m, b: m(b), cfg.train, ctx, ckpt_dir, resume=resume, seed=cfg.seed,
                        metrics_path=metrics_path, steps_per_epoch=steps_per_epoch, settings=settings)
            if ctx.is_main:
                # run_id and steps in the artifact too: embed checks them against run.json
                extra = {"samples_version": ds.version, "steps": res["steps"], "run_id": res["run_id"]}
                save = (functools.partial(save_artifact, model=model, vocab=vocab, extra=extra) if cfg.model == "natm"
                        else functools.partial(save_dat_artifact, model=model, users=users, items=items, extra=extra))
                publish(mdir, save, metrics_path,
                        {"model": cfg.model, "samples_version": ds.version, "world_size": ctx.world_size,
                         "device": str(ctx.device), **{k: v for k, v in res.items() if k != "checkpoint"},
                         "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        if ctx.distributed:  # the others wait for rank 0's artifact: a rank leaving the group
            import torch.distributed as dist  # while rank 0 still writes could abort the process

            dist.barrier()
            # every rank returns rank 0's figures: a launcher may hand back any rank's value (TorchDistributor
            # on the executors returns the last of a task's processes to finish)
            mine = res
            res = rank0_value(lambda: mine)
        return res
    finally:
        cleanup()


def _check_one_samples_run(cfg: Config) -> None:
    """The samples and ``noise_q`` (the vocabulary, the negatives' distribution) are committed one
    after the other by one run of jobs.samples: written by two runs, that run was killed
    between its commits, and the model would train on samples of another vocabulary (items only one
    of them has: untrained rows, embedded and ranked). Tables whose commits do not say who wrote
    them (another writer's) are not checked."""
    from ml.data import io

    section = "natm" if cfg.model == "natm" else "dat"
    q, samples = cfg.table_path("noise_q"), cfg.table_path(f"samples_{section}")
    if io.written_by_two_runs(q, samples):
        raise InvalidInput(f"{samples} and {q} were written by different runs of jobs.samples (one killed between "
                           "its commits?): the samples may be of another vocabulary; rerun jobs.samples (the "
                           "pipeline reruns it)")


def run(cfg: Config, resume: bool | str = False) -> dict:
    """Train ``cfg.model``. ``resume``: True continues the latest checkpoint (refused if another run
    wrote it), reading the tables at the versions it trained on; :data:`SAME_RUN` continues it only
    if this very training wrote it (same settings and table versions), else starts over; False
    starts over."""
    if cfg.model not in TRAINABLE:
        raise ConfigError(f"model={cfg.model!r} is not trainable here; expected one of {list(TRAINABLE)}")
    from ml.train.distributed import launch

    if cfg.train.launcher == "distributor":  # TorchDistributor runs through the Spark session
        from ml.data.session import get_spark

        get_spark(cfg.spark)
    if resume is not True:  # a resumed run reads the versions its checkpoint trained on
        _check_one_samples_run(cfg)
    t = time.time()
    res = launch(train_worker, cfg.train, cfg, resume)
    _release_gpu_memory()
    log.info("trained %s: %s steps in %.0fs (%.0f samples/s)", cfg.model, res["steps"], time.time() - t,
             res["samples_per_s"])
    return res


def _release_gpu_memory() -> None:
    """Hand the GPU memory torch's caching allocator kept from training back to the device (a training
    in this process: launcher local or torchrun with one process): the pipeline's topk stage next
    allocates its faiss-gpu index outside that allocator."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


@command
def main(argv: Optional[Sequence[str]] = None) -> None:
    def extra(p):
        p.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint (refused if it was written with other settings); "
                            "without it a run starts over and removes the checkpoints of the previous run")

    cfg, args = parse(__doc__, argv, extra)
    res = run(cfg, args.resume)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every rank runs this; rank 0 reports
        return
    print(f"trained {cfg.model}: {res['steps']} steps, final loss {res['final_loss']:.4f}, "
          f"{res['samples_per_s']:.0f} samples/s")
    print(f"  model       {os.path.join(model_dir(cfg), 'model.pt')}")


if __name__ == "__main__":
    main()
