"""NATM training task: tables -> model, batches, loss; the trained model -> item vectors."""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Iterable, Optional

import numpy as np
import torch
from torch import nn

from ml import schemas as S
from ml.config import Config
from ml.errors import InvalidInput
from ml.models.natm import NATM, NATMConfig, build_neighbor_table, nce_loss
from ml.train.init import build_deferred, seeded_cpu_rng
from ml.train.reader import DeltaBatchDataset, make_loader
from ml.train.tables import Vocab, check_known, load_categories, load_graph, load_vocab, read_columns

log = logging.getLogger(__name__)
SAMPLE_COLUMNS = ["trigger_item", "positive_item", "negatives", "q_positive", "q_negatives"]


class NATMTrainer(nn.Module):
    """Wraps NATM so one ``forward(batch)`` computes the whole loss (DDP needs one forward call).

    The metrics are detached tensors, not floats: the loop averages them over its logging window on
    the device, where a ``float()`` per step made every step wait for the GPU."""

    def __init__(self, model: NATM, k: int, positive_prob: Optional[torch.Tensor] = None):
        """``positive_prob`` (V+1,): each item index's share of the training data (``loss=softmax``:
        the chance a positive is that item, for the batch's inclusion correction; q where None)."""
        super().__init__()
        self.model = model
        self.k = k
        self.register_buffer("positive_prob", positive_prob, persistent=False)

    def forward(self, batch: dict):
        if self.model.cfg.loss == "full":  # every item is a class: the stored negatives are not used
            nce = self.model.full_softmax_loss(batch["trigger"], batch["positive"])
            return self._with_mlm(batch, nce, {"softmax": nce.detach()})
        negs, q_negs = batch["negatives"][:, : self.k], batch["q_negatives"][:, : self.k]  # first k of the stored
        cands = torch.cat([batch["positive"][:, None], negs], dim=1)  # (B, 1+k)
        q = torch.cat([batch["q_positive"][:, None], q_negs], dim=1)  # (B, 1+k)
        if self.model.cfg.loss == "softmax":
            p = None if self.positive_prob is None else self.positive_prob[cands]
            nce = self.model.batch_softmax_loss(batch["trigger"], cands, q, p)
            metrics = {"softmax": nce.detach()}
        else:
            rel = self.model(batch["trigger"], cands)
            nce = nce_loss(rel, q.float(), self.k, self.model.cfg.gamma, self.model.nce_offset)
            metrics = {"nce": nce.detach(), "nce_offset": self.model.nce_offset.detach()}
        return self._with_mlm(batch, nce, metrics)

    def _with_mlm(self, batch: dict, loss: torch.Tensor, metrics: dict):
        if self.model.cfg.uses_mlm:
            mlm = self.model.mlm_loss(torch.cat([batch["trigger"], batch["positive"]]))
            loss = loss + self.model.cfg.mlm_weight * mlm
            metrics["mlm"] = mlm.detach()
        return loss, metrics


def natm_config(cfg: Config, num_items: int, num_categories: int) -> NATMConfig:
    p = dataclasses.asdict(cfg.natm)
    p.pop("use_categories")
    p.pop("negatives")
    return NATMConfig(num_items=num_items, num_categories=num_categories, **p)


def build_natm(cfg: Config) -> tuple[NATM, Vocab]:
    """Vocabulary, neighbour table and the model, from the warehouse's tables."""
    vocab = load_vocab(cfg.table_path("noise_q"))
    cats, n_cats = load_categories(cfg.table_path("items"), vocab) if cfg.natm.use_categories else (None, 0)
    item, nbr, weight, rank = load_graph(cfg.table_path("item_graph"), vocab, max_rank=cfg.natm.num_neighbors)
    if cfg.natm.num_neighbors and not len(item):  # every neighbour slot padding: NATM without its graph
        g = cfg.graph
        raise InvalidInput(f"item_graph has no edge between training items: no pair of items within graph.window="
                           f"{g.window} reaches graph.min_count={g.min_count}, so NATM's neighbours would all be "
                           "padding: lower graph.min_count or widen graph.window, or set natm.num_neighbors=0 "
                           "for NATM without its graph")
    table = build_neighbor_table(vocab.size, item, nbr, weight, rank, cfg.natm.num_neighbors,
                                 cfg.natm.weight_buckets, cats)
    mcfg = natm_config(cfg, vocab.size, n_cats)
    # The (V+2, D) id table is the one that grows with the catalogue: build it on the meta device
    # and allocate it once (torchdistx's deferred init, which has no wheel for current torch),
    # uninitialised: NATM.reset_parameters gives the id tables their one init, from the seed below.
    def id_table() -> nn.Embedding:
        return build_deferred(lambda: nn.Embedding(vocab.size + 2, mcfg.dim, padding_idx=0), "cpu",
                              initialise=False)

    item_emb = id_table()
    cand_emb = id_table() if mcfg.separate_encoders else None  # separate_encoders: a second table
    with seeded_cpu_rng(cfg.seed):  # the rest of the weights: a function of the seed, not of the process
        model = NATM(mcfg, table, item_emb=item_emb, candidate_item_emb=cand_emb)
    log.info("NATM: %d items, %d categories, %d graph edges (ranks 1..num_neighbors), %.2fM parameters",
             vocab.size, n_cats, len(item), sum(p.numel() for p in model.parameters()) / 1e6)
    return model, vocab


