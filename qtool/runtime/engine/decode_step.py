"""The fast decode step: one new token per sequence, made only of whole-tensor ops over fixed-shape inputs (no
Python loop over sequences, no host sync), so that it can be captured as a CUDA graph (cuda_graphs.py). It runs the
model's own linear modules (float, GPTQ or EXL2) and embedding, and the engine's per-token ops (kernels/engine_ops):
embed -> per layer [add_rms_norm -> q/k/v -> (q/k norms) -> rope_and_cache -> paged_decode_attention -> o_proj ->
add_rms_norm -> gate/up -> silu_mul -> down] -> final add_rms_norm -> head. RoPE comes from a cos/sin table computed
once from the model's rotary module. Whether a model's layers have this plain form is decided once, by probing its
modules (plan_decode_step); otherwise every step runs through model_runner's module path. Where the parts allow it,
q/k/v and gate/up run as one fused linear each (kernels/fused_linear.py): at batch 1 a token is bound by launches,
and the fused matmul reads the same bytes in fewer, fuller ones. On the CPU (no kernels there, every op a host
call) RoPE + cache write and attention go through HostDecodePlan: the references' results in fewer ops."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from qtool.kernels.engine_ops import (paged_decode_attention, paged_decode_attention_q4,
                                     paged_decode_attention_q8, q4_kernels_problem, q8_kernels_problem, rope_and_cache,
                                     rope_and_cache_q4, rope_and_cache_q8, silu_mul)
from qtool.kernels.fused_linear import FusedLinear, fuse_linears
from qtool.models.architectures import GATE_UP, QKV
from qtool.models.layer_forms import RmsNorm, gated_mlp_activation, norm_or_reason
from qtool.models.layerwise import head_logits, head_modules
from qtool.runtime.engine.scheduler import ScheduledChunk

if TYPE_CHECKING:
    from qtool.runtime.engine.model_runner import ModelRunner

# a layer's attention over the paged cache: (layer index, rotated queries [T, heads, d], its key and value cache)
# -> [T, heads, d]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# a layer's cache write and attention: (layer index, q [T, heads, d], k, v [T, kv_heads, d] before RoPE, cos, sin
# [T, d]) -> [T, heads, d]
LayerAttention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
@dataclass(frozen=True)
class DecodeLayer:
    """One decoder layer as the decode step calls it."""

    input_norm: RmsNorm
    post_attention_norm: RmsNorm
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    q_norm: RmsNorm | None  # Qwen3: RMSNorm over each head before RoPE
    k_norm: RmsNorm | None
    gate_proj: nn.Module
    up_proj: nn.Module
    down_proj: nn.Module
    activation: nn.Module | None  # None: SiLU through the fused silu_mul
    scale: float
    sliding_window: int | None
    qkv: FusedLinear | None = None  # q/k/v as one linear (the parts' tensors are views of its own)
    gate_up: FusedLinear | None = None  # gate/up as one linear

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [..., heads * head_dim] of the attention's input: views of one output where fused."""
        if self.qkv is not None:
            return self.qkv(x)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """down(act(gate(x)) * up(x)), gate and up from one fused linear where there is one."""
        gate, up = self.gate_up(x) if self.gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        activated = silu_mul(gate, up) if self.activation is None else self.activation(gate) * up
        return self.down_proj(activated)


