"""Speech recognition fine-tuning: a Whisper-architecture model trained on (audio, transcript) pairs, measured by
word error rate. `train_asr` (asr_trainer.py) is the entry point; the other modules each do one step of it."""
