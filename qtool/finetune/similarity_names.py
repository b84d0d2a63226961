"""The similarities contrastive training and retrieval take, torch-free so that the CLI can list them without
importing torch."""

SIMILARITIES = ("cosine", "dot")
