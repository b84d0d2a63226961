"""The decoder executor: runs an already-loaded HF model's own modules (embedding, norms, q/k/v/o, MLP, head: float
or quantized linears alike) over one flattened ragged batch, with RoPE from the model's rotary module and paged KV.
A step of one-token decodes goes through the whole-tensor decode step (decode_step.py) where the model allows it,
replayed from CUDA graphs (cuda_graphs.py) on the GPU; prefill attention on the GPU is prefill_attention.py's."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch import nn

from qtool.core.errors import QtoolError
from qtool.models.architectures import REGISTRY, decoder_layers, get_module
from qtool.models.layerwise import head_logits
from qtool.runtime.engine.attention import (AttentionBatch, allocate_kv_cache, kv_cache_bytes_per_block,
                                           kv_cache_fixed_bytes, paged_attention, write_kv)
from qtool.runtime.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes
from qtool.runtime.engine.decode_step import DecodeLayer, DecodeRows, plan_decode_step
from qtool.runtime.engine.kv_quant import QuantizedKVCache
from qtool.runtime.engine.prefill_attention import PrefillAttention
from qtool.runtime.engine.q4_decode import finish_q4_decode, plan_q4_decode
from qtool.runtime.engine.rope import KeyRope, apply_rope
from qtool.runtime.engine.scheduler import ScheduledChunk
from qtool.runtime.engine.step_phases import StepPhases

logger = logging.getLogger(__name__)
# Context tokens a step's decode rows may read in all (rows x context each). Each row reads its whole context, where
# prefill attention reads a sequence's once: a step of many rows over a long context stays a prefill step. The rows
# of one sequence run side by side in the attention's grid and share its K/V through L2; at this bound a 7B-shaped
# layer's rows move ~2 GB through L2, about what the prefill step's host launches cost in time
SHORT_PREFILL_CONTEXT_READS = 1 << 17


NORM_PLACEMENTS = ("pre", "sandwich", "post")
QK_NORM_SCOPES = ("head", "projection")
ROPE_LAYOUTS = ("half", "interleaved")


@dataclass(frozen=True)
class FamilyRecipe:
    """What differs between the attention + MLP families the executor takes."""

    # (a layer's sliding window and Granite's embedding/residual multipliers are the architecture table's facts:
    # ArchitectureSpec.layer_window, .embedding_multiplier, .residual_multiplier)
    # where a layer's norms sit (NORM_PLACEMENTS): "pre": input_layernorm before attention, post_attention_layernorm
    # before the MLP; "sandwich" (Gemma 2/3): input_layernorm, then post_attention_layernorm on the attention's
    # output, pre_feedforward_layernorm before the MLP and post_feedforward_layernorm on its output; "post" (OLMo 2):
    # no norm before a branch, post_attention_layernorm and post_feedforward_layernorm on each branch's output
    norm_placement: str = "pre"
    # the attention's q_norm/k_norm (QK_NORM_SCOPES): "head" (RMSNorm over each head, Qwen3, Gemma 3), "projection"
    # (over the whole q/k projection before its split into heads, OLMo 2), or None (none)
    qk_norm: str | None = None
    fused_qkv: str | None = None  # the attention's one q/k/v projection, split by the head counts (Phi-3's qkv_proj)
    attention_softcap_field: str | None = None  # config field: scores -> cap * tanh(scores / cap) (Gemma 2)
    # RoPE pairs (ROPE_LAYOUTS): "half" rotates (x[i], x[i + d/2]); "interleaved" rotates (x[2i], x[2i + 1]), the
    # rotary module's cos/sin [f0..f(d/2-1), f0..f(d/2-1)] read as [f0, f0, f1, f1, ...] (Helium)
    rope_layout: str = "half"
    # the rotary module is called per layer type (config.layer_types): a local RoPE base for sliding layers (Gemma 3)
    rope_per_layer_type: bool = False


GEMMA2 = FamilyRecipe(norm_placement="sandwich", attention_softcap_field="attn_logit_softcapping")
OLMO2 = FamilyRecipe(norm_placement="post", qk_norm="projection")
ENGINE_FAMILIES: dict[str, FamilyRecipe] = {
    "llama": FamilyRecipe(),
    "mistral": FamilyRecipe(),
    "qwen2": FamilyRecipe(),
    "qwen3": FamilyRecipe(qk_norm="head"),
    "gemma": FamilyRecipe(),  # scaled embeddings and (1 + w) norms live in the modules it calls
    "gemma2": GEMMA2,  # query_pre_attn_scalar is the attention's own `scaling`; the final softcap is head_logits'
    # Gemma 3's config keeps attn_logit_softcapping, its attention does not apply it
    "gemma3_text": replace(GEMMA2, attention_softcap_field=None, qk_norm="head", rope_per_layer_type=True),
    "helium": FamilyRecipe(rope_layout="interleaved"),
    "olmo": FamilyRecipe(),  # parameter-free LayerNorms are its own modules; clip_qkv is refused in engine_support
    "olmo2": OLMO2,
    "olmo3": replace(OLMO2, rope_per_layer_type=True),
    "phi3": FamilyRecipe(fused_qkv="qkv_proj"),  # gate_up_proj is inside its own MLP
    "starcoder2": FamilyRecipe(),
    "granite": FamilyRecipe(),  # its embedding and residual multipliers are the architecture table's
    # mixture of experts: the sparse block is the layer's `mlp`, routing each token on its own
    "mixtral": FamilyRecipe(),
    "qwen2_moe": FamilyRecipe(),
    "qwen3_moe": FamilyRecipe(qk_norm="head"),
    "olmoe": FamilyRecipe(qk_norm="projection"),  # clip_qkv, where set, is refused in engine_support
}
# Families of the architecture table the executor does not take, and what it would need for them.
NOT_TAKEN: dict[str, str] = {
    "cohere": "a parallel residual, and interleaved RoPE whose cos/sin table is interleaved too (a third layout)",
    "cohere2": "a parallel residual, and interleaved RoPE whose cos/sin table is interleaved too (a third layout)",
    "stablelm": "an optional parallel residual (use_parallel_residual) and per-head LayerNorm q/k",
    "phi": "a parallel residual and its `dense` output projection",
    "gpt_neox": "a fused query_key_value in per-head order and a parallel residual",
}
QK_NORMS = ("q_norm", "k_norm")
LAYER_NORMS = {  # the layer's norm modules each placement calls
    "pre": ("input_layernorm", "post_attention_layernorm"),
    "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),
    "post": ("post_attention_layernorm", "post_feedforward_layernorm"),
}


def engine_support(model: nn.Module) -> str | None:
    """None when the engine can run `model`, else why not (callers fall back to transformers' generate)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ENGINE_FAMILIES:
        why = NOT_TAKEN.get(model_type) or ("a family outside the architecture table" if model_type not in REGISTRY
                                           else "a recipe in ENGINE_FAMILIES")
        return f"the engine does not run model type '{model_type}' yet: it needs {why}"
    recipe = ENGINE_FAMILIES[model_type]
    if getattr(config, "clip_qkv", None) is not None:
        return "clip_qkv clamping of q/k/v is not in the engine's attention yet"
    rope = getattr(config, "rope_parameters", None) or {}
    rope_types = [rope.get("rope_type")] + [part.get("rope_type") for part in rope.values() if isinstance(part, dict)]
    if "dynamic" in rope_types:
        return "dynamic RoPE scaling depends on each sequence's length, which a flattened batch does not keep"
    spec = REGISTRY[model_type]
    try:
        get_module(model, spec.layers_path.rpartition(".")[0] + ".rotary_emb")
        layer = decoder_layers(model, spec)[0]
        attention = layer.self_attn
    except (QtoolError, AttributeError) as exc:
        return f"the model's module tree is not the one the engine expects ({exc})"
    projections = (recipe.fused_qkv,) if recipe.fused_qkv else ("q_proj", "k_proj", "v_proj")
    if not all(hasattr(attention, name) for name in (*projections, "o_proj", "scaling", "head_dim")):
        return f"its attention has no {'/'.join(projections)}/o_proj projections with scaling and head_dim"
    if not all(hasattr(layer, name) for name in LAYER_NORMS[recipe.norm_placement]):
        return f"its layers lack the norms of a {recipe.norm_placement}-norm layer ({LAYER_NORMS[recipe.norm_placement]})"
    if (recipe.qk_norm is not None) != all(hasattr(attention, name) for name in QK_NORMS):
        return "its attention's q_norm/k_norm modules are not the ones its family's recipe places"
    if recipe.rope_per_layer_type and not getattr(config, "layer_types", None):
        return "its rotary embedding is per layer type, and the config has no layer_types"
    return None


class ModelRunner:
    """Owns the KV cache tensors and runs one step of the scheduler's chunks through the model."""

    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, kv_dtype: torch.dtype | None = None,
                 kv_cache: str = "auto", fast_decode: bool | None = None, max_num_seqs: int = 1,
                 fast_prefill: bool | None = None, fuse_projections: bool = True, short_prefill_rows: int = 0):
        """kv_cache: a kind of KV_CACHE_KINDS (auto: kv_dtype, else the model's dtype). fast_decode: one-token steps
        through the whole-tensor decode step where the model's layers and the cache allow it (None: on CUDA only;
        on the CPU the module path stays the reference). max_num_seqs: sequences run at once (a q4 cache keeps as
        many blocks being filled at full precision). fast_prefill: where the decode step is planned, prefill and
        mixed steps run through its fused ops too (DecodeStep.ragged; False: through the model's modules; None: on
        CUDA only; float caches only).
        fuse_projections: where the decode step is planned, each layer's q/k/v and gate/up run as one linear each
        where their parts allow it, in the decode step and in prefill through either path (the parts' tensors become
        views of the fused ones, so the weights stay one copy).
        short_prefill_rows: where the decode step runs (a float or q8 cache), a step whose chunks each bring at
        most this many tokens (a prefix-cache hit's new tokens, a chat turn over a cached history, a speculative
        verification) runs as one decode row per token (DecodeRows.from_chunks): on CUDA through the decode
        graphs when the rows fit the largest (one replay instead of a prefill step's thousands of host launches),
        elsewhere (the CPU) through the eager decode step. 0: never."""
        reason = engine_support(model)
        if reason is not None:
            raise QtoolError(reason, hint="run it through transformers' generate (qtool.runtime.generate)")
        self.model = model
        self.config = model.config
        self.spec = REGISTRY[self.config.model_type]
        self.recipe = ENGINE_FAMILIES[self.config.model_type]
        self.layers = decoder_layers(model, self.spec)
        self.embed = get_module(model, self.spec.embed_path)
        self.rotary = get_module(model, self.spec.layers_path.rpartition(".")[0] + ".rotary_emb")
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype
        attention = self.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.kv_heads = self.config.num_key_value_heads
        self.kv_dtype = kv_dtype or self.dtype  # a float cache's dtype ("auto"); fp16/bf16/q8/q4 via kv_cache
        self.cache = allocate_kv_cache(kv_cache, self.kv_dtype, len(self.layers), num_blocks, block_size,
                                       self.kv_heads, self.head_dim, self.device, staging_slots=max_num_seqs)
        if isinstance(self.cache, QuantizedKVCache) and self.cache.kind == "q4":  # keys quantized before RoPE
            self.cache.key_ropes = self._key_ropes()
        self.windows = [self.spec.layer_window(self.config, layer.self_attn) for layer in self.layers]
        softcap_field = self.recipe.attention_softcap_field
        softcap = None if softcap_field is None else getattr(self.config, softcap_field, None)
        self.attention_softcap = None if softcap is None else float(softcap)
        self.embedding_multiplier = self.spec.embedding_multiplier(self.config)
        self.residual_multiplier = self.spec.residual_multiplier(self.config)
        self.attention = paged_attention if self.device.type == "cpu" else PrefillAttention(block_size, self.device)
        self.decode_step, self.decode_step_reason = None, "fast decode is off"
        if fast_decode or (fast_decode is None and self.device.type == "cuda"):
            self.decode_step, self.decode_step_reason = plan_decode_step(self, self._max_positions(),
                                                                         fuse_projections)
            if self.decode_step is None:
                self.decode_step_reason = f"decode steps run through the model's modules: {self.decode_step_reason}"
        logger.info("engine: %s", self.decode_step_reason)
        # the fused prefill writes float caches only (a q4 chunk's writes are Q4CacheLayer.write's)
        if fast_prefill is None:
            fast_prefill = self.device.type == "cuda"
        self.fast_prefill = fast_prefill and self.decode_step is not None and not self.cache.is_quantized
        self.decode_graphs: DecodeGraphs | None = None
        self.fast_decode_steps = 0  # steps run through the decode step (graph or eager)
        self.fast_prefill_steps = 0  # prefill or mixed steps run through the decode step's ops
        # q4's staging holds one block being filled per sequence, written by one row per sequence and step
        self.short_prefill_rows = 0 if self.decode_step is None or self.decode_step.is_q4 else short_prefill_rows
        self.short_prefill_steps = 0  # steps with a chunk of several tokens run as decode rows
        self.phases: StepPhases | None = None  # the engine's, while a profile records step phases

    def _mark(self, phase: str) -> None:
        if self.phases is not None:
            self.phases.mark(phase)

    def _max_positions(self) -> int:
        """Positions a sequence can reach: the model's context, and no more than the cache holds."""
        capacity = self.cache.num_blocks * self.cache.block_size
        context = getattr(self.config, "max_position_embeddings", None)
        return min(capacity, context) if context else capacity

    def warm_up(self, max_num_batched_tokens: int, max_num_seqs: int, max_graph_batch: int = 0) -> None:
        """Engine start on CUDA (nothing elsewhere): one step at every token-count bucket a request can bring and at
        every decode batch bucket, so quantized linears tune their plans and kernels compile now, never inside a
        request; then the decode step's CUDA graphs at batch sizes up to max_graph_batch (0: none), no larger than
        a batch of max_num_seqs or a short chunk's rows need. It writes the cache's block 0: call it before any
        request."""
        if self.device.type != "cuda":
            return
        block_size = self.cache.block_size
        with torch.inference_mode():
            for tokens in sorted({min(1 << k, max_num_batched_tokens)
                                  for k in range(max_num_batched_tokens.bit_length() + 1)}):
                batch = AttentionBatch.build([[0] * -(-tokens // block_size)], [tokens], [tokens], block_size,
                                             self.device)
                positions = torch.arange(tokens, device=self.device) % self._max_positions()
                ids = torch.zeros(tokens, dtype=torch.long, device=self.device)
                last = torch.tensor([tokens - 1], device=self.device)  # a prefill's last row, through the head
                if self.fast_prefill:
                    self.decode_step.ragged(ids, positions, batch.slots, self._prefill_attend(batch), last)
                else:
                    head_logits(self.model, self._forward_tokens(ids, positions, batch)[last], spec=self.spec)
        if self.decode_step is None:
            return
        if max_graph_batch >= 1:
            max_blocks = min(self.cache.num_blocks, -(-self._max_positions() // block_size))
            largest = min(max_graph_batch, max(max_num_seqs, self.short_prefill_rows))
            self.decode_graphs = DecodeGraphs(self.decode_step, graph_batch_sizes(largest), max_blocks, self.device)
            self.decode_graphs.capture()  # warms up each of its sizes before capturing
        largest_graph = self.decode_graphs.largest if self.decode_graphs and self.decode_graphs.graphs else 0
        with torch.inference_mode():
            for size in graph_batch_sizes(max_num_seqs):  # the batch buckets that run eagerly
                if size > largest_graph:
                    own_slots = [0] * size if self.decode_step.is_q4 else None  # q4: staging slot 0, as a graph's
                    rows = DecodeRows([0] * size, [0] * size, [0] * size, [[0]] * size, own_slots)
                    self.decode_step(rows.to_inputs(self.device))

    @staticmethod
    def kv_bytes_per_block(model: nn.Module, block_size: int, kv_dtype: torch.dtype | None = None,
                           kv_cache: str = "auto") -> int:
        config = model.config
        attention = decoder_layers(model)[0].self_attn
        dtype = kv_dtype or model.get_input_embeddings().weight.dtype
        return kv_cache_bytes_per_block(kv_cache, dtype, config.num_hidden_layers, block_size,
                                        config.num_key_value_heads, attention.head_dim)

    @staticmethod
    def kv_fixed_bytes(model: nn.Module, block_size: int, kv_dtype: torch.dtype | None = None,
                       kv_cache: str = "auto", max_num_seqs: int = 1) -> int:
        """Bytes the cache takes besides its blocks (a q4 cache's staging: max_num_seqs blocks of keys)."""
        config = model.config
        dtype = kv_dtype or model.get_input_embeddings().weight.dtype
        return kv_cache_fixed_bytes(kv_cache, dtype, config.num_hidden_layers, block_size, config.num_key_value_heads,
                                    decoder_layers(model)[0].self_attn.head_dim, max_num_seqs)

    def prepare(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch]:
        """Token ids [T], positions [T] and the attention metadata of the flattened batch (no padding)."""
        ids, positions = [], []
        for chunk in chunks:
            stop = chunk.start + chunk.num_tokens
            ids += chunk.token_ids()
            positions += range(chunk.start, stop)
        batch = AttentionBatch.build([c.seq.block_table for c in chunks], [c.start + c.num_tokens for c in chunks],
                                     [c.num_tokens for c in chunks], self.cache.block_size, self.device)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        return as_tensor(ids), as_tensor(positions), batch

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Compute the chunks' K/V into the cache and return the logits [n, vocab] (float32) of the chunks that
        reach their sequence's last token, in chunk order: chunk.num_logits trailing rows each (one, or one per
        position of a speculating chunk). They may be a CUDA graph's output buffer: read them before the next
        execute()."""
        one_token = all(chunk.num_tokens == 1 for chunk in chunks)
        if self.decode_step is not None and (one_token or self._runs_as_decode_rows(chunks)):
            rows = DecodeRows.from_chunks(chunks, self.cache.block_size)
            logits = self._run_decode_step(rows)
            if logits is None:  # a q4 write only the modules' path makes (q4_decode.plan_q4_decode)
                logits = self.execute_modules(chunks)
            else:
                self.short_prefill_steps += not one_token
                wanted = self._logit_rows(chunks)
                logits = logits if len(wanted) == len(rows) else logits[wanted]
        elif self.fast_prefill:
            logits = self._execute_ragged(chunks)
        else:
            logits = self.execute_modules(chunks)
        self._mark("forward")
        return logits

    def _runs_as_decode_rows(self, chunks: list[ScheduledChunk]) -> bool:
        """Whether a step with multi-token chunks runs as decode rows (short_prefill_rows): every chunk short, the
        rows' context reads within SHORT_PREFILL_CONTEXT_READS, and on CUDA the rows and their block tables within
        the largest graph."""
        limit = self.short_prefill_rows
        if not limit or any(chunk.num_tokens > limit for chunk in chunks):
            return False
        reads = sum(chunk.num_tokens * (chunk.start + chunk.num_tokens) for chunk in chunks)
        if reads > SHORT_PREFILL_CONTEXT_READS:
            return False
        if self.device.type != "cuda":
            return True
        graphs = self.decode_graphs
        return (graphs is not None and graphs.bucket(sum(chunk.num_tokens for chunk in chunks)) is not None
                and max(len(chunk.seq.block_table) for chunk in chunks) <= graphs.max_blocks)

    def _run_decode_step(self, rows: DecodeRows) -> torch.Tensor | None:
        """The decode step's logits of rows (graph or eager); None, having run nothing, when a q4 cache's write
        needs the module path."""
        q4_plan = None
        if self.decode_step.is_q4:
            q4_plan = plan_q4_decode(self.cache, rows.slots)
            if q4_plan is None:
                return None
            rows.own_slots = q4_plan.staging_slots
        logits = self._decode_step_logits(rows)
        if q4_plan is not None:
            finish_q4_decode(self.cache, q4_plan)  # after the step, on its stream: the blocks it filled
        return logits

    def _decode_step_logits(self, rows: DecodeRows) -> torch.Tensor:
        graphs = self.decode_graphs
        self.fast_decode_steps += 1
        if graphs is not None and graphs.bucket(len(rows)) is not None:
            if max(len(table) for table in rows.block_tables) <= graphs.max_blocks:
                size = graphs.stage(rows)
                self._mark("prepare")
                # the graph's own output: the engine samples from it within the step, before any later replay
                return graphs.replay(size, len(rows), copy=False)
        inputs = rows.to_inputs(self.device)
        self._mark("prepare")
        return self.decode_step(inputs)

    def _execute_ragged(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """execute() of a prefill or mixed step through the decode step's fused ops (DecodeStep.ragged)."""
        input_ids, positions, batch = self.prepare(chunks)
        last_rows = self._logit_rows(chunks)
        rows = torch.tensor(last_rows, dtype=torch.long, device=self.device)
        self._mark("prepare")
        self.fast_prefill_steps += 1
        return self.decode_step.ragged(input_ids, positions, batch.slots, self._prefill_attend(batch), rows)

    def _prefill_attend(self, batch: AttentionBatch):
        """The decode step's attention callback for a ragged batch: the runner's prefill attention over the cache."""
        def attend(index: int, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> torch.Tensor:
            return self.attention(q, key_cache, value_cache, batch, self.decode_step.layers[index].scale,
                                  self.windows[index], softcap=self.attention_softcap)
        return attend

    @staticmethod
    def _logit_rows(chunks: list[ScheduledChunk]) -> list[int]:
        """Rows of the flattened batch whose logits are wanted: each chunk's num_logits trailing rows."""
        last_rows, row = [], -1
        for chunk in chunks:
            row += chunk.num_tokens
            last_rows += range(row - chunk.num_logits + 1, row + 1)
        return last_rows

    @torch.inference_mode()
    def execute_modules(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """execute() through the model's modules, whatever the chunks are (the reference of the decode step)."""
        input_ids, positions, batch = self.prepare(chunks)
        self._mark("prepare")
        hidden = self._forward_tokens(input_ids, positions, batch)
        last_rows = self._logit_rows(chunks)
        if not last_rows:
            return torch.empty(0, self.config.vocab_size, device=self.device)
        rows = torch.tensor(last_rows, device=self.device)
        return head_logits(self.model, hidden[rows], spec=self.spec).float()

    def _forward_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor,
                        batch: AttentionBatch) -> torch.Tensor:
        """The last layer's hidden states [T, hidden] of a flattened batch (its K/V written to the cache)."""
        hidden = self.embed(input_ids)
        if self.embedding_multiplier != 1.0:
            hidden = hidden * self.embedding_multiplier
        ropes = self._rope_per_layer(hidden, positions)
        for index, layer in enumerate(self.layers):
            hidden = self._layer(index, layer, hidden, *ropes[index], batch)
        return hidden

    def _rope_per_layer(self, hidden: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) [T, rotary dims] of each layer, from the model's own rotary module: rope scaling variants
        (llama3, yarn, linear) come out as the model's do; one table per layer type where the family has several."""
        def rope(*layer_type: str) -> tuple[torch.Tensor, torch.Tensor]:
            cos, sin = self.rotary(hidden.unsqueeze(0), positions.unsqueeze(0), *layer_type)
            return cos[0], sin[0]

        if not self.recipe.rope_per_layer_type:
            return [rope()] * len(self.layers)
        layer_types = list(self.config.layer_types)
        tables = {layer_type: rope(layer_type) for layer_type in set(layer_types)}
        return [tables[layer_type] for layer_type in layer_types]

    def _key_ropes(self) -> list[KeyRope]:
        """Each layer's RoPE as a function of positions, float32, from the model's own rotary module."""
        probe = torch.zeros(1, device=self.device, dtype=torch.float32)  # the rotary module reads its dtype

        def tables(*layer_type: str):
            def at(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                cos, sin = self.rotary(probe, positions.unsqueeze(0), *layer_type)
                return cos[0], sin[0]
            return at

        if not self.recipe.rope_per_layer_type:
            return [KeyRope(tables(), self.recipe.rope_layout)] * len(self.layers)
        return [KeyRope(tables(layer_type), self.recipe.rope_layout) for layer_type in self.config.layer_types]

    def _qkv(self, attention: nn.Module, x: torch.Tensor,
             decode_layer: DecodeLayer | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [T, heads, head_dim] of the attention's input, its q/k norms applied (RoPE not yet)."""
        tokens = x.shape[0]
        if decode_layer is not None and decode_layer.qkv is not None:  # the decode step's fused q/k/v
            q, k, v = decode_layer.qkv(x)
        elif self.recipe.fused_qkv:
            q_size = self.config.num_attention_heads * self.head_dim
            kv_size = self.kv_heads * self.head_dim
            q, k, v = getattr(attention, self.recipe.fused_qkv)(x).split([q_size, kv_size, kv_size], dim=-1)
        else:
            q, k, v = attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)
        if self.recipe.qk_norm == "projection":  # OLMo 2: one RMSNorm over all heads' q (and k)
            q, k = attention.q_norm(q), attention.k_norm(k)
        q, k, v = (t.reshape(tokens, -1, self.head_dim) for t in (q, k, v))
        if self.recipe.qk_norm == "head":  # Qwen3, Gemma 3: RMSNorm over each head
            q, k = attention.q_norm(q), attention.k_norm(k)
        return q, k, v

    def _layer(self, index: int, layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               batch: AttentionBatch) -> torch.Tensor:
        attention = layer.self_attn
        tokens = hidden.shape[0]
        placement = self.recipe.norm_placement
        # where the decode step fused this layer's linears, prefill runs them fused too: the parts' own backend
        # forms were dropped, so calling them would build a second copy of the weights
        decode_layer = self.decode_step.layers[index] if self.decode_step is not None else None
        q, k, v = self._qkv(attention, hidden if placement == "post" else layer.input_layernorm(hidden), decode_layer)
        layout = self.recipe.rope_layout
        q, k = apply_rope(q, cos, sin, layout), apply_rope(k, cos, sin, layout)
        key_cache, value_cache = self.cache.layer(index)
        write_kv(key_cache, value_cache, batch.slots, k, v, batch.positions)
        attended = self.attention(q, key_cache, value_cache, batch, attention.scaling, self.windows[index],
                                  softcap=self.attention_softcap)
        attention_out = attention.o_proj(attended.reshape(tokens, -1))
        if placement != "pre":
            attention_out = layer.post_attention_layernorm(attention_out)
        hidden = hidden + attention_out * self.residual_multiplier
        if placement == "pre":
            mlp_in = layer.post_attention_layernorm(hidden)
        elif placement == "sandwich":
            mlp_in = layer.pre_feedforward_layernorm(hidden)
        else:
            mlp_in = hidden
        if decode_layer is not None and decode_layer.gate_up is not None:  # checked at plan time: the same MLP
            mlp_out = decode_layer.mlp(mlp_in)
        else:  # the MLP gets a batch of one sequence of T tokens: MoE blocks read a [batch, seq, hidden] shape
            mlp_out = layer.mlp(mlp_in.unsqueeze(0)).squeeze(0)
        if placement != "pre":
            mlp_out = layer.post_feedforward_layernorm(mlp_out)
        return hidden + mlp_out * self.residual_multiplier

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int] | torch.Tensor, block_table: list[int] | None = None,
                      start: int = 0) -> torch.Tensor:
        """The logits [T, vocab] (float32) at every position of one prompt, its prefill run as one chunk through
        the paged cache as the engine runs it (its attention, its cache kind). Its K/V go to `block_table`'s blocks,
        by default the cache's first ones: a runner that serves an engine must be given blocks it has reserved.
        start: token_ids are the prompt's tokens from position start on, the first start tokens' K/V already in
        block_table's blocks (a later chunk of a chunked prefill)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1).to(self.device)
        count, block_size = ids.numel(), self.cache.block_size
        needed = -(-(start + count) // block_size)
        if block_table is None:
            num_blocks = self.cache.num_blocks
            if needed > num_blocks:
                raise QtoolError(f"a prompt of {start + count} tokens needs {needed} KV cache blocks of {block_size} "
                                 f"tokens, the runner has {num_blocks}", hint="give the ModelRunner more num_blocks")
            block_table = list(range(needed))
        batch = AttentionBatch.build([block_table], [start + count], [count], block_size, self.device)
        hidden = self._forward_tokens(ids, torch.arange(start, start + count, device=self.device), batch)
        return head_logits(self.model, hidden, spec=self.spec).float()
