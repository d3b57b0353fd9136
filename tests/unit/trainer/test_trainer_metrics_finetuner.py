"""Finetuner's retrieval metrics (docarray v1's) against a literal transcription of docarray v1's functions."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from kubetune_trainer.evaluate import docarray_v1_rank_metrics, rank_metrics, retrieval_metrics, similarity

pytestmark = pytest.mark.unit

# ---------------------------------------------------------------------------------------------------------------
# Reference oracle: docarray/math/evaluation.py of docarray v0.21.1, the last docarray v1 release
# (github.com/docarray/docarray, formerly jina-ai/docarray; tag v0.21.1 = commit
# cfa060074f34410832de7e594c67163c276f9cf3; the file is blob eb2e0ef16fc90e59fcd3498796000b36e4f74e87, last
# changed by 8a4224d8f88951755240eb1a2a4290bdd7ef0326). Transcribed statement by statement; only the annotations
# are modernised and np.asfarray (gone in NumPy 2) is spelled np.asarray(..., dtype=float), its definition.
# ---------------------------------------------------------------------------------------------------------------


def _check_k(k):
    if k is not None and k < 1:
        raise ValueError('`k` must be >=1 or `None`')


def r_precision(binary_relevance: list[int], **kwargs) -> float:
    binary_relevance = np.array(binary_relevance) != 0
    z = binary_relevance.nonzero()[0]  # type: ignore[attr-defined]  # docarray rebinds the list to an array
    if not z.size:
        return 0.0
    return float(np.mean(binary_relevance[: z.size]))


def precision_at_k(binary_relevance: list[int], k: int | None = None, **kwargs) -> float:
    _check_k(k)
    if len(binary_relevance) == 0:
        return 0.0
    binary_relevance = np.array(binary_relevance)[:k] != 0
    return float(np.mean(binary_relevance))


def hit_at_k(binary_relevance: list[int], k: int | None = None, **kwargs) -> int:
    _check_k(k)
    return 1 if np.sum(binary_relevance[:k]) > 0 else 0


def average_precision(binary_relevance: list[int], **kwargs) -> float:
    r = np.array(binary_relevance) != 0
    out = [precision_at_k(r, k + 1) for k in range(r.size) if r[k]]
    if not out:
        return 0.0
    return float(np.mean(out))


def reciprocal_rank(binary_relevance: list[int], **kwargs) -> float:
    rs = np.array(binary_relevance).nonzero()[0]
    return 1.0 / (rs[0] + 1) if rs.size else 0.0


def recall_at_k(binary_relevance: list[int], max_rel: int, k: int | None = None, **kwargs) -> float:
    _check_k(k)
    binary_relevance = np.array(binary_relevance[:k]) != 0
    if max_rel is None:
        raise ValueError('The metric recall_at_k requires a max_rel parameter')
    if np.sum(binary_relevance) > max_rel:
        raise ValueError(f'Number of relevant Documents retrieved > {max_rel}')
    return np.sum(binary_relevance) / max_rel


def f1_score_at_k(binary_relevance: list[int], max_rel: int, k: int | None = None, **kwargs) -> float:
    _check_k(k)
    p = precision_at_k(binary_relevance, k)
    r = recall_at_k(binary_relevance, max_rel, k)
    if (p + r) > 0:
        return 2 * p * r / (p + r)
    else:
        return 0.0


def dcg_at_k(relevance: list[float], method: int = 0, k: int | None = None, **kwargs):
    _check_k(k)
    r = np.asarray(relevance, dtype=float)[:k]
    if r.size:
        if method == 0:
            return r[0] + np.sum(r[1:] / np.log2(np.arange(2, r.size + 1)))
        elif method == 1:
            return np.sum(r / np.log2(np.arange(2, r.size + 2)))
        else:
            raise ValueError('method must be 0 or 1.')
    return 0.0


def ndcg_at_k(relevance: list[float], method: int = 0, k: int | None = None, **kwargs):
    _check_k(k)
    dcg_max = dcg_at_k(sorted(relevance, reverse=True), method=method, k=k)
    if not dcg_max:
        return 0.0
    return dcg_at_k(relevance, method=method, k=k) / dcg_max


# end of the transcription --------------------------------------------------------------------------------------

ORACLE: dict[str, Callable[..., Any]] = {
    f.__name__: f for f in (precision_at_k, recall_at_k, f1_score_at_k, hit_at_k, average_precision,
                            reciprocal_rank, r_precision, dcg_at_k, ndcg_at_k)
}
PREFIX = "clip-text-to-clip-vision_"


def _as_finetuner_called(binary_relevance: list[int], max_rel: int) -> dict[str, float]:
    """docarray v1's DocumentArray.evaluate: each function gets the retrieved list, ``max_rel`` where it takes
    one, and no ``k`` (Finetuner's search already stopped at ``limit`` results)."""
    out = {}
    for name, fn in ORACLE.items():
        kwargs = {"max_rel": max_rel} if "max_rel" in fn.__code__.co_varnames else {}
        out[name] = float(fn(binary_relevance, **kwargs))
    return out


def _ours(rows: list[list[int]], n_relevant: list[int], k: int) -> dict[str, torch.Tensor]:
    top = torch.tensor(rows, dtype=torch.bool).reshape(len(rows), -1)
    return docarray_v1_rank_metrics(top, torch.tensor(n_relevant), k)


# (relevance of the search results in rank order, relevant items in the whole index, limit k)
EDGE_CASES = {
    "nothing relevant returned": ([0, 0, 0, 0], 2, 4),
    "first result relevant": ([1, 0, 0, 0], 1, 4),
    "relevant only at rank 2": ([0, 1, 0, 0], 1, 4),
    "relevant only at rank 3": ([0, 0, 1, 0], 1, 4),
    "every result relevant": ([1, 1, 1], 3, 3),
    "relevant items missed by the search": ([0, 1, 0, 1, 0], 6, 5),
    "index smaller than k": ([0, 1, 1], 2, 20),
    "single result": ([1], 1, 1),
    "results past k are not returned": ([0, 0, 1, 1, 1], 3, 2),
    "r_precision window shorter than the last hit": ([0, 1, 1, 0, 1], 3, 5),
    "nothing returned from an empty index": ([], 1, 5),
}


@pytest.mark.parametrize("case", EDGE_CASES.values(), ids=EDGE_CASES.keys())
def test_fixed_rankings_match_docarray_v1_as_finetuner_called_it(case: tuple[list[int], int, int]) -> None:
    ranking, n_relevant, k = case
    ours = _ours([ranking], [n_relevant], k)
    expected = _as_finetuner_called(ranking[:k], n_relevant)
    assert set(ours) == set(expected)
    for name, value in expected.items():
        assert float(ours[name][0]) == pytest.approx(value, abs=1e-9), name


def test_hand_computed_values_show_the_docarray_v1_definitions() -> None:
    # one relevant image at rank 2 of 3 returned, 3 relevant in the index, limit 20
    ours = {name: float(v[0]) for name, v in _ours([[0, 1, 0]], [3], 20).items()}
    assert ours["precision_at_k"] == pytest.approx(1 / 3)  # over the 3 returned, not over k = 20
    assert ours["recall_at_k"] == pytest.approx(1 / 3)
    assert ours["f1_score_at_k"] == pytest.approx(1 / 3)
    assert ours["average_precision"] == pytest.approx(1 / 2) and ours["reciprocal_rank"] == pytest.approx(1 / 2)
    assert ours["r_precision"] == 0.0  # the first h = 1 results hold no relevant one
    assert ours["dcg_at_k"] == pytest.approx(1.0)  # rank 2 weighs 1 / log2(2) = 1
    assert ours["ndcg_at_k"] == pytest.approx(1.0)  # ideal = the returned list sorted: [1, 0, 0]


def test_oracle_uses_the_weights_its_docstring_states() -> None:
    # docarray's dcg_at_k docstring: method 0 weights are [1.0, 1.0, 0.6309, 0.5, 0.4307, ...]
    for rank, weight in enumerate([1.0, 1.0, 0.6309, 0.5, 0.4307]):
        assert dcg_at_k([0.0] * rank + [1.0]) == pytest.approx(weight, abs=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 5, 20, 100])
