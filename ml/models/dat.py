"""DAT — Dual Augmented Two-tower model (Meituan), §2.2–2.3; with both switches off, a plain two-tower.

Query tower: [user id emb, user feature embs, a_u] -> FC (256-128-32, ReLU) -> L2 norm = p_u.
Item tower:  [item id emb, category emb, a_v]     -> FC (256-128-32, ReLU) -> L2 norm = p_v.
Score <p_u, p_v> (times ``logit_scale``) -> BCE against the label.

Adaptive-Mimic Mechanism (AMM): on positive pairs a_u is pulled towards the other tower's output p_v
(and a_v towards p_u): loss_u = mean_{y=1} ||a_u - stopgrad(p_v)||², loss_v likewise. The stop
gradient means the mimic terms update only the augmented vectors, never the towers (tested).
Category Alignment Loss (CAL): per batch, the squared Frobenius distance between the covariance of
the major category's item vectors and each other category's, summed; categories with fewer than
``cal_min_items`` items in the batch are skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DATConfig:
    num_users: int
    num_items: int
    num_categories: int = 0
    user_feature_sizes: Tuple[int, ...] = ()  # cardinality (incl. 0 = unknown) of each user feature field
    id_dim: int = 32
    feature_dim: int = 8
    hidden: Tuple[int, ...] = (256, 128, 32)  # last entry = output dim = augmented vector dim
    use_amm: bool = True  # False (with use_cal False): plain two-tower
    use_cal: bool = True
    lambda_u: float = 0.5
    lambda_v: float = 0.5
    lambda_ca: float = 1.0
    cal_min_items: int = 4
    logit_scale: float = 10.0  # <p_u,p_v> is in [-1, 1]; a scale lets the sigmoid reach 0/1

    @property
    def out_dim(self) -> int:
        return self.hidden[-1]


def _mlp(in_dim: int, hidden: Sequence[int]) -> nn.Sequential:
    layers = []
    for i, h in enumerate(hidden):
        layers.append(nn.Linear(in_dim, h))
        if i < len(hidden) - 1:
            layers.append(nn.ReLU())
        in_dim = h
    return nn.Sequential(*layers)


class QueryTower(nn.Module):
    def __init__(self, cfg: DATConfig):
        super().__init__()
        self.user_emb = nn.Embedding(cfg.num_users + 1, cfg.id_dim)
        self.features = nn.ModuleList(nn.Embedding(n, cfg.feature_dim) for n in cfg.user_feature_sizes)
        in_dim = cfg.id_dim + cfg.feature_dim * len(cfg.user_feature_sizes) + (cfg.out_dim if cfg.use_amm else 0)
        self.mlp = _mlp(in_dim, cfg.hidden)

    def forward(self, users: torch.Tensor, feats: Optional[torch.Tensor], a_u: Optional[torch.Tensor]) -> torch.Tensor:
        parts = [self.user_emb(users)]  # (B, id_dim)
        for j, emb in enumerate(self.features):
            parts.append(emb(feats[:, j]))  # (B, feature_dim)
        if a_u is not None:
            parts.append(a_u)  # (B, out_dim)
        return F.normalize(self.mlp(torch.cat(parts, dim=-1)), dim=-1)


class ItemTower(nn.Module):
    def __init__(self, cfg: DATConfig):
        super().__init__()
        self.item_emb = nn.Embedding(cfg.num_items + 1, cfg.id_dim)
        self.cat_emb = nn.Embedding(cfg.num_categories + 1, cfg.feature_dim) if cfg.num_categories else None
        in_dim = cfg.id_dim + (cfg.feature_dim if cfg.num_categories else 0) + (cfg.out_dim if cfg.use_amm else 0)
        self.mlp = _mlp(in_dim, cfg.hidden)

    def forward(self, items: torch.Tensor, cats: Optional[torch.Tensor], a_v: Optional[torch.Tensor]) -> torch.Tensor:
        parts = [self.item_emb(items)]
        if self.cat_emb is not None:
            parts.append(self.cat_emb(cats))
        if a_v is not None:
            parts.append(a_v)
        return F.normalize(self.mlp(torch.cat(parts, dim=-1)), dim=-1)


class DAT(nn.Module):
    """Inputs are contiguous indices (0 = unknown); user features / item categories come from buffers."""

    def __init__(self, cfg: DATConfig, user_features: Optional[torch.Tensor] = None,
                 item_categories: Optional[torch.Tensor] = None):
        super().__init__()
        self.cfg = cfg
        self.query = QueryTower(cfg)
        self.item = ItemTower(cfg)
        if cfg.use_amm:
            self.a_u = nn.Embedding(cfg.num_users + 1, cfg.out_dim)  # augmented vectors, one per id
            self.a_v = nn.Embedding(cfg.num_items + 1, cfg.out_dim)
            nn.init.normal_(self.a_u.weight, std=0.1)
            nn.init.normal_(self.a_v.weight, std=0.1)
        uf = user_features if user_features is not None else torch.zeros(cfg.num_users + 1, len(cfg.user_feature_sizes))
        ic = item_categories if item_categories is not None else torch.zeros(cfg.num_items + 1)
        self.register_buffer("user_features", uf.long())  # (U+1, fields)
        self.register_buffer("item_categories", ic.long())  # (V+1,)

    def user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        a_u = self.a_u(users) if self.cfg.use_amm else None
        feats = self.user_features[users] if self.cfg.user_feature_sizes else None
        return self.query(users, feats, a_u)

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        a_v = self.a_v(items) if self.cfg.use_amm else None
        cats = self.item_categories[items] if self.cfg.num_categories else None
        return self.item(items, cats, a_v)

    def forward(self, users: torch.Tensor, items: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, Dict]:
        """(B,) users, items, labels in {0, 1} -> total loss and its parts."""
        p_u = self.user_vectors(users)  # (B, out)
        p_v = self.item_vectors(items)  # (B, out)
        logits = self.cfg.logit_scale * (p_u * p_v).sum(-1)  # (B,)
        bce = F.binary_cross_entropy_with_logits(logits, labels.float())
        # the parts as detached tensors: the loop reads them every train.log_every steps, not each step
        loss, parts = bce, {"bce": bce.detach()}
        if self.cfg.use_amm:
            loss_u, loss_v = mimic_losses(self.a_u(users), self.a_v(items), p_u, p_v, labels)
            loss = loss + self.cfg.lambda_u * loss_u + self.cfg.lambda_v * loss_v
            parts.update(mimic_u=loss_u.detach(), mimic_v=loss_v.detach())
        if self.cfg.use_cal:
            cal = category_alignment_loss(p_v, self.item_categories[items], self.cfg.cal_min_items)
            loss = loss + self.cfg.lambda_ca * cal
            parts["cal"] = cal.detach()
        return loss, parts


def mimic_losses(a_u: torch.Tensor, a_v: torch.Tensor, p_u: torch.Tensor, p_v: torch.Tensor,
                 labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """AMM: mean over positives of ||a_u - sg(p_v)||² and ||a_v - sg(p_u)||² (sg = stop gradient)."""
    # weighted by the positive mask rather than indexed by it: no host sync per step to count them,
    # and a batch without positives gives 0 with both tables still in the graph
    pos = (labels > 0.5).to(a_u.dtype)
    n = pos.sum().clamp(min=1.0)
    loss_u = (((a_u - p_v.detach()) ** 2).sum(-1) * pos).sum() / n
    loss_v = (((a_v - p_u.detach()) ** 2).sum(-1) * pos).sum() / n
    return loss_u, loss_v


def _covariance(x: torch.Tensor) -> torch.Tensor:
    xc = x - x.mean(0, keepdim=True)
    return xc.T @ xc / max(x.shape[0] - 1, 1)  # (D, D)


def category_alignment_loss(p_v: torch.Tensor, categories: torch.Tensor, min_items: int = 4) -> torch.Tensor:
    """Σ_c ||Cov(major) - Cov(c)||_F² over the batch's categories with >= ``min_items`` items.

    ``categories`` are category indices, 0 = unknown (an item without a category in ``items``): those
    items are in no category. As a group of their own they were the major category of any batch
    where most items lack one, and every real category was pulled towards that mixture.

    Computed in fp32 whatever the autocast: under bf16 autocast each of these small matmuls paid
    for casts that cost more than the matmul (DAT trained no faster in bf16 than in fp32), and a
    difference of covariances is where bf16's 8-bit mantissa would show."""
    with torch.autocast(p_v.device.type, enabled=False):
        x = p_v.float()
        cats, counts = torch.unique(categories[categories != 0], return_counts=True)
        keep = counts >= min_items
        cats, counts = cats[keep], counts[keep]
        if len(cats) < 2:
            return x.sum() * 0.0
        major = cats[torch.argmax(counts)]  # ties: the smallest category id (unique() sorts ascending)
        c_major = _covariance(x[categories == major])
        loss = x.sum() * 0.0
        for c in cats:
            if c == major:
                continue
            loss = loss + ((c_major - _covariance(x[categories == c])) ** 2).sum()
        return loss
