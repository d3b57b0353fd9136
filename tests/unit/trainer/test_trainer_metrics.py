"""Retrieval metrics against torchmetrics.retrieval (an independent implementation) on random rankings."""

from __future__ import annotations

import math

import pytest
import torch
from kubetune_trainer.evaluate import RetrievalTask, both_directions, rank_metrics, retrieval_metrics, similarity
from torchmetrics.functional import retrieval as tm

pytestmark = pytest.mark.unit


def _random_problem(seed: int, n_queries: int = 40, n_index: int = 57) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # positive scores: torchmetrics 1.9 counts only results with a score > 0 as retrieved in precision@k
    scores = torch.rand(n_queries, n_index, generator=gen, dtype=torch.float64) + 0.01
    relevant = torch.rand(n_queries, n_index, generator=gen) < 0.08
    relevant[torch.arange(n_queries), torch.randint(0, n_index, (n_queries,), generator=gen)] = True  # ≥ 1 each
    return scores, relevant


def _ours_from_scores(scores: torch.Tensor, relevant: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    order = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return rank_metrics(relevant.gather(1, order), relevant.sum(1), k)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 5, 20, 100])
def test_per_query_metrics_match_torchmetrics(seed: int, k: int) -> None:
    scores, relevant = _random_problem(seed)
    ours = _ours_from_scores(scores, relevant, k)
    for q in range(scores.shape[0]):
        preds, target = scores[q], relevant[q]
        expected = {
            "precision_at_k": tm.retrieval_precision(preds, target, top_k=k),
            "recall_at_k": tm.retrieval_recall(preds, target, top_k=k),
            "hit_at_k": tm.retrieval_hit_rate(preds, target, top_k=k),
            "average_precision": tm.retrieval_average_precision(preds, target, top_k=k),
            "reciprocal_rank": tm.retrieval_reciprocal_rank(preds, target, top_k=k),
            "ndcg_at_k": tm.retrieval_normalized_dcg(preds, target.long(), top_k=k),
        }
        for name, value in expected.items():
            assert float(ours[name][q]) == pytest.approx(float(value), abs=1e-6), (name, q, k)


def test_dcg_is_the_unnormalised_sum() -> None:
    # torchmetrics has no unnormalised DCG: check against its definition, written out independently
    scores, relevant = _random_problem(3)
    k = 10
    ours = _ours_from_scores(scores, relevant, k)
    for q in range(scores.shape[0]):
        ranked = sorted(range(scores.shape[1]), key=lambda i: -float(scores[q, i]))[:k]
        expected = sum(1.0 / math.log2(rank + 2) for rank, i in enumerate(ranked) if relevant[q, i])
        assert float(ours["dcg_at_k"][q]) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "sqeuclidean"])
def test_chunked_retrieval_equals_unchunked_and_torchmetrics(distance: str) -> None:
    gen = torch.Generator().manual_seed(5)
    queries, index = torch.randn(33, 8, generator=gen), torch.randn(50, 8, generator=gen)
    relevant = [sorted({q % 50, (q * 7) % 50}) for q in range(33)]
    one = retrieval_metrics(queries, index, relevant, k=10, distance=distance, chunk_size=1)
    many = retrieval_metrics(queries, index, relevant, k=10, distance=distance, chunk_size=1000)
    for name in one:
        assert one[name] == pytest.approx(many[name], abs=1e-9), name
    scores = similarity(queries, index, distance).double()
    target = torch.zeros(33, 50, dtype=torch.bool)
    for q, ids in enumerate(relevant):
        target[q, ids] = True
    positive = scores - scores.min() + 1.0  # same order; torchmetrics ignores results scored <= 0
    mrr = tm.retrieval_reciprocal_rank
    expected_mrr = sum(float(mrr(positive[q], target[q], top_k=10)) for q in range(33)) / 33
    assert one["reciprocal_rank"] == pytest.approx(expected_mrr, abs=1e-6)
    # mean rank: 1-based rank of the best relevant item over the whole index, by brute force
    ranks = []
    for q, ids in enumerate(relevant):
        order = scores[q].argsort(descending=True).tolist()
        ranks.append(min(order.index(i) for i in ids) + 1)
    assert one["mean_rank"] == pytest.approx(sum(ranks) / len(ranks), abs=1e-9)
    hits1 = sum(r <= 1 for r in ranks) / len(ranks)
    hits5 = sum(r <= 5 for r in ranks) / len(ranks)
    assert one["R@1"] == pytest.approx(hits1) and one["R@5"] == pytest.approx(hits5)


def test_perfect_and_reversed_rankings() -> None:
    emb = torch.eye(6)
    perfect = retrieval_metrics(emb, emb, [[i] for i in range(6)], k=3)
    assert perfect["R@1"] == 1.0 and perfect["reciprocal_rank"] == 1.0 and perfect["ndcg_at_k"] == 1.0
    assert perfect["precision_at_k"] == pytest.approx(1 / 3) and perfect["mean_rank"] == 1.0
    worst = retrieval_metrics(emb, -emb, [[i] for i in range(6)], k=3)
    assert worst["hit_at_k"] == 0.0 and worst["mean_rank"] == 6.0


def test_retrieval_task_relevance_by_image_or_same_text() -> None:
    index = [("a red circle", "img/1.png"), ("a red circle", "img/2.png"), ("a blue square", "img/3.png"),
             ("a red circle again", "img/1.png")]
    queries = [("a red circle", "img/9.png"), ("a blue square", "img/3.png"), ("nothing", "img/7.png")]
    task = RetrievalTask.build(queries, index)
    assert task.index_keys == ["img/1.png", "img/2.png", "img/3.png"]  # deduplicated by image key
    assert task.relevant == [[0, 1], [2], []]
    metrics = retrieval_metrics(torch.randn(3, 4), torch.randn(3, 4), task.relevant, k=2)
    assert metrics["queries"] == 2 and metrics["skipped_queries"] == 1


def test_image_to_text_ranks_the_query_texts_for_each_index_image() -> None:
    # two captions of image a, one of image b; image c has no caption among the queries
    task = RetrievalTask.build([("a one", "a"), ("a two", "a"), ("b one", "b")],
                               [("a one", "a"), ("b one", "b"), ("c one", "c")])
    assert task.relevant_texts() == [[0, 1], [2], []]
    texts = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]])
    # image a is closest to its own captions; image b is closer to a's second caption than to its own
    images = torch.tensor([[1.0, 0.05, 0.0], [0.8, 0.2, 0.1], [0.0, 1.0, 0.0]])
    metrics = both_directions(texts, images, task, k=3)
    assert metrics["R@1"] == 1.0  # every caption's best image is its own
    reverse = retrieval_metrics(images, texts, task.relevant_texts(), k=3, finetuner_prefix="clip-vision-to-clip-text_")
    assert metrics["image_to_text_R@1"] == reverse["R@1"] == pytest.approx(1 / 2)
    assert metrics["image_to_text_skipped_queries"] == 1.0 and metrics["image_to_text_queries"] == 2.0
    assert metrics["clip-vision-to-clip-text_hit_at_k"] == reverse["clip-vision-to-clip-text_hit_at_k"]
    assert "clip-text-to-clip-vision_precision_at_k" in metrics
    assert not any(k.startswith("image_to_text_clip") for k in metrics)
