"""Fine-tuning: LoRA/QLoRA on float, GPTQ and EXL2 bases, full fine-tuning, contrastive embeddings, one audio family.

A job layer beside quant/, eval/, runtime/ and validate/: it imports kernels/, checkpoints/, models/ and data/,
never its siblings (merging an adapter and quantizing again is a conversion: convert/ does it)."""
