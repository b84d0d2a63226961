"""A tiny random sentence-embedding model for fast tests: a 2-layer BERT built from a BertConfig, all-MiniLM-L6-v2's
own tokenizer (read out of the bundled zip, not the 90 MB of weights), mean pooling and, like MiniLM, a Normalize
module unless asked otherwise. Saved by sentence-transformers, so it loads the way a user's model does."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
WORDS = ("red green blue yellow black white cat dog horse bird fish tree river mountain city house car boat train "
         "apple bread cheese water music book paper stone glass winter summer night morning king queen").split()


def save_tiny_sentence_model(directory: Path, seed: int = 0, normalize: bool = True) -> Path:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    from qtool.finetune.embedding_models import minilm_zip_path

    encoder_dir = directory / "encoder"
    encoder_dir.mkdir(parents=True)
    with zipfile.ZipFile(minilm_zip_path()) as archive:
        for name in TOKENIZER_FILES:
            (encoder_dir / name).write_bytes(archive.read(name))
    config = BertConfig(vocab_size=30522, hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=52,
                        max_position_embeddings=96)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(encoder_dir)
    transformer = Transformer(str(encoder_dir), max_seq_length=64)
    modules = [transformer, Pooling(transformer.get_embedding_dimension())] + ([Normalize()] if normalize else [])
    model_dir = directory / "model"
    SentenceTransformer(modules=modules, device="cpu").save(str(model_dir))
    return model_dir


def word_pairs(count: int, seed: int) -> list[tuple[str, str, str]]:
    """(anchor, positive, negative) triplets a tiny model can learn: the positive repeats two of the anchor's
    words in another order, the negative uses words of another row."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        picks = [WORDS[i] for i in torch.randperm(len(WORDS), generator=generator)[:6].tolist()]
        rows.append((f"the {picks[0]} and the {picks[1]} near a {picks[2]}", f"{picks[1]} {picks[0]}", f"{picks[3]} {picks[4]} {picks[5]}"))
    return rows
