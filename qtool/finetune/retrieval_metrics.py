"""Retrieval quality of embeddings: each query has one relevant document among all of them; recall@k is the share
of queries whose document ranks in the top k, MRR the mean of 1 / rank."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtool.finetune.similarity_names import SIMILARITIES

QUERY_CHUNK = 1024  # queries scored at once: bounds the score matrix for large held-out sets


@dataclass(frozen=True)
class RetrievalMetrics:
    recall: dict[int, float]  # k -> share of queries whose document is in the top k
    mrr: float
    queries: int
    documents: int

    def to_dict(self) -> dict:
        return {"recall": {str(k): value for k, value in self.recall.items()}, "mrr": self.mrr, "queries": self.queries, "documents": self.documents}


def similarity_scores(queries: torch.Tensor, documents: torch.Tensor, similarity: str) -> torch.Tensor:
    """(Q, D) scores: cosine of the vectors, or their plain dot product."""
    if similarity == "cosine":
        queries = torch.nn.functional.normalize(queries, dim=-1)
        documents = torch.nn.functional.normalize(documents, dim=-1)
    elif similarity != "dot":
        raise ValueError(f"similarity {similarity!r} is not one of {SIMILARITIES}")
    return queries @ documents.T


def relevant_ranks(queries: torch.Tensor, documents: torch.Tensor, relevant: torch.Tensor, similarity: str, chunk: int = QUERY_CHUNK) -> torch.Tensor:
    """1-based rank of each query's relevant document. A document scoring the same as the relevant one counts as
    ranked above it (ties never flatter the model)."""
    relevant = torch.as_tensor(relevant, dtype=torch.long, device=queries.device)
    ranks = []
    for start in range(0, len(queries), chunk):
        scores = similarity_scores(queries[start : start + chunk].float(), documents.float(), similarity)
        target = scores.gather(1, relevant[start : start + chunk, None])
        ranks.append((scores >= target).sum(dim=1))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def retrieval_metrics(queries: torch.Tensor, documents: torch.Tensor, relevant, similarity: str = "cosine", ks: tuple[int, ...] = (1, 5)) -> RetrievalMetrics:
    """recall@k for each k and MRR; `relevant[i]` is the row of `documents` that query i should find."""
    if len(queries) == 0:
        raise ValueError("retrieval metrics need at least one query")
    ranks = relevant_ranks(queries, documents, relevant, similarity).double()
    recall = {k: (ranks <= k).double().mean().item() for k in ks}
    return RetrievalMetrics(recall=recall, mrr=(1.0 / ranks).mean().item(), queries=len(queries), documents=len(documents))