def rope_table(rotary: nn.Module, num_positions: int, dtype: torch.dtype,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [num_positions, head_dim] of the model's own rotary module at positions 0..num_positions-1 (rope
    scaling variants come out as the model's do), in the model's dtype as the module gives them."""
    positions = torch.arange(num_positions, device=device).unsqueeze(0)
    with torch.no_grad():
        cos, sin = rotary(torch.empty(1, 1, 1, dtype=dtype, device=device), positions)
    return cos[0].contiguous(), sin[0].contiguous()


def rope_table_problem(rotary: nn.Module, cos: torch.Tensor, sin: torch.Tensor) -> str | None:
    """None when the table equals the rotary module called on a few position sets of their own, else why not (a
    rotary embedding that depends on more than the position, e.g. longrope's switch on the longest position)."""
    last = cos.shape[0] - 1
    for chosen in ([0, 1, 2, 3, 4, 5, 6, 7], [last], [0, last // 2, last]):
        positions = torch.tensor([chosen], device=cos.device).clamp(max=last)
        with torch.no_grad():
            module_cos, module_sin = rotary(torch.empty(1, 1, 1, dtype=cos.dtype, device=cos.device), positions)
        index = positions[0]
        if not (torch.equal(module_cos[0], cos[index]) and torch.equal(module_sin[0], sin[index])):
            return (f"its rotary embedding ({type(rotary).__name__}) at positions {positions[0].tolist()} differs "
                    "from a table of all positions")
    return None


@dataclass
class DecodeInputs:
    """The decode step's inputs, one row per sequence (padded rows: slot -1, context 0: no cache write, zero
    attention)."""

    input_ids: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64: the new token's position (its context length - 1)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32: tokens with K/V in the cache once the new one is written
    slots: torch.Tensor  # [B] int64: the new token's flat cache slot
    own_slots: torch.Tensor | None = None  # [B] int64, a q4 cache: the staging slot of the new token's block (-1)


@dataclass
class DecodeRows:
    """A decode batch on the host: what DecodeInputs holds, as lists."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    block_tables: list[list[int]]
    own_slots: list[int] | None = None  # a q4 cache: each row's staging slot (q4_decode.plan_q4_decode)

    @classmethod
    def from_chunks(cls, chunks: list[ScheduledChunk], block_size: int) -> "DecodeRows":
        """One row per token of the chunks, in the flattened batch's order. A chunk of n tokens (a short prefill,
        a speculative verification) becomes n rows of its sequence at positions start..start+n-1, each seeing the
        context up to itself: the step writes every row's K/V before any row attends, so each row reads the rows
        before it as a causal prefill would."""
        ids, positions, slots, tables = [], [], [], []
        for chunk in chunks:
            table = chunk.seq.block_table
            for position, token in enumerate(chunk.token_ids(), start=chunk.start):
                ids.append(token)
                positions.append(position)
                slots.append(table[position // block_size] * block_size + position % block_size)
                tables.append(table)
        return cls(ids, positions, slots, tables)

    def __len__(self) -> int:
        return len(self.input_ids)

    def to_inputs(self, device: torch.device, width: int | None = None) -> DecodeInputs:
        """Tensors on `device`; the block tables padded with 0 to `width` blocks (default: the longest table). Two
        host->device copies: ids, positions, slots (and staging slots) as one int64 tensor, the tables as one int32
        tensor."""
        width = width or max(len(table) for table in self.block_tables)
        tables = torch.tensor([table + [0] * (width - len(table)) for table in self.block_tables], dtype=torch.int32)
        fields = [self.input_ids, self.positions, self.slots] + ([self.own_slots] if self.own_slots else [])
        longs = torch.tensor(fields, dtype=torch.long).to(device)
        return DecodeInputs(longs[0], longs[1], tables.to(device), (longs[1] + 1).to(torch.int32), longs[2],
                            longs[3] if self.own_slots else None)


class HostDecodePlan:
    """The decode step's RoPE + cache write and attention for the CPU, where every op is a host call and the Triton
    kernels do not run: the same results as engine_ops' references (rope_and_cache_ref, paged_decode_attention_ref)
    in fewer ops. What the references redo in every layer is worked out once per step: the slots each row reads and
    which of them it may see, and which rows write (padded rows, slot -1, write nothing). Per layer, q and k are
    rotated together, the new K/V stored by index_copy_, and the attention is torch's fused SDPA over the K/V
    gathered by those slots (GQA without repeating the keys); rows without context (padding) give zeros."""

    def __init__(self, inputs: DecodeInputs, block_size: int, layers: list[DecodeLayer]):
        tables, lens = inputs.block_tables.long(), inputs.context_lens.long()
        positions = torch.arange(tables.shape[1] * block_size, device=tables.device)
        self.read_slots = tables[:, positions // block_size] * block_size + positions % block_size  # [B, ctx]
        seen = positions.view(1, -1) < lens.view(-1, 1)

        def mask(window: int | None) -> torch.Tensor:  # [B, 1, 1, ctx]
            allowed = seen if window is None else seen & (positions.view(1, -1) >= lens.view(-1, 1) - window)
            return allowed.view(len(lens), 1, 1, -1)

        self.masks = {window: mask(window) for window in {layer.sliding_window for layer in layers}}
        empty = lens == 0
        self.empty = empty.view(-1, 1, 1) if bool(empty.any()) else None
        writes = inputs.slots >= 0
        self.writing_rows = None if bool(writes.all()) else writes.nonzero().squeeze(1)
        self.write_slots = inputs.slots if self.writing_rows is None else inputs.slots[self.writing_rows]
        self.layers = layers

    def rope_and_cache(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> torch.Tensor:
        """rope_and_cache_ref's contract, at the slots of the inputs this plan was made from."""
        heads, (kv_heads, head_dim) = query.shape[1], key_cache.shape[-2:]
        both = torch.cat((query, key), dim=1).float()  # [B, heads + kv_heads, d]: one rotation for q and k
        half = head_dim // 2
        rotated = torch.cat((-both[..., half:], both[..., :half]), dim=-1)
        both = both * cos.float().unsqueeze(1) + rotated * sin.float().unsqueeze(1)
        key, rotated_query = both[:, heads:].to(key.dtype), both[:, :heads].to(query.dtype)
        if self.writing_rows is not None:
            key, value = key[self.writing_rows], value[self.writing_rows]
        key_cache.view(-1, kv_heads, head_dim).index_copy_(0, self.write_slots, key.to(key_cache.dtype))
        value_cache.view(-1, kv_heads, head_dim).index_copy_(0, self.write_slots, value.to(value_cache.dtype))
        return rotated_query

    def attend(self, index: int, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> torch.Tensor:
        layer = self.layers[index]
        kv_heads, head_dim = key_cache.shape[-2:]
        keys = key_cache.view(-1, kv_heads, head_dim)[self.read_slots].transpose(1, 2)  # [B, kv_heads, ctx, d]
        values = value_cache.view(-1, kv_heads, head_dim)[self.read_slots].transpose(1, 2)
        out = nn.functional.scaled_dot_product_attention(
            q.unsqueeze(2), keys.to(q.dtype), values.to(q.dtype), attn_mask=self.masks[layer.sliding_window],
            scale=layer.scale, enable_gqa=kv_heads != q.shape[1]).squeeze(2)
        return out if self.empty is None else out.masked_fill(self.empty, 0.0)


class DecodeStep:
    """The decode step of one model (build it with plan_decode_step). Calling it with DecodeInputs of B rows writes
    each row's new K/V into the runner's cache and returns logits [B, vocab] (float32). With a q4 cache the inputs
    carry each row's staging slot, and the host runs q4_decode's plan before the step and its finish after."""

    def __init__(self, runner: "ModelRunner", layers: list[DecodeLayer], final_norm: RmsNorm | None,
                 cos: torch.Tensor, sin: torch.Tensor, key_cos: torch.Tensor | None = None,
                 key_sin: torch.Tensor | None = None):
        self.runner = runner
        self.layers = layers
        self.final_norm = final_norm  # None: the model's head_logits (its final norm module and logit transforms)
        self.cos, self.sin = cos, sin
        # a q4 cache: the float32 table its keys are turned back before RoPE with and by again when read (the
        # cache's KeyRope: the rotary module in float32, which a table of all positions equals)
        self.key_cos, self.key_sin = key_cos, key_sin
        self.embed = runner.embed
        self.head = head_modules(runner.model, runner.spec)[1]
        self.head_dim = runner.head_dim
        self.embedding_multiplier = runner.embedding_multiplier
        self.residual_multiplier = runner.residual_multiplier

    @property
    def max_positions(self) -> int:
        return self.cos.shape[0]

    def _scaled(self, branch: torch.Tensor) -> torch.Tensor:
        return branch if self.residual_multiplier == 1.0 else branch * self.residual_multiplier

    @property
    def is_q4(self) -> bool:
        return self.key_cos is not None

    @property
    def is_q8(self) -> bool:
        return self.runner.cache.kind == "q8"

    def __call__(self, inputs: DecodeInputs) -> torch.Tensor:
        if self.is_q4:
            attention = self._q4_attention(inputs)
        elif self.is_q8:
            attention = self._q8_attention(inputs)
        elif inputs.input_ids.device.type == "cpu":  # no kernels there: a plan made once per step, fewer host ops
            attention = self._host_attention(inputs)
        else:
            def attend(index: int, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> torch.Tensor:
                layer = self.layers[index]
                return paged_decode_attention(q, key_cache, value_cache, inputs.block_tables, inputs.context_lens,
                                              layer.scale, layer.sliding_window)

            attention = self._float_attention(inputs.slots, attend)
        hidden, residual = self._layers(inputs.input_ids, inputs.positions, attention)
        return self._head(hidden, residual)

    def _float_attention(self, slots: torch.Tensor, attend: Attend) -> LayerAttention:
        """RoPE + the write into a float cache, then `attend` over it."""
        def attention(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor:
            key_cache, value_cache = self.runner.cache.layer(index)
            return attend(index, rope_and_cache(q, k, v, cos, sin, key_cache, value_cache, slots), key_cache,
                          value_cache)
        return attention

    def _host_attention(self, inputs: DecodeInputs) -> LayerAttention:
        """On the CPU: the step's cache indices and masks worked out once (HostDecodePlan), used by every layer."""
        plan = HostDecodePlan(inputs, self.runner.cache.block_size, self.layers)

        def attention(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor:
            key_cache, value_cache = self.runner.cache.layer(index)
            q = plan.rope_and_cache(q, k, v, cos, sin, key_cache, value_cache)
            return plan.attend(index, q, key_cache, value_cache)
        return attention

    def _q8_attention(self, inputs: DecodeInputs) -> LayerAttention:
        """RoPE + the q8 write (key and value turned by the cache's rotation, int8 codes and a scale per token and
        kv head), then the decode attention over the codes in the turned frame (engine_ops' q8 ops)."""
        cache = self.runner.cache

        def attention(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor:
            layer = self.layers[index]
            codes = (cache.key_codes[index], cache.key_scales[index], cache.value_codes[index],
                     cache.value_scales[index])
            q = rope_and_cache_q8(q, k, v, cos, sin, cache.rotation, *codes, inputs.slots)
            return paged_decode_attention_q8(q, *codes, cache.rotation, inputs.block_tables, inputs.context_lens,
                                             layer.scale, layer.sliding_window)
        return attention

    def _q4_attention(self, inputs: DecodeInputs) -> LayerAttention:
        """RoPE + the q4 write (key before RoPE and value into the row's staging slot, the value's codes at its
        cache slot), then the decode attention reading the own block from the slot, earlier blocks from codes.
        Keys' codes are the host's, once a block is full (q4_decode.py)."""
        cache = self.runner.cache
        block_size = cache.block_size
        own_slots = inputs.own_slots
        staged = (own_slots >= 0) & (inputs.slots >= 0)
        staging_rows = torch.where(staged, own_slots * block_size + inputs.positions % block_size, -1)
        key_cos, key_sin = self.key_cos[inputs.positions], self.key_sin[inputs.positions]

        def attention(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor:
            layer = self.layers[index]
            key_staging, value_staging = cache.key_staging[index], cache.value_staging[index]
            value_codes, value_parameters = cache.value_codes[index], cache.value_scales[index]
            q = rope_and_cache_q4(q, k, v, cos, sin, key_cos, key_sin, cache.rotation, key_staging, value_staging,
                                  value_codes, value_parameters, staging_rows, inputs.slots)
            return paged_decode_attention_q4(q, cache.key_codes[index], cache.key_scales[index], value_codes,
                                             value_parameters, key_staging, value_staging, cache.rotation,
                                             self.key_cos, self.key_sin, inputs.block_tables, inputs.context_lens,
                                             own_slots, layer.scale, layer.sliding_window)
        return attention

    def ragged(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, attend: Attend,
               rows: torch.Tensor) -> torch.Tensor:
        """A prefill or mixed step (any number of tokens per sequence, flattened: [T] ids, positions, slots)
        through the same fused ops, its attention by `attend` (the runner's prefill attention over the paged
        cache, which holds the step's K/V when it is called); the logits [len(rows), vocab] of the batch's `rows`.
        A few fused kernels per layer instead of the modules' many small ones: the host launches less before the
        first token."""
        hidden, residual = self._layers(input_ids, positions, self._float_attention(slots, attend))
        return self._head(hidden[rows], residual[rows])

    def _layers(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attention: LayerAttention) -> tuple[torch.Tensor, torch.Tensor]:
        """The last layer's output and the residual stream before their add (fused with the final norm)."""
        batch = input_ids.shape[0]
        hidden = self.embed(input_ids)
        if self.embedding_multiplier != 1.0:
            hidden = hidden * self.embedding_multiplier
        cos, sin = self.cos[positions], self.sin[positions]
        residual = None
        for index, layer in enumerate(self.layers):
            # the previous branch's residual add, fused with this layer's input norm
            normed, residual = layer.input_norm(hidden, residual)
            q, k, v = (t.view(batch, -1, self.head_dim) for t in layer.project_qkv(normed))
            if layer.q_norm is not None:
                q, k = layer.q_norm(q)[0], layer.k_norm(k)[0]
            attended = attention(index, q, k, v, cos, sin)
            normed, residual = layer.post_attention_norm(self._scaled(layer.o_proj(attended.reshape(batch, -1))),
                                                         residual)
            hidden = self._scaled(layer.mlp(normed))
        return hidden, residual

    def _head(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if self.final_norm is None:
            return head_logits(self.runner.model, hidden + residual, spec=self.runner.spec).float()
        normed, _ = self.final_norm(hidden, residual)
        return self.head(normed).float()


def _decode_layer(runner: "ModelRunner", index: int) -> tuple[DecodeLayer | None, str | None]:
    layer = runner.layers[index]
    attention = layer.self_attn
    where = f"layer {index}"
    input_norm, why = norm_or_reason(getattr(layer, "input_layernorm", None), f"{where}'s input norm")
    if why:
        return None, why
    post_norm, why = norm_or_reason(getattr(layer, "post_attention_layernorm", None), f"{where}'s MLP norm")
    if why:
        return None, why
    q_norm = k_norm = None
    if hasattr(attention, "q_norm") and hasattr(attention, "k_norm"):
        q_norm, why = norm_or_reason(attention.q_norm, f"{where}'s q_norm")
        k_norm, why_k = norm_or_reason(attention.k_norm, f"{where}'s k_norm")
        if why or why_k:
            return None, why or why_k
    activation, why = gated_mlp_activation(layer.mlp, runner.config.hidden_size, runner.dtype, runner.device)
    if why:
        return None, f"{where}: {why}"
    mlp = layer.mlp
    return DecodeLayer(input_norm, post_norm, attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                       q_norm, k_norm, mlp.gate_proj, mlp.up_proj, mlp.down_proj, activation,
                       float(attention.scaling), runner.windows[index]), None


Q4_PHRASE = ("a q4 KV cache (each row's block exact from its staging slot, earlier blocks from their codes; a block's "
             "keys quantized by the host once a step fills it)")
Q8_PHRASE = "a q8 KV cache (int8 codes of the rotated keys and values, read in the rotated frame)"


def _cache_problem(runner: "ModelRunner") -> str | None:
    """What of the runner's KV cache the decode step's ops cannot take, or None: float caches, q4 and q8 (each with
    its own write and attention kernels; off CUDA their torch references)."""
    cache = runner.cache
    if not cache.is_quantized:
        return None
    problems = {"q4": q4_kernels_problem, "q8": q8_kernels_problem}
    if cache.kind not in problems:
        return f"a {cache.kind} KV cache has no decode-step kernels (the step takes float, q8 and q4 caches)"
    if runner.device.type == "cuda":  # off CUDA the torch references run in any case
        probe = torch.empty(1, 1, runner.head_dim, device=runner.device, dtype=runner.dtype)
        why = problems[cache.kind](probe)
        if why:
            return f"the {cache.kind} cache's decode kernels cannot run here: {why}"
    return None


def _applies_logit_transforms(runner: "ModelRunner") -> bool:
    return any(getattr(runner.config, field, None) is not None for _, field in runner.spec.logit_transforms)


def _recipe_problem(runner: "ModelRunner") -> str | None:
    """What of the family's recipe (model_runner.FamilyRecipe) the decode step's ops cannot express, or None."""
    recipe = runner.recipe
    lacking = [what for what, present in (
        (f"{recipe.norm_placement}-norm layers (norms on each branch's output)", recipe.norm_placement != "pre"),
        ("q/k norms over the whole projection", recipe.qk_norm == "projection"),
        (f"a fused {recipe.fused_qkv}", recipe.fused_qkv is not None),
        ("attention logit softcapping", runner.attention_softcap is not None),
        (f"{recipe.rope_layout} RoPE pairs (rope_and_cache rotates halves)", recipe.rope_layout != "half"),
        ("a rotary embedding per layer type", recipe.rope_per_layer_type),
    ) if present]
    return f"its family needs what the decode step's ops lack: {', '.join(lacking)}" if lacking else None


def _fusion_phrase(what: str, fused: int, total: int, first_refusal: str | None) -> str:
    if fused == total:
        return f"fused {what}"
    if fused == 0:
        return f"{what} unfused ({first_refusal})"
    return f"fused {what} in {fused} of {total} layers ({first_refusal})"


def _fuse_group(parts: list[nn.Module], members: tuple[str, ...],
                fusable: set[tuple[str, ...]]) -> tuple[FusedLinear | None, str | None]:
    if members not in fusable:
        return None, f"the family's table lists no fusable group of {', '.join(members)}"
    return fuse_linears(parts, [member.rpartition(".")[2] for member in members])


def fuse_layer_projections(layers: list[DecodeLayer],
                           fusable_groups: tuple[tuple[str, tuple[str, ...]], ...]) -> tuple[list[DecodeLayer], str]:
    """The layers with q/k/v and gate/up each fused into one linear where the family's table lists the group
    (ArchitectureSpec.fusable_groups) and their parts allow it (the parts' tensors become views of the fused ones:
    the model keeps one copy of its weights), and a phrase saying what was fused and, where something was not, the
    first layer's reason."""
    fusable = {members for _, members in fusable_groups}
    fused_layers: list[DecodeLayer] = []
    counts = {"q/k/v": 0, "gate/up": 0}
    refusals: dict[str, str] = {}
    for index, layer in enumerate(layers):
        qkv, why_qkv = _fuse_group([layer.q_proj, layer.k_proj, layer.v_proj], QKV, fusable)
        gate_up, why_mlp = _fuse_group([layer.gate_proj, layer.up_proj], GATE_UP, fusable)
        for what, result, why in (("q/k/v", qkv, why_qkv), ("gate/up", gate_up, why_mlp)):
            if result is not None:
                counts[what] += 1
            else:
                refusals.setdefault(what, f"layer {index}: {why}")
        fused_layers.append(replace(layer, qkv=qkv, gate_up=gate_up))
    total = len(layers)
    if all(count == total for count in counts.values()):
        return fused_layers, "fused q/k/v and gate/up projections"
    return fused_layers, ", ".join(_fusion_phrase(what, counts[what], total, refusals.get(what)) for what in counts)


def plan_decode_step(runner: "ModelRunner", max_positions: int,
                     fuse_projections: bool = True) -> tuple[DecodeStep | None, str]:
    """The runner's model as a DecodeStep over positions 0..max_positions-1, and a line saying what it runs; or
    (None, why the model's decode steps stay on the module path). Decided once, by probing the modules. With
    fuse_projections, each layer's q/k/v and gate/up run as one linear each where their parts allow it
    (fuse_layer_projections); the model's parts then read the fused tensors."""
    why = _cache_problem(runner)
    if why:
        return None, why
    why = _recipe_problem(runner)
    if why:
        return None, why
    layers: list[DecodeLayer] = []
    for index in range(len(runner.layers)):
        layer, why = _decode_layer(runner, index)
        if why:
            return None, why
        layers.append(layer)
    final_norm = None
    if not _applies_logit_transforms(runner):
        final_norm, why = norm_or_reason(head_modules(runner.model, runner.spec)[0], "the final norm")
        if why:
            return None, why
    cos, sin = rope_table(runner.rotary, max_positions, runner.dtype, runner.device)
    why = rope_table_problem(runner.rotary, cos, sin)
    key_cos = key_sin = None
    if why is None and runner.cache.kind == "q4":  # its keys are held before RoPE
        key_cos, key_sin = rope_table(runner.rotary, max_positions, torch.float32, runner.device)
        why = rope_table_problem(runner.rotary, key_cos, key_sin)
    if why is None and cos.shape[-1] != runner.head_dim:
        why = f"its rotary embedding covers {cos.shape[-1]} of {runner.head_dim} head dims (partial rotary)"
    if why:
        return None, why
    activation = layers[0].activation
    mlp = "silu_mul" if activation is None else f"{type(activation).__name__}(gate) * up, unfused"
    extras = [name for name, present in (("q/k norms", layers[0].q_norm is not None),
                                         ("logit transforms by the head module", final_norm is None),
                                         ("sliding windows", any(l.sliding_window for l in layers)),
                                         (Q4_PHRASE, key_cos is not None),
                                         (Q8_PHRASE, runner.cache.kind == "q8")) if present]
    offset = layers[0].input_norm.weight_offset
    fusion = "q/k/v and gate/up unfused (fusion off)"
    if fuse_projections:  # last: the step is decided, and fusing rebinds the model's tensors
        layers, fusion = fuse_layer_projections(layers, runner.spec.fusable_groups)
    description = (f"whole-tensor decode step: RMSNorm{' (1 + w)' if offset else ''} fused with the residual add, "
                   f"gated MLP ({mlp}), RoPE table of {max_positions} positions"
                   + (f", {', '.join(extras)}" if extras else "") + f", {fusion}")
    return DecodeStep(runner, layers, final_norm, cos, sin, key_cos, key_sin), description

