"""recall@k and MRR against a brute-force reference: every document scored in float64 Python and sorted."""

from __future__ import annotations

import math

import pytest
import torch

from qtool.finetune.retrieval_metrics import relevant_ranks, retrieval_metrics


def brute_force(queries, documents, relevant, similarity, ks):
    ranks = []
    for query, target in zip(queries.double().tolist(), relevant.tolist()):
        scores = []
        for document in documents.double().tolist():
            dot = sum(q * d for q, d in zip(query, document))
            if similarity == "cosine":
                dot /= math.sqrt(sum(q * q for q in query)) * math.sqrt(sum(d * d for d in document))
            scores.append(dot)
        order = sorted(range(len(scores)), key=lambda row: -scores[row])
        ranks.append(order.index(target) + 1)
    recall = {k: sum(rank <= k for rank in ranks) / len(ranks) for k in ks}
    return ranks, recall, sum(1 / rank for rank in ranks) / len(ranks)


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("queries_count,documents_count,width", [(23, 31, 7), (5, 5, 3), (40, 13, 17)])
def test_metrics_match_brute_force(similarity, queries_count, documents_count, width):
    generator = torch.Generator().manual_seed(queries_count * documents_count + width)
    # documents near their queries, so that ranks spread over 1..N rather than sit at random
    documents = torch.randn(documents_count, width, generator=generator) * torch.rand(documents_count, 1, generator=generator) * 3
    relevant = torch.randint(0, documents_count, (queries_count,), generator=generator)
    queries = documents[relevant] + 1.5 * torch.randn(queries_count, width, generator=generator)
    ks = (1, 3, 5)
    ranks, recall, mrr = brute_force(queries, documents, relevant, similarity, ks)
    assert relevant_ranks(queries, documents, relevant, similarity).tolist() == ranks
    metrics = retrieval_metrics(queries, documents, relevant, similarity, ks)
    assert metrics.recall == pytest.approx(recall) and metrics.mrr == pytest.approx(mrr)
    assert (metrics.queries, metrics.documents) == (queries_count, documents_count)
    assert 1 < len(set(ranks))  # the case exercises more than one rank


def test_chunks_of_queries_give_the_same_ranks():
    generator = torch.Generator().manual_seed(0)
    queries, documents = torch.randn(10, 4, generator=generator), torch.randn(6, 4, generator=generator)
    relevant = torch.randint(0, 6, (10,), generator=generator)
    whole = relevant_ranks(queries, documents, relevant, "dot")
    assert torch.equal(relevant_ranks(queries, documents, relevant, "dot", chunk=3), whole)


def test_ties_rank_the_relevant_document_last():
    documents = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    queries = torch.tensor([[1.0, 0.1], [0.0, 1.0]])
    metrics = retrieval_metrics(queries, documents, torch.tensor([0, 2]), "cosine", ks=(1, 2))
    assert relevant_ranks(queries, documents, torch.tensor([0, 2]), "cosine").tolist() == [2, 1]
    assert metrics.recall == {1: 0.5, 2: 1.0} and metrics.mrr == pytest.approx(0.75)