def positive_distribution(cfg: Config, vocab: Vocab) -> torch.Tensor:
    """(V+1,) float64: each item index's share of ``item_counts`` (the training sequences' items,
    which the positives of ``samples_natm`` follow); 0 for padding and items without a count."""
    t = read_columns(cfg.table_path(S.T_ITEM_COUNTS), [S.ITEM_ID, S.COUNT])
    idx = vocab.index(torch.from_numpy(t.column(S.ITEM_ID).to_numpy().copy()))
    counts = torch.from_numpy(t.column(S.COUNT).to_numpy().astype(np.float64))
    out = torch.zeros(vocab.size + 1, dtype=torch.float64)
    out.index_add_(0, idx[idx > 0], counts[idx > 0])
    if not out.sum() > 0:  # the positives would all get π from the negatives alone
        raise InvalidInput(f"{cfg.table_path(S.T_ITEM_COUNTS)} counts none of the {vocab.size:,} training items "
                           "(natm.loss=softmax needs their counts): rerun jobs.graph")
    return out / out.sum()


def natm_batches(cfg: Config, vocab: Vocab, rank: int, world_size: int, version: Optional[int] = None):
    """``make_batches(epoch)`` for the training loop: reader batches with ids mapped to indices."""
    full = cfg.natm.loss == "full"  # the exact softmax needs (trigger, positive) only: read no more
    columns = SAMPLE_COLUMNS[:2] if full else SAMPLE_COLUMNS
    ds = DeltaBatchDataset(cfg.table_path("samples_natm"), columns=columns, batch_size=cfg.train.batch_size,
                           shuffle_buffer=cfg.train.shuffle_buffer, seed=cfg.seed, version=version, rank=rank,
                           world_size=world_size)

    k = cfg.natm.negatives or cfg.samples.num_negatives
    where = f"{ds.table_path} (version {ds.version})"

    def make(epoch: int) -> Iterable[dict]:
        ds.set_epoch(epoch)
        for b in make_loader(ds, cfg.train.num_workers):
            batch = {"trigger": vocab.index(b["trigger_item"]), "positive": vocab.index(b["positive_item"])}
            if not full:
                if b["negatives"].shape[1] < k:
                    raise InvalidInput(f"{where} stores {b['negatives'].shape[1]} negatives per sample, training "
                                       f"uses {k} (natm.negatives or samples.num_negatives): rerun jobs.samples "
                                       "with this config, or lower natm.negatives")
                # NCE takes log(k·q): a q of 0, below 0, inf or NaN (a hand-made table; the samples job
                # writes q from positive counts) made the loss NaN a few steps later, unnamed. Checked
                # in float32, as the loss reads q: there a q under ~1e-45 is 0
                q = torch.cat([b["q_positive"][:, None], b["q_negatives"][:, :k]], dim=1).float()
                if not bool(((q > 0) & torch.isfinite(q)).all()):
                    raise InvalidInput(f"{where}: q_positive / q_negatives hold a value that is not a finite "
                                       "number > 0 (the noise probability NCE divides by): rerun jobs.samples")
                batch.update(negatives=vocab.index(b["negatives"]), q_positive=b["q_positive"],
                             q_negatives=b["q_negatives"])
            for name, col in (("trigger", "trigger_item"), ("positive", "positive_item"), ("negatives", "negatives")):
                if name in batch:
                    check_known(batch[name], b[col], where, f"{col} ids", "noise_q")
            yield batch

    return make, ds


@torch.no_grad()
def embed_items(model: NATM, index: torch.Tensor, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Item indices -> (trigger-side vectors, candidate-side vectors), L2-normalised, float32."""
    model.eval()
    trig, cand = [], []
    for chunk in torch.split(index, batch_size):
        trig.append(model.encode(chunk, "trigger"))
        cand.append(model.encode(chunk, "candidate"))
    return torch.cat(trig).float(), torch.cat(cand).float()


def save_artifact(path: str, model: NATM, vocab: Vocab, extra: Optional[dict] = None) -> None:
    """Everything the embed job needs in one file: config, weights (incl. neighbour table), vocab."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"kind": "natm", "config": dataclasses.asdict(model.cfg), "state": model.state_dict(),
                "vocab": vocab.ids, "extra": extra or {}}, tmp)
    os.replace(tmp, path)


def load_artifact(path: str, blob: Optional[dict] = None) -> tuple[NATM, Vocab, dict]:
    """``blob``: the file's contents when the caller has read it already."""
    blob = torch.load(path, map_location="cpu", weights_only=False) if blob is None else blob
    cfg = NATMConfig(**blob["config"])
    st = blob["state"]
    cats = st.get("table.categories")
    table = build_neighbor_table(cfg.num_items, torch.tensor([]), torch.tensor([]), torch.tensor([]),
                                 torch.tensor([]), cfg.num_neighbors, cfg.weight_buckets, cats)
    model = NATM(cfg, table)
    model.load_state_dict(st)
    model.eval()
    return model, Vocab(blob["vocab"]), blob.get("extra", {})
