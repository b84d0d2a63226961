"""qtool's own inference engine: paged KV cache, prefix caching, continuous batching (nano-vllm's shape, torch only).

Design, one role per file:
- sequence.py: a request (prompt + output ids, SamplingParams, its own seeded generator, status, block table, cached count).
- block_manager.py: cache blocks of block_size tokens; full blocks keyed by a chain hash and shared by refcount, freed
  blocks kept cached and evicted LRU only when a block is needed; the block holding a prompt's last token is never reused.
- scheduler.py: per step, running decodes, then running prefills, then waiting requests, under a token budget (prefills
  chunked); when blocks run out the latest-arrived running sequence is preempted (freed, requeued first, recomputed).
- attention.py: the KV cache tensors and the torch reference paged attention (gather by block table, causal, GQA, window).
- model_runner.py: flattens the step's chunks into one unpadded batch and runs the HF model's own modules (so quantized
  linears and MoE blocks just work), RoPE from its rotary module, K/V written at the block tables' slots; a family
  it cannot take is named by `engine_support(model)` (a reason, or None) so callers fall back to transformers.
- sampling.py: SamplingParams and the batched sampler (per-row filters, per-request generator, NaN/inf refused).
- detokenizer.py: incremental text and stop strings. llm_engine.py: Engine (add_request / step / generate, stats).
"""

from qtool.runtime.engine.llm_engine import Engine, EngineConfig, EngineStats, RequestOutput
from qtool.runtime.engine.model_runner import engine_support
from qtool.runtime.engine.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "EngineStats", "RequestOutput", "SamplingParams", "engine_support"]
