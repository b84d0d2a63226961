"""Contrastive fine-tuning: the InfoNCE loss against a float64 loop reference, training that lowers it, and an
output directory sentence-transformers loads with the trained model's embeddings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_embedding_model import save_tiny_sentence_model, word_pairs

from qtool.core.errors import QtoolError
from qtool.finetune.contrastive import duplicate_positives, embed_batch, encode, info_nce_loss, train_embeddings
from qtool.finetune.embedding_models import load_embedding_model
from qtool.finetune.pair_data import PairData


def reference_info_nce(anchors, positives, negatives, similarity, temperature, exclude=None) -> float:
    """The loss written out per anchor in float64 Python: -log softmax over every other candidate."""
    a, p = anchors.double().tolist(), positives.double().tolist()
    candidates = p + (negatives.double().tolist() if negatives is not None else [])

    def score(x, y):
        dot = sum(u * v for u, v in zip(x, y))
        if similarity == "cosine":
            dot /= math.sqrt(sum(u * u for u in x)) * math.sqrt(sum(v * v for v in y))
        return dot / temperature

    total = 0.0
    for i, anchor in enumerate(a):
        logits = [score(anchor, c) for j, c in enumerate(candidates) if exclude is None or not exclude[i][j]]
        target = score(anchor, candidates[i])
        top = max(logits)
        total += -(target - top - math.log(sum(math.exp(x - top) for x in logits)))
    return total / len(a)


def pair_data(rows, with_negatives: bool) -> PairData:
    return PairData([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows] if with_negatives else None, list(range(len(rows))), "memory")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_sentence_model(tmp_path_factory.mktemp("tiny-st"))


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("hard_negatives", [False, True])
def test_loss_matches_a_float64_reference(similarity, hard_negatives):
    generator = torch.Generator().manual_seed(len(similarity) * 10 + hard_negatives)
    batch, width, temperature = 7, 13, 0.37
    anchors, positives, negatives = (torch.randn(batch, width, generator=generator) for _ in range(3))
    negatives = negatives if hard_negatives else None
    loss = info_nce_loss(anchors, positives, negatives, similarity=similarity, temperature=temperature)
    assert loss.item() == pytest.approx(reference_info_nce(anchors, positives, negatives, similarity, temperature), rel=1e-5)


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_loss_gradient_in_float64(similarity):
    generator = torch.Generator().manual_seed(3)
    anchors, positives, negatives = (torch.randn(5, 9, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, p, n: info_nce_loss(a, p, n, similarity=similarity, temperature=0.5), (anchors, positives, negatives))


def test_repeated_positive_texts_are_no_negatives():
    positives_text = ["yes", "no", "yes", "maybe", "yes"]
    negatives_text = ["no", "yes", "later", "never", "soon"]
    exclude = duplicate_positives(positives_text, negatives_text)
    assert exclude.shape == (5, 10) and not exclude.diagonal().any()
    assert exclude[0].nonzero().flatten().tolist() == [2, 4, 6]  # the other "yes" positives and the "yes" negative
    assert exclude[1].nonzero().flatten().tolist() == [5]
    generator = torch.Generator().manual_seed(5)
    anchors, positives, negatives = (torch.randn(5, 11, generator=generator) for _ in range(3))
    loss = info_nce_loss(anchors, positives, negatives, similarity="cosine", temperature=0.1, exclude=exclude)
    assert loss.item() == pytest.approx(reference_info_nce(anchors, positives, negatives, "cosine", 0.1, exclude.tolist()), rel=1e-5)
    assert loss.item() != pytest.approx(info_nce_loss(anchors, positives, negatives, similarity="cosine", temperature=0.1).item(), rel=1e-3)


def fixed_set_loss(model, data: PairData, similarity: str) -> float:
    """The loss over the whole training set in one batch, in eval mode (no dropout): comparable before and after."""
    model.eval()
    with torch.no_grad():
        return info_nce_loss(embed_batch(model, data.anchors), embed_batch(model, data.positives),
                             embed_batch(model, data.negatives) if data.negatives else None, similarity=similarity, temperature=0.05).item()


@pytest.mark.parametrize("similarity,hard_negatives", [("cosine", True), ("dot", False)])
def test_training_lowers_the_loss_and_the_output_loads_in_sentence_transformers(tiny_model_dir, tmp_path, similarity, hard_negatives):
    from sentence_transformers import SentenceTransformer

    data = pair_data(word_pairs(24, seed=11), hard_negatives)
    model = load_embedding_model(tiny_model_dir, device="cpu")
    loss_before = fixed_set_loss(model, data, similarity)
    ticks = []
    report = train_embeddings(model, data, tmp_path / "out", epochs=6, lr=1e-3, batch_size=8, similarity=similarity, eval_fraction=0,
                              device="cpu", progress=lambda done, total, detail: ticks.append((done, total)))
    assert fixed_set_loss(model, data, similarity) < 0.5 * loss_before
    assert report.steps == 18 == len(report.losses) and ticks[-1] == (18, 18) and report.epochs == 6
    assert report.hard_negatives is hard_negatives and report.before is None and report.after is None

    texts = data.anchors[:5] + ["a text the training never saw", "Ünïcode and a much longer sentence " * 3]
    reloaded = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    torch.testing.assert_close(encode(reloaded, texts, 4), encode(model, texts, 4), rtol=0, atol=1e-6)
    # and the embeddings differ from the untrained model's: the saved weights are the trained ones
    untrained = load_embedding_model(tiny_model_dir, device="cpu")
    assert (encode(reloaded, texts, 4) - encode(untrained, texts, 4)).abs().max() > 1e-2


def test_report_measures_held_out_retrieval_before_and_after(tiny_model_dir, tmp_path):
    data = pair_data(word_pairs(30, seed=4), with_negatives=False)
    report = train_embeddings(str(tiny_model_dir), data, tmp_path / "out", max_steps=9, lr=1e-3, batch_size=8, eval_fraction=0.3, seed=2, device="cpu")
    assert (report.train_pairs, report.eval_pairs, report.steps) == (21, 9, 9)
    for metrics in (report.before, report.after):
        assert metrics.queries == 9 and metrics.documents == 9
        assert 0 < metrics.mrr <= 1 and metrics.recall[1] <= metrics.recall[5] <= 1
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["after"]["recall"]["1"] == report.after.recall[1] and len(as_json["losses"]) == 9


def test_same_seed_same_model(tiny_model_dir, tmp_path):
    data = pair_data(word_pairs(12, seed=8), with_negatives=True)
    runs = [train_embeddings(str(tiny_model_dir), data, tmp_path / f"out{i}", max_steps=3, lr=1e-3, batch_size=4, eval_fraction=0, seed=5, device="cpu")
            for i in range(2)]
    assert runs[0].losses == runs[1].losses
    state = torch.get_rng_state()
    train_embeddings(str(tiny_model_dir), data, tmp_path / "out2", max_steps=1, batch_size=4, eval_fraction=0, device="cpu")
    assert torch.equal(state, torch.get_rng_state())  # the run seeds its own dropout stream, not the caller's


@pytest.mark.parametrize("option,value,fragment", [
    ("batch_size", 1, "--batch-size 1"), ("temperature", 0.0, "--temperature 0.0"), ("similarity", "euclid", "--similarity 'euclid'"),
    ("lr", -1.0, "--lr -1.0"), ("max_steps", 0, "--max-steps 0"), ("eval_fraction", 1.0, "--eval-fraction 1.0"),
])
def test_bad_settings_name_the_option(tiny_model_dir, tmp_path, option, value, fragment):
    data = pair_data(word_pairs(6, seed=1), with_negatives=False)
    with pytest.raises(QtoolError) as error:
        train_embeddings(str(tiny_model_dir), data, tmp_path / "out", **{option: value}, device="cpu")
    assert fragment in error.value.one_line() and "\n" not in error.value.one_line()
    assert not (tmp_path / "out").exists()


def test_unknown_model_names_the_alias(tmp_path):
    with pytest.raises(QtoolError, match="all-minilm-l6-v2"):
        load_embedding_model(tmp_path / "missing")
    with pytest.raises(QtoolError, match="no modules.json"):
        load_embedding_model(tmp_path)


@pytest.mark.slow
def test_minilm_alias_unpacks_once_and_fine_tunes(tmp_path):
    from sentence_transformers import SentenceTransformer

    from qtool.finetune.embedding_models import embedding_model_dir, unpacked_minilm_dir

    model = load_embedding_model("all-minilm-l6-v2", device="cpu")
    assert unpacked_minilm_dir() == embedding_model_dir("sentence-transformers/all-MiniLM-L6-v2")
    assert model.get_embedding_dimension() == 384
    data = pair_data(word_pairs(16, seed=9), with_negatives=True)
    report = train_embeddings(model, data, tmp_path / "out", max_steps=2, batch_size=8, eval_fraction=0.25, device="cpu")
    texts = data.anchors[:3]
    torch.testing.assert_close(encode(SentenceTransformer(str(tmp_path / "out"), device="cpu"), texts, 4), encode(model, texts, 4), rtol=0, atol=1e-6)
    assert report.before.queries == 4