def test_random_rankings_match_docarray_v1(seed: int, k: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n_queries, n_index = 40, 57
    scores = torch.rand(n_queries, n_index, generator=gen, dtype=torch.float64)
    relevant = torch.rand(n_queries, n_index, generator=gen) < 0.08
    relevant[torch.arange(n_queries), torch.randint(0, n_index, (n_queries,), generator=gen)] = True
    order = scores.topk(min(k, n_index), dim=1).indices
    top = relevant.gather(1, order)
    ours = docarray_v1_rank_metrics(top, relevant.sum(1), k)
    for q in range(n_queries):
        expected = _as_finetuner_called(top[q].int().tolist(), int(relevant[q].sum()))
        for name, value in expected.items():
            assert float(ours[name][q]) == pytest.approx(value, abs=1e-9), (name, q, k)


def test_retrieval_metrics_reports_finetuner_family_under_prefixed_keys() -> None:
    gen = torch.Generator().manual_seed(7)
    queries, index = torch.randn(30, 8, generator=gen), torch.randn(12, 8, generator=gen)
    relevant = [sorted({q % 12, (q * 5) % 12}) if q % 10 else [] for q in range(30)]
    k = 20  # more than the 12 index images: precision divides by the 12 returned
    out = retrieval_metrics(queries, index, relevant, k=k, chunk_size=7)
    keep = [q for q, ids in enumerate(relevant) if ids]
    order = similarity(queries[keep], index, "cosine").argsort(dim=1, descending=True)[:, :k]
    per_query = []
    for row, q in enumerate(keep):
        ranking = [int(i in relevant[q]) for i in order[row].tolist()]
        per_query.append(_as_finetuner_called(ranking, len(relevant[q])))
    for name in ORACLE:
        expected = sum(m[name] for m in per_query) / len(per_query)
        assert out[PREFIX + name] == pytest.approx(expected, abs=1e-9), name
    standard = {"precision_at_k", "recall_at_k", "hit_at_k", "average_precision", "reciprocal_rank", "dcg_at_k",
                "ndcg_at_k", "R@1", "R@5", "R@10", "mean_rank", "median_rank", "queries", "skipped_queries"}
    assert set(out) == standard | {PREFIX + name for name in ORACLE} and len(out) <= 32


def test_finetuner_prefix_names_the_keys_and_must_not_be_empty() -> None:
    emb = torch.eye(4)
    out = retrieval_metrics(emb, emb, [[i] for i in range(4)], k=2, finetuner_prefix="model_")
    assert out["model_dcg_at_k"] == 1.0 and not any(key.startswith(PREFIX) for key in out)
    with pytest.raises(ValueError, match="finetuner_prefix"):
        retrieval_metrics(emb, emb, [[i] for i in range(4)], k=2, finetuner_prefix="")


def test_the_two_families_differ_where_their_definitions_do() -> None:
    # relevant at ranks 2 and 4 of the 4 returned, 3 relevant in the index, limit k = 10
    top, n_relevant, k = torch.tensor([[False, True, False, True]]), torch.tensor([3]), 10
    standard = {name: float(v[0]) for name, v in rank_metrics(top, n_relevant, k).items()}
    finetuner = {name: float(v[0]) for name, v in docarray_v1_rank_metrics(top, n_relevant, k).items()}
    assert standard["precision_at_k"] == pytest.approx(2 / 10) and finetuner["precision_at_k"] == pytest.approx(2 / 4)
    assert standard["dcg_at_k"] == pytest.approx(1 / math.log2(3) + 1 / math.log2(5))
    assert finetuner["dcg_at_k"] == pytest.approx(1 + 1 / math.log2(4))
    ideal_standard = 1 + 1 / math.log2(3) + 1 / math.log2(4)  # 3 relevant images at the top
    assert standard["ndcg_at_k"] == pytest.approx(standard["dcg_at_k"] / ideal_standard)
    assert finetuner["ndcg_at_k"] == pytest.approx(finetuner["dcg_at_k"] / 2.0)  # sorted returned list [1, 1, 0, 0]
    for name in ("precision_at_k", "dcg_at_k", "ndcg_at_k"):
        assert abs(standard[name] - finetuner[name]) > 0.1, name
    for name in ("recall_at_k", "hit_at_k", "average_precision", "reciprocal_rank"):
        assert standard[name] == pytest.approx(finetuner[name], abs=1e-12), name
    # and through retrieval_metrics: a 4-image index, query 0's relevant images ranked 2nd and 4th
    index = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.5, 0.5], [0.0, 1.0]])
    out = retrieval_metrics(torch.tensor([[1.0, 0.0]]), index, [[1, 3]], k=10)
    assert out["dcg_at_k"] == pytest.approx(1 / math.log2(3) + 1 / math.log2(5))
    assert out[PREFIX + "dcg_at_k"] == pytest.approx(1 + 1 / math.log2(4))
    assert out["ndcg_at_k"] < 0.8 and out[PREFIX + "ndcg_at_k"] == pytest.approx(finetuner["dcg_at_k"] / 2.0)


def test_more_relevant_results_than_n_relevant_is_refused_like_docarray() -> None:
    with pytest.raises(ValueError, match="Number of relevant Documents retrieved"):
        recall_at_k([1, 1], max_rel=1)
    with pytest.raises(ValueError, match="n_relevant"):
        _ours([[1, 1]], [1], 5)
