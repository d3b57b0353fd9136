"""Text→image retrieval evaluation, computed in query chunks: memory O(chunk × index), never Q × N.

Relevance: an index image is relevant to a query text when it is the query's own image (same image key) or
when it is paired with exactly the same text somewhere in the query/index data (so that, for example, every
"a red circle on a white background" image counts for that caption). Queries with no relevant image in
the index are left out and counted.

Two families of per-query metrics, both over the top ``k`` (= ``limit``) results and averaged over queries.
``rel_i`` is 1 when the result at rank i is relevant, ``m = min(k, index size)`` the number of results
returned, ``h`` the relevant ones among them and ``R`` the relevant images in the whole index.

The standard family, unprefixed keys (the definitions ``torchmetrics.retrieval`` uses, which the tests check
to 1e-6):

- ``precision_at_k``: h / k
- ``recall_at_k``: h / R
- ``hit_at_k``: 1 if h > 0
- ``average_precision``: mean of precision@i over the ranks i ≤ m that hold a relevant image (0 if none)
- ``reciprocal_rank``: 1 / rank of the first relevant image within top k (0 if none)
- ``dcg_at_k``: Σ_{i≤m} rel_i / log2(i + 1) (unnormalised)
- ``ndcg_at_k``: dcg_at_k / the ideal DCG, min(R, m) relevant images at the top
- ``R@1``, ``R@5``, ``R@10``: hit rate at 1/5/10 (open_clip / CLIP-benchmark "recall@k" convention)
- ``mean_rank``, ``median_rank``: 1-based rank of the best-ranked relevant image over the whole index

Finetuner's family, keys prefixed with ``finetuner_prefix`` (``clip-text-to-clip-vision_precision_at_k``, ...):
the functions of docarray v1's ``docarray/math/evaluation.py`` (v0.21.1, the last v1 release), which
Finetuner's EvaluationCallback applied with their own ``k`` left unset to the ``limit`` results it
retrieved, with ``max_rel`` = R. They differ from the standard ones where noted:

- ``precision_at_k``: h / m (divides by the results returned, not by k)
- ``recall_at_k``: h / R; ``hit_at_k``, ``average_precision``, ``reciprocal_rank``: as above
- ``f1_score_at_k``: 2·p·r / (p + r) of those two (0 if both are 0)
- ``r_precision``: precision over the first h results, (Σ_{i≤h} rel_i) / h (0 if h = 0); not the textbook
  R-precision over the first R
- ``dcg_at_k``: rel_1 + Σ_{2≤i≤m} rel_i / log2(i): ranks 1 and 2 both weigh 1
- ``ndcg_at_k``: dcg_at_k / the same DCG of the returned list sorted by relevance, i.e. of h relevant at
  the top (0 if h = 0): relevant images the search missed do not lower it
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
FINETUNER_METRICS = ("precision_at_k", "recall_at_k", "f1_score_at_k", "hit_at_k", "average_precision",
                     "reciprocal_rank", "r_precision", "dcg_at_k", "ndcg_at_k")


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


def docarray_v1_rank_metrics(top_relevant: torch.Tensor, n_relevant: torch.Tensor, k: int
                             ) -> dict[str, torch.Tensor]:
    """Per-query metrics as Finetuner reported them: docarray v1's functions on the retrieved list.

    top_relevant: (B, m) bool/0-1, relevance of the best results in rank order; Finetuner's search returned
    at most ``k`` (its ``limit``), so columns past k are dropped, and docarray's functions then ran over the
    whole list (their own ``k`` unset). n_relevant: (B,) relevant items in the whole index (≥ 1), the
    ``max_rel`` of recall. Returns name → (B,) float64. Formulas in the module docstring.
    """
    rel = top_relevant[:, :k].to(torch.float64)
    returned = rel.shape[1]
    positions = torch.arange(1, returned + 1, dtype=torch.float64, device=rel.device)
    n_rel = n_relevant.to(torch.float64)
    hits = rel.sum(1)
    if bool((hits > n_rel).any()):
        # docarray's recall_at_k refuses this too: relevance and max_rel disagree
        raise ValueError("more relevant results retrieved than n_relevant allows")
    found = hits > 0
    cumulative = rel.cumsum(1)
    # an empty list scores 0 (docarray's precision_at_k returns 0.0 for it)
    precision = hits / returned if returned else torch.zeros_like(hits)
    recall = hits / n_rel
    f1_denominator = precision + recall
    f1 = torch.where(f1_denominator > 0, 2 * precision * recall / f1_denominator.clamp(min=1e-300), 0.0)
    first = torch.argmax(rel, dim=1).to(torch.float64) + 1.0 if returned else torch.ones_like(hits)
    # docarray's "method 0" weights: 1 for ranks 1 and 2, then 1 / log2(rank)
    discounts = 1.0 / torch.log2(positions.clamp(min=2.0))
    dcg = (rel * discounts).sum(1)
    # the returned list sorted by relevance puts its h relevant results first
    before_hits = (hits.long() - 1).clamp(min=0).unsqueeze(1)
    sorted_dcg = discounts.cumsum(0).expand_as(rel).gather(1, before_hits).squeeze(1) if returned else hits
    relevant_in_first_h = cumulative.gather(1, before_hits).squeeze(1) if returned else hits
    return {
        "precision_at_k": precision,
        "recall_at_k": recall,
        "f1_score_at_k": f1,
        "hit_at_k": found.to(torch.float64),
        "average_precision": torch.where(found, (cumulative / positions * rel).sum(1) / hits.clamp(min=1), 0.0),
        "reciprocal_rank": torch.where(found, 1.0 / first, 0.0),
        "r_precision": torch.where(found, relevant_in_first_h / hits.clamp(min=1), 0.0),
        "dcg_at_k": dcg,
        "ndcg_at_k": torch.where(found, dcg / sorted_dcg.clamp(min=1e-300), 0.0),
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
                      k: int = 20, distance: str = "cosine", chunk_size: int = 256,
                      finetuner_prefix: str = "clip-text-to-clip-vision_") -> dict[str, float]:
    """Average retrieval metrics of text queries over an image index, query chunk by query chunk.

    ``relevant[q]`` lists the index positions relevant to query q; queries with none are skipped and
    reported as ``skipped_queries``. Both families of the module docstring: the standard one under plain
    names, Finetuner's under ``finetuner_prefix`` + name (Finetuner's own key names by default).
    """
    if len(relevant) != query_emb.shape[0]:
        raise ValueError("one relevance list per query is needed")
    if not finetuner_prefix:
        raise ValueError("finetuner_prefix must not be empty: both families have a precision_at_k, dcg_at_k, ...")
    n_index = index_emb.shape[0]
    keep = [q for q, ids in enumerate(relevant) if len(ids) > 0]
    m = min(k, n_index)
    sums = dict.fromkeys(PER_QUERY_METRICS, 0.0)
    finetuner_sums = dict.fromkeys(FINETUNER_METRICS, 0.0)
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
        for name, values in docarray_v1_rank_metrics(top_rel[:, :m], mask.sum(1), k).items():
            finetuner_sums[name] += float(values.sum())
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
    out.update({f"{finetuner_prefix}{name}": total / count for name, total in finetuner_sums.items()})
    return out


IMAGE_TO_TEXT_PREFIX = "image_to_text_"
FINETUNER_TEXT_TO_IMAGE = "clip-text-to-clip-vision_"
FINETUNER_IMAGE_TO_TEXT = "clip-vision-to-clip-text_"


ZERO_SHOT_KS = (1, 5)


def zero_shot_accuracy(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: Sequence[int]) -> dict[str, float]:
    """Top-1/top-5 accuracy of classifying each image as its most similar class embedding (cosine), as CLIP's
    zero-shot evaluation does; top-k is left out where there are no more than k classes."""
    scores = F.normalize(image_emb.float(), dim=-1) @ F.normalize(class_emb.float(), dim=-1).T
    truth = torch.as_tensor(list(labels), dtype=torch.long).unsqueeze(1)
    out = {}
    for k in ZERO_SHOT_KS:
        if k == 1 or k < class_emb.shape[0]:
            top = scores.topk(k, dim=1).indices
            out[f"zero_shot_top{k}"] = float((top == truth).any(1).float().mean()) if len(labels) else math.nan
    return out


def higher_is_better() -> frozenset[str]:
    """The names :func:`both_directions` reports whose larger values are better (not ranks nor counts)."""
    standard = {*PER_QUERY_METRICS, *(f"R@{r}" for r in RECALL_KS)}
    return frozenset({*standard, *(IMAGE_TO_TEXT_PREFIX + n for n in standard),
                      *(f"zero_shot_top{k}" for k in ZERO_SHOT_KS),
                      *(prefix + n for prefix in (FINETUNER_TEXT_TO_IMAGE, FINETUNER_IMAGE_TO_TEXT)
                        for n in FINETUNER_METRICS)})


def both_directions(text_emb: torch.Tensor, image_emb: torch.Tensor, task: RetrievalTask, k: int = 20,
                    distance: str = "cosine") -> dict[str, float]:
    """Text→image metrics under their plain (and Finetuner's) names, image→text ones prefixed: each index image
    queries the query texts, and the texts relevant to it are those it is relevant to."""
    out = retrieval_metrics(text_emb, image_emb, task.relevant, k=k, distance=distance,
                            finetuner_prefix=FINETUNER_TEXT_TO_IMAGE)
    reverse = retrieval_metrics(image_emb, text_emb, task.relevant_texts(), k=k, distance=distance,
                                finetuner_prefix=FINETUNER_IMAGE_TO_TEXT)
    out.update({name if name.startswith(FINETUNER_IMAGE_TO_TEXT) else IMAGE_TO_TEXT_PREFIX + name: value
                for name, value in reverse.items()})
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

    def relevant_texts(self) -> list[list[int]]:
        """For each index image, the query texts it is relevant to (the transpose of ``relevant``)."""
        out: list[list[int]] = [[] for _ in self.index_keys]
        for query, images in enumerate(self.relevant):
            for image in images:
                out[image].append(query)
        return out

