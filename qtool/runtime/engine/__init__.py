"""qtool's own inference engine: paged KV cache, prefix caching, continuous batching (nano-vllm's shape, torch only).

Design, one role per file:
- sequence.py: a request (prompt + output ids, SamplingParams, its own seeded generator, status, block table, cached count).
- block_manager.py: cache blocks of block_size tokens; full blocks keyed by a chain hash and shared by refcount, freed
  blocks kept cached and evicted LRU only when a block is needed; the block holding a prompt's last token is never reused;
  when every layer has a sliding window, blocks wholly before a sequence's window are released (mixed models keep all).
- scheduler.py: per step, running decodes, then running prefills, then waiting requests, under a token budget (prefills
  chunked); when blocks run out the latest-arrived running sequence is preempted (freed, requeued first, recomputed).
- attention.py: the KV cache tensors and the torch reference paged attention (gather by block table, causal, GQA, window).
- kv_quant.py: the quantized cache kinds (EngineConfig.kv_cache q8 / q4): codes + float16 scales of rotated (token, kv
  head) vectors (q4 keys: before RoPE, per channel over each full 64-token block; the block being filled staged
  exactly, keys and values, and read exact by its own queries), written and read through the same write_kv /
  read_kv with the tokens' positions (paged_attention; the GPU prefill attention dequantizes what it gathers for q8
  and runs paged_attention for q4). The decode step takes q4 (below) and q8 (its write and attention kernels, in the rotated frame).
- q4_decode.py: the q4 cache's host side of the decode step: before it, each row's staging slot (the staging table
  decides as for the module path's write; an evicted block quantized then); after it, the blocks it filled
  quantized from their slots. Positions are host-known, so the graph stays a fixed write + attention; a write only
  the module path makes (restaging a block from its codes, a slot shared within the step) runs that step there.
- rope.py: RoPE as the engine applies it (apply_rope) and KeyRope, a layer's RoPE by position for q4 keys.
- model_runner.py: flattens the step's chunks into one unpadded batch and runs the HF model's own modules (so quantized
  linears and MoE blocks just work), RoPE from its rotary module, K/V written at the block tables' slots; what differs
  between families is data (FamilyRecipe: norm placement, q/k norm scope, fused qkv, attention softcap, RoPE layout);
  a family it cannot take is named by `engine_support(model)` (a reason, or None) so callers fall back to transformers.
  `prompt_logits(ids)` gives the logits at every position of one prompt (what `qtool eval --engine` uses).
- decode_step.py: a step of one-token decodes as whole-tensor ops over fixed-shape inputs (kernels/engine_ops: fused
  add+RMSNorm, RoPE+cache write, paged decode attention, SiLU*up; the model's own linears; a RoPE table from its rotary
  module); taken per model when its recipe is the plain pre-norm form and probing its modules finds RMSNorms and a
  gated MLP, with a reason line. With a q4 cache: RoPE + the staging write + the value's codes in one op
  (rope_and_cache_q4), attention by paged_decode_attention_q4 (own block from its staging slot, earlier blocks from
  codes), the same numbers as the module path (greedy output equal). With EngineConfig.fast_prefill, prefill and
  mixed steps go through the same fused ops too (DecodeStep.ragged, the runner's prefill attention): a few kernels
  per layer instead of the modules' many small ones, so the host launches less before the first token (on CUDA by
  default; float caches only: a q4 cache's prefill chunks are Q4CacheLayer.write's).
- cuda_graphs.py: that step captured as CUDA graphs at batch sizes 1, 2, 4, ... at engine start (after a warm-up of
  every token and batch bucket, so kernels compile and quantized linears tune then, never inside a request; the
  sampler's kernels are loaded then too). Inputs staged through pinned buffers; the replay's logits are read in place.
- prefill_attention.py: attention of prefill/mixed steps on the GPU (torch's flash varlen kernel over contexts gathered
  from the paged cache; SDPA per sequence where it cannot run); the CPU keeps attention.py's reference.
- sampling.py: SamplingParams and the batched sampler (per-row filters, per-request generator, NaN/inf refused; the
  finite check and the sampled ids reach the host in one copy, a step's only wait for the device: sample_finite);
  token_logprobs: the chosen tokens' log-softmax and top-k, computed only for the rows of requests with logprobs set
  (the model's own distribution: runtime/token_logprobs.py; a speculating run's token i from its row i).
- step_phases.py: where a step's host time goes (schedule, prepare, forward, sample, postprocess), recorded only when
  a profile attaches one (Engine.record_phases; bench/runtime/engine_overhead.py).
- detokenizer.py: incremental text and stop strings (runtime/stop_strings.py), and the piece of it safe to stream.
- drafters.py: speculative decoding's drafters: prompt lookup (n-gram) and a draft model with its own ModelRunner and
  BlockManager (a mirror sequence per request, caught up on accepted tokens each round).
- speculation.py: which greedy decodes draft how many tokens (adaptive length per request, paused while acceptance is
  low), and verification (the longest prefix the target's greedy choice agrees with, then the target's own token).
  A speculating decode is one chunk of k+1 positions (ScheduledChunk.draft_ids) with logits at each; only accepted
  tokens count as cached, so rejected slots are never keyed and the blocks grown for them are released.
- llm_engine.py: Engine (add_request / step / generate / abort_request, stats). add_request(..., on_text=callback)
  streams that request's reply during step(): complete characters only, never a stop string nor an end that may still
  become one; the pieces concatenate to the RequestOutput's text. on_logprobs=callback streams its TokenLogprobs
  (params.logprobs set), each step's before its text piece; RequestOutput.logprobs holds them all.

Callers: runtime/reply.py (one reply, or a chat holding its engine across turns; falls back to transformers' generate
when engine_support names a reason) and runtime/batch.py (a JSONL batch through one engine).
"""

from qtool.runtime.engine.llm_engine import Engine, EngineConfig, EngineStats, RequestOutput
from qtool.runtime.engine.model_runner import engine_support
from qtool.runtime.engine.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "EngineStats", "RequestOutput", "SamplingParams", "engine_support"]
