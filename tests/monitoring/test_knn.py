import math

import torch

from ssl_lightning.metrics.knn import knn_accuracy, knn_scores, unique_by_index


def reference_knn_scores(queries, bank, bank_labels, num_classes, k, temperature):
    """Weighted kNN written plainly: one query at a time, Python loops."""
    scores = torch.zeros(len(queries), num_classes, dtype=torch.float64)
    for qi, q in enumerate(queries):
        q = q / q.norm()
        sims = [float(q @ (b / b.norm())) for b in bank]
        nearest = sorted(range(len(bank)), key=lambda j: -sims[j])[:k]
        for j in nearest:
            scores[qi, int(bank_labels[j])] += math.exp(sims[j] / temperature)
    return scores


def test_knn_scores_match_plain_reference():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(50, 6, generator=g, dtype=torch.float64), torch.randn(9, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (50,), generator=g)
    for k, t in [(1, 0.1), (5, 0.07), (20, 1.0), (80, 0.5)]:
        got = knn_scores(queries, bank, labels, 3, k=k, temperature=t, chunk_size=4).double()
        expected = reference_knn_scores(queries, bank, labels, 3, min(k, 50), t)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_knn_accuracy_on_separable_clusters_is_perfect_and_reports_top5():
    centres = torch.eye(6) * 10
    bank_labels = torch.arange(6).repeat_interleave(10)
    bank = centres[bank_labels] + 0.1 * torch.randn(60, 6)
    query_labels = torch.arange(6)
    result = knn_accuracy(centres, query_labels, bank, bank_labels, k=5)
    assert result == {"top1": 100.0, "top5": 100.0}


def test_unique_by_index_keeps_one_row_per_index():
    index = torch.tensor([3, 1, 3, 0, 1])
    values = torch.tensor([30.0, 10.0, 30.0, 0.0, 10.0])
    (kept,) = unique_by_index(index, values)
    assert sorted(kept.tolist()) == [0.0, 10.0, 30.0]
