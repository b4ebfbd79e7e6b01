"""DAT / two-tower training task: tables -> model, batches; the model -> user and item vectors."""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Iterable, Optional

import numpy as np
import torch
from deltalake import DeltaTable
from torch import nn

from ml.config import Config
from ml.errors import InvalidInput
from ml.models.dat import DAT, DATConfig
from ml.train.init import seeded_cpu_rng
from ml.train.reader import DeltaBatchDataset, make_loader
from ml.train.tables import Vocab, build_vocab, check_known, load_categories, load_vocab, read_columns

log = logging.getLogger(__name__)


class DATTrainer(nn.Module):
    def __init__(self, model: DAT):
        super().__init__()
        self.model = model

    def forward(self, batch: dict):
        return self.model(batch["user"], batch["item"], batch["label"])


def load_user_features(users_path: str, vocab: Vocab, fields) -> tuple[torch.Tensor, tuple]:
    """(U+1, fields) category indices from ``users.features`` (0 = unknown) and each field's size.

    A field's levels are the distinct values of the vocabulary's users in sorted order (codes 1..n; a
    value only other users have would be an embedding row that nothing trains); a user without the
    field keeps 0; a map listing a key twice gives its last value. Only the vocabulary's rows are kept
    as the table is scanned: ``users`` lists every user of the source, which samples.max_users does
    not bound, and every training rank reads it. Arrow compute over the map column, no Python object
    per user: 10^7 users are a second, not minutes and GBs.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    feats = torch.zeros(vocab.size + 1, len(fields), dtype=torch.long)
    if not fields:
        return feats[:, :0], ()
    t = None
    if DeltaTable.is_deltatable(users_path):
        # one scan: the vocabulary's rows, and any null id (checked, not left out)
        uid = pc.field("user_id")
        t = read_columns(users_path, ["user_id", "features"], rows=uid.isin(vocab.ids.numpy()) | uid.is_null())
        if t.column("user_id").null_count:  # to_numpy would make them floats, and then some other id
            raise InvalidInput(f"{users_path}: {t.column('user_id').null_count:,} rows with a null user_id "
                               "(the users contract has none): rerun jobs.ingest")
    if t is None or t.num_rows == 0:  # the source had no users (ingest writes the table empty)
        # not an error (Taobao has no user features, and the default names MovieLens'), but said: the
        # query tower trains on ids alone
        log.warning("dat.user_fields=%s: %s has no users of the training sequences, so the query tower has no "
                    "user features (ids only); set dat.user_fields=[] to say so, or ingest a source with its users "
                    "(ml1m's users.dat)", list(fields), users_path)
        return feats[:, :0], ()
    idx = vocab.index(torch.from_numpy(t.column("user_id").to_numpy().astype(np.int64)))  # all known (the filter)
    maps = t.column("features")  # chunked as read: no concatenated copy
    key_type = maps.type.key_type
    sizes = []
    for j, f in enumerate(fields):
        values = pc.map_lookup(maps, pa.scalar(f, key_type), "last")
        levels = pc.unique(values.drop_null())
        if not len(levels):  # a misspelt field would be a feature that is always 0, trained on nothing
            present = pc.unique(pa.chunked_array([c.keys for c in maps.chunks], key_type).drop_null())
            raise InvalidInput(f"dat.user_fields: {f!r} has a value for no training user in {users_path} (their features "
                               f"are {sorted(present.to_pylist())[:20]}): fix or drop it in dat.user_fields")
        levels = levels.take(pc.sort_indices(levels))
        code = pc.fill_null(pc.index_in(values, value_set=levels), -1).to_numpy(zero_copy_only=False) + 1
        col = torch.from_numpy(code.astype(np.int64))
        feats[idx, j] = col
        sizes.append(len(levels) + 1)
    return feats, tuple(sizes)


def build_dat(cfg: Config) -> tuple[DAT, Vocab, Vocab]:
    two_tower = cfg.model == "two_tower"
    items = load_vocab(cfg.table_path("noise_q"))
    user_ids = read_columns(cfg.table_path("sequences"), ["user_id"]).column("user_id").to_numpy()
    users = build_vocab(user_ids)
    cats, n_cats = load_categories(cfg.table_path("items"), items)
    feats, sizes = load_user_features(cfg.table_path("users"), users, list(cfg.dat.user_fields))
    d = cfg.dat
    mcfg = DATConfig(num_users=users.size, num_items=items.size, num_categories=n_cats, user_feature_sizes=sizes,
                     id_dim=d.id_dim, feature_dim=d.feature_dim, hidden=tuple(d.hidden),
                     use_amm=d.use_amm and not two_tower, use_cal=d.use_cal and not two_tower,
                     lambda_u=d.lambda_u, lambda_v=d.lambda_v, lambda_ca=d.lambda_ca, cal_min_items=d.cal_min_items,
                     logit_scale=d.logit_scale)
    with seeded_cpu_rng(cfg.seed):  # initial weights: a function of the seed, not of the process
        model = DAT(mcfg, feats if sizes else None, cats)
    log.info("%s: %d users (%d feature fields), %d items, %d categories", cfg.model, users.size, len(sizes),
             items.size, n_cats)
    return model, users, items


def dat_batches(cfg: Config, users: Vocab, items: Vocab, rank: int, world_size: int, version: Optional[int] = None):
    ds = DeltaBatchDataset(cfg.table_path("samples_dat"), columns=["user_id", "item_id", "label"],
                           batch_size=cfg.train.batch_size, shuffle_buffer=cfg.train.shuffle_buffer, seed=cfg.seed,
                           version=version, rank=rank, world_size=world_size)

    where = f"{ds.table_path} (version {ds.version})"

    def make(epoch: int) -> Iterable[dict]:
        ds.set_epoch(epoch)
        for b in make_loader(ds, cfg.train.num_workers):
            batch = {"user": users.index(b["user_id"]), "item": items.index(b["item_id"]), "label": b["label"]}
            check_known(batch["user"], b["user_id"], where, "user_ids", "sequences")
            check_known(batch["item"], b["item_id"], where, "item_ids", "noise_q")
            yield batch

    return make, ds


def save_dat_artifact(path: str, model: DAT, users: Vocab, items: Vocab, extra: Optional[dict] = None) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"kind": "dat", "config": dataclasses.asdict(model.cfg), "state": model.state_dict(),
                "users": users.ids, "items": items.ids, "extra": extra or {}}, tmp)
    os.replace(tmp, path)


# The per-id state of each side: a table row (and a buffer row) per user, or per item.
_SIDE_STATE = {"user": ("query.user_emb.weight", "a_u.weight", "user_features"),
               "item": ("item.item_emb.weight", "a_v.weight", "item_categories")}


def side_artifact(blob: dict, side: str) -> dict:
    """A DAT artifact's contents for embedding one ``side`` ("item" or "user") only: the other side's
    per-id tables cut to their padding row and its vocabulary emptied, so that the executors embedding
    items do not each load a table per user (at 10^7 users, 2.6 GB per Python worker), nor the reverse.
    Everything ``side``'s vectors are computed from is kept as it was (tested: the same vectors)."""
    other = "user" if side == "item" else "item"
    state = {k: (v[:1].clone() if k in _SIDE_STATE[other] else v) for k, v in blob["state"].items()}
    config = dict(blob["config"], **{f"num_{other}s": 0})
    return dict(blob, config=config, state=state, **{f"{other}s": blob[f"{other}s"][:0]})


def load_dat_artifact(path: str, blob: Optional[dict] = None) -> tuple[DAT, Vocab, Vocab]:
    """``blob``: the file's contents when the caller has read it already."""
    blob = torch.load(path, map_location="cpu", weights_only=False) if blob is None else blob
    c = blob["config"]
    c["hidden"], c["user_feature_sizes"] = tuple(c["hidden"]), tuple(c["user_feature_sizes"])
    model = DAT(DATConfig(**c))
    model.load_state_dict(blob["state"])
    model.eval()
    return model, Vocab(blob["users"]), Vocab(blob["items"])


@torch.no_grad()
def embed(model: DAT, index: torch.Tensor, side: str, batch_size: int = 8192) -> torch.Tensor:
    model.eval()
    fn = model.user_vectors if side == "user" else model.item_vectors
    return torch.cat([fn(c) for c in torch.split(index, batch_size)]).float()
