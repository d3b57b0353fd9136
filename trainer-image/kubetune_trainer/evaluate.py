"""Text→image retrieval evaluation, computed in query chunks: memory O(chunk × index), never Q × N.

Relevance: an index image is relevant to a query text when it is the query's own image (same image key) or
when it is paired with exactly the same text somewhere in the query/index data (so that, for example, every
"a red circle on a white background" image counts for that caption). Queries with no relevant image in
the index are left out and counted.

Metrics, per query over the top ``k`` (= ``limit``) results, averaged over queries (the definitions
``torchmetrics.retrieval`` uses, which the tests check to 1e-6):

- ``precision_at_k``: relevant in top k / k
- ``recall_at_k``: relevant in top k / all relevant
- ``hit_at_k``: 1 if any relevant in top k
- ``average_precision``: mean of precision@i over the ranks i ≤ k that hold a relevant image (0 if none)
- ``reciprocal_rank``: 1 / rank of the first relevant image within top k (0 if none)
- ``dcg_at_k``: Σ_{i≤k} rel_i / log2(i + 1) (unnormalised, as Finetuner reported it)
- ``ndcg_at_k``: dcg_at_k / the ideal DCG over top k
- ``R@1``, ``R@5``, ``R@10``: hit rate at 1/5/10 (open_clip / CLIP-benchmark "recall@k" convention)
- ``mean_rank``, ``median_rank``: 1-based rank of the best-ranked relevant image over the whole index
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PER_QUERY_METRICS = ("precision_at_k", "recall_at_k", "hit_at_k", "average_precision", "reciprocal_rank",
                     "dcg_at_k", "ndcg_at_k")
RECALL_KS = (1, 5, 10)


def rank_metrics(top_relevant: torch.Tensor, n_relevant: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Per-query metrics from the relevance of the top results.

    top_relevant: (B, m) bool/0-1, relevance of the m ≤ k best results in rank order;
    n_relevant: (B,) number of relevant items in the whole index (≥ 1). Returns name → (B,) float64.
    """
    rel = top_relevant.to(torch.float64)
    m = rel.shape[1]
    positions = torch.arange(1, m + 1, dtype=torch.float64, device=rel.device)
    n_rel = n_relevant.to(torch.float64)
    hits = rel.sum(1)
    found = hits > 0
    precision_at_i = rel.cumsum(1) / positions
    discounts = 1.0 / torch.log2(positions + 1.0)
    dcg = (rel * discounts).sum(1)
    ideal_gains = (positions.unsqueeze(0) <= n_rel.unsqueeze(1)).to(torch.float64)
    idcg = (ideal_gains * discounts).sum(1)
    first = torch.argmax(rel, dim=1).to(torch.float64) + 1.0
    return {
        "precision_at_k": hits / k,
        "recall_at_k": hits / n_rel,
        "hit_at_k": found.to(torch.float64),
        "average_precision": torch.where(found, (precision_at_i * rel).sum(1) / hits.clamp(min=1), 0.0),
        "reciprocal_rank": torch.where(found, 1.0 / first, 0.0),
        "dcg_at_k": dcg,
        "ndcg_at_k": torch.where(idcg > 0, dcg / idcg.clamp(min=1e-12), 0.0),
    }


def similarity(queries: torch.Tensor, index: torch.Tensor, distance: str) -> torch.Tensor:
    """Scores where higher is better: cosine similarity or negative (squared) euclidean distance."""
    if distance == "cosine":
        return F.normalize(queries, dim=-1) @ F.normalize(index, dim=-1).T
    squared = torch.cdist(queries, index).pow(2)
    if distance == "sqeuclidean":
        return -squared
    if distance == "euclidean":
        return -squared.clamp(min=0).sqrt()
    raise ValueError(f"unknown distance {distance!r}")


def retrieval_metrics(query_emb: torch.Tensor, index_emb: torch.Tensor, relevant: Sequence[Sequence[int]],
                      k: int = 20, distance: str = "cosine", chunk_size: int = 256) -> dict[str, float]:
    """Average retrieval metrics of text queries over an image index, query chunk by query chunk.

    ``relevant[q]`` lists the index positions relevant to query q; queries with none are skipped and
    reported as ``skipped_queries``.
    """
    if len(relevant) != query_emb.shape[0]:
        raise ValueError("one relevance list per query is needed")
    n_index = index_emb.shape[0]
    keep = [q for q, ids in enumerate(relevant) if len(ids) > 0]
    m = min(k, n_index)
    sums = dict.fromkeys(PER_QUERY_METRICS, 0.0)
    recall_hits = dict.fromkeys(RECALL_KS, 0.0)
    ranks: list[torch.Tensor] = []
    index_emb = index_emb.float()
    for start in range(0, len(keep), chunk_size):
        chunk = keep[start:start + chunk_size]
        scores = similarity(query_emb[chunk].float(), index_emb, distance)  # (B, N)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        for row, q in enumerate(chunk):
            mask[row, list(relevant[q])] = True
        order = scores.topk(max(m, min(max(RECALL_KS), n_index)), dim=1).indices
        top_rel = mask.gather(1, order)
        for name, values in rank_metrics(top_rel[:, :m], mask.sum(1), k).items():
            sums[name] += float(values.sum())
        for r in RECALL_KS:
            recall_hits[r] += float(top_rel[:, :r].any(1).sum())
        best_relevant = scores.masked_fill(~mask, -math.inf).max(1, keepdim=True).values
        ranks.append((scores > best_relevant).sum(1) + 1)
    count = max(1, len(keep))
    out = {name: total / count for name, total in sums.items()}
    out.update({f"R@{r}": hits / count for r, hits in recall_hits.items()})
    all_ranks = torch.cat(ranks).to(torch.float64) if ranks else torch.zeros(1, dtype=torch.float64)
    out["mean_rank"] = float(all_ranks.mean())
    out["median_rank"] = float(all_ranks.median())
    out["queries"] = float(len(keep))
    out["skipped_queries"] = float(len(relevant) - len(keep))
    return out


@dataclass(frozen=True)
class RetrievalTask:
    """Query texts, the unique index images, and which index images each query should find."""

    query_texts: list[str]
    index_keys: list[str]
    relevant: list[list[int]]

    @classmethod
    def build(cls, queries: Sequence[tuple[str, str]], index: Sequence[tuple[str, str]]) -> RetrievalTask:
        """From (text, image key) pairs. Index images are deduplicated by key (first occurrence wins)."""
        position: dict[str, int] = {}
        by_text: dict[str, set[int]] = {}
        for text, key in index:
            pos = position.setdefault(key, len(position))
            by_text.setdefault(text, set()).add(pos)
        relevant = []
        for text, key in queries:
            ids = set(by_text.get(text, ()))
            if key in position:
                ids.add(position[key])
            relevant.append(sorted(ids))
        return cls([t for t, _ in queries], list(position), relevant)

