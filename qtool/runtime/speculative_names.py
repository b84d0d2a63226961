"""The engine's speculative decoding methods by name, torch-free so the CLI can list them without importing torch."""

SPECULATIVE_METHODS = ("ngram", "draft")  # prompt lookup; a draft model with the same tokenizer
PROMPT_LOOKUP = "ngram"
