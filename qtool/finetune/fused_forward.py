"""The fine-tuning step's own forward for plain pre-norm decoders (Llama, Mistral, Qwen2, Qwen3, Gemma, Granite):
the model's modules do the linears (float, GPTQ or EXL2 bases, each wrapped by its LoRA layer) and the embedding;
the fused autograd operations of kernels/train_ops do the rest: residual add + RMSNorm, RoPE, SiLU(gate) * up
(another elementwise activation, Gemma's tanh GELU, runs as the module's own act(gate) * up), and the head's linear
+ cross entropy a chunk of rows at a time (no [tokens, vocab] float32 logits; a logit scaling such as Granite's is
folded into the head's input). Attention is torch's SDPA: causal over a plain row, block-diagonal where position ids
restart (packed examples, as transformers reads them), within a sliding window where a layer has one shorter than
the row. Each decoder layer is one checkpointed segment when the model has gradient checkpointing on. Whether a
model has this form is decided once, by probing its modules (plan_fused_forward); otherwise training stays on
transformers' forward, and the plan says why."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qtool.kernels.train_ops import (add_rms_norm, linear_cross_entropy, rms_norm, rope, silu_mul,
                                     train_kernels_problem)
from qtool.models.architectures import ArchitectureSpec, decoder_layers, get_architecture, get_module
from qtool.models.layer_forms import RmsNorm, gated_mlp_activation, norm_or_reason

# model type -> whether its attention has q/k norms over each head (Qwen3); windows are read from the modules
# (Gemma's scaled embeddings and 1 + w norms live in its modules: the embedding module is called, the norms probed;
# Granite's multipliers are config fields, read by _multiplier)
FUSED_FAMILIES = {"llama": False, "mistral": False, "qwen2": False, "qwen3": True, "gemma": False, "granite": False}
# logit transforms that scale the logits, folded into the head's input: (h @ W^T) / v = (h / v) @ W^T
LINEAR_LOGIT_TRANSFORMS = ("divide", "multiply")


@dataclass(frozen=True)
class FusedLayer:
    input_norm: RmsNorm
    post_norm: RmsNorm
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    q_norm: RmsNorm | None
    k_norm: RmsNorm | None
    gate_proj: nn.Module
    up_proj: nn.Module
    down_proj: nn.Module
    activation: nn.Module | None  # None: SiLU through the fused silu_mul
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    window: int | None


def _norm(x: torch.Tensor, norm: RmsNorm) -> torch.Tensor:
    return rms_norm(x, norm.weight, norm.eps, norm.weight_offset)


@dataclass(frozen=True)
class FusedForward:
    """A planned model's forward and summed token loss. Holds the model's own modules and tensors (no copies)."""

    model: nn.Module  # the transformers causal LM (under its PEFT wrapper's layers)
    embed: nn.Module
    rotary: nn.Module
    layers: tuple[FusedLayer, ...]
    final_norm: RmsNorm
    head: nn.Linear
    attention_dropout: float
    embedding_multiplier: float = 1.0  # Granite: the embeddings scaled
    residual_multiplier: float = 1.0  # Granite: each branch's output scaled before its residual add
    logit_scale: float = 1.0  # the logits' linear transforms, applied to the head's input

    def _layer(self, layer: FusedLayer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        batch, tokens, _ = hidden.shape
        normed = _norm(hidden, layer.input_norm)
        q = layer.q_proj(normed).view(batch * tokens, layer.heads, layer.head_dim)
        k = layer.k_proj(normed).view(batch * tokens, layer.kv_heads, layer.head_dim)
        v = layer.v_proj(normed).view(batch, tokens, layer.kv_heads, layer.head_dim)
        if layer.q_norm is not None:
            q, k = _norm(q, layer.q_norm), _norm(k, layer.k_norm)
        q = rope(q, cos, sin).view(batch, tokens, layer.heads, layer.head_dim)
        k = rope(k, cos, sin).view(batch, tokens, layer.kv_heads, layer.head_dim)
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=mask is None,
            dropout_p=self.attention_dropout if self.model.training else 0.0, scale=layer.scale,
            enable_gqa=layer.kv_heads != layer.heads)
        attended = attended.transpose(1, 2).reshape(batch, tokens, layer.heads * layer.head_dim)
        normed, summed = add_rms_norm(self._scaled(layer.o_proj(attended)), hidden, layer.post_norm.weight,
                                      layer.post_norm.eps, layer.post_norm.weight_offset)
        gate, up = layer.gate_proj(normed), layer.up_proj(normed)
        activated = silu_mul(gate, up) if layer.activation is None else layer.activation(gate) * up
        return summed + self._scaled(layer.down_proj(activated))

    def _scaled(self, branch: torch.Tensor) -> torch.Tensor:
        return branch if self.residual_multiplier == 1.0 else branch * self.residual_multiplier

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The final norm's output [B, T, hidden] for input_ids and position_ids [B, T]."""
        hidden = self.embed(input_ids)
        if self.embedding_multiplier != 1.0:
            hidden = hidden * self.embedding_multiplier
        cos, sin = self.rotary(hidden, position_ids)
        cos, sin = cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1])
        masks = {window: attention_mask(position_ids, window) for window in {layer.window for layer in self.layers}}
        checkpointed = self.model.training and checkpointing_on(self.model)
        for layer in self.layers:
            if checkpointed and torch.is_grad_enabled():
                # the mask as an argument of its own: a dict keyed by None cannot pass a profiler's record_shapes
                hidden = checkpoint(self._layer, layer, hidden, cos, sin, masks[layer.window], use_reentrant=False)
            else:
                hidden = self._layer(layer, hidden, cos, sin, masks[layer.window])
        return _norm(hidden, self.final_norm)

    def summed_token_loss(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                          ignore_index: int) -> torch.Tensor:
        """Sum over the label tokens of the next-token cross entropy (float32), as the trainer's loss over
        transformers' logits: position t predicts labels[t + 1]."""
        hidden = self.hidden_states(input_ids, position_ids)
        if self.logit_scale != 1.0:
            hidden = hidden * self.logit_scale
        shifted = torch.cat((labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)), dim=1)
        return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]).contiguous(), self.head.weight,
                                    shifted.reshape(-1), ignore_index)


def checkpointing_on(model: nn.Module) -> bool:
    """Whether transformers' gradient checkpointing is on for the model (its v5 name first: the old one warns)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def attention_mask(position_ids: torch.Tensor, window: int | None) -> torch.Tensor | None:
    """None where SDPA's own causal mask is the whole story (every row one sequence, no window shorter than it);
    else a boolean [B, 1, T, T] mask: causal, within the sequence a position-id restart begins, and within the
    window."""
    batch, tokens = position_ids.shape
    starts = position_ids == 0
    single = bool((position_ids == torch.arange(tokens, device=position_ids.device)).all())
    if single and (window is None or window >= tokens):
        return None
    index = torch.arange(tokens, device=position_ids.device)
    allowed = (index.view(1, -1) <= index.view(-1, 1)).expand(batch, tokens, tokens)
    if not single:
        sequence = starts.long().cumsum(dim=1)
        allowed = allowed & (sequence.unsqueeze(2) == sequence.unsqueeze(1))
    if window is not None and window < tokens:
        allowed = allowed & (index.view(-1, 1) - index.view(1, -1) < window)
    return allowed.unsqueeze(1)


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (its layers are the wrapped ones), or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.bias is None


def _fused_layer(model: nn.Module, spec: ArchitectureSpec, layer: nn.Module, index: int,
                 qk_norm: bool) -> tuple[FusedLayer | None, str | None]:
    where = f"layer {index}"
    config = model.config
    attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attention is None or mlp is None or not all(hasattr(attention, name) for name in ("q_proj", "k_proj",
                                                                                          "v_proj", "o_proj")):
        return None, f"{where} is not self_attn (q/k/v/o_proj) + mlp"
    input_norm, why = norm_or_reason(getattr(layer, "input_layernorm", None), f"{where}'s input norm")
    post_norm, why_post = norm_or_reason(getattr(layer, "post_attention_layernorm", None), f"{where}'s MLP norm")
    if why or why_post:
        return None, why or why_post
    q_norm = k_norm = None
    if qk_norm:
        q_norm, why = norm_or_reason(getattr(attention, "q_norm", None), f"{where}'s q_norm")
        k_norm, why_k = norm_or_reason(getattr(attention, "k_norm", None), f"{where}'s k_norm")
        if why or why_k:
            return None, why or why_k
    weight = input_norm.weight
    activation, why = gated_mlp_activation(mlp, config.hidden_size, weight.dtype, weight.device)
    if why:
        return None, f"{where}: {why}"
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return FusedLayer(input_norm, post_norm, attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                      q_norm, k_norm, mlp.gate_proj, mlp.up_proj, mlp.down_proj, activation, heads, kv_heads, head_dim,
                      float(attention.scaling), spec.layer_window(config, attention)), None


def _model_problem(model: nn.Module, spec: ArchitectureSpec) -> str | None:
    config = model.config
    if config.model_type not in FUSED_FAMILIES:
        return f"its family ({config.model_type}) is not one of {', '.join(sorted(FUSED_FAMILIES))}"
    transforms = [field for kind, field in spec.logit_transforms
                  if getattr(config, field, None) is not None and kind not in LINEAR_LOGIT_TRANSFORMS]
    if transforms:
        return f"its logits go through {', '.join(transforms)}"
    return None


def plan_fused_forward(model: nn.Module) -> tuple[FusedForward | None, str]:
    """(the fused forward of the model, a line saying what it runs), or (None, why the model stays on
    transformers' forward). model: a transformers causal LM or the PEFT model wrapping one."""
    base = _base_model(model)
    config = getattr(base, "config", None)
    if config is None:
        return None, f"{type(base).__name__} has no transformers config"
    try:
        spec = get_architecture(base)
    except Exception as exc:  # a family the table does not know: the plan says so, training goes on unfused
        return None, f"no architecture entry ({exc})"
    why = _model_problem(base, spec)
    if why:
        return None, why
    layers = []
    for index, layer in enumerate(decoder_layers(base, spec)):
        fused, why = _fused_layer(base, spec, layer, index, FUSED_FAMILIES[config.model_type])
        if why:
            return None, why
        layers.append(fused)
    final_norm, why = norm_or_reason(get_module(base, spec.norm_path) if spec.norm_path else None, "the final norm")
    if why:
        return None, why
    head = get_module(base, spec.head_path)
    if not _plain_linear(head):
        return None, f"its head ({type(head).__name__}) is not a bias-free linear (an adapter on the head?)"
    rotary = get_module(base, spec.layers_path.rpartition(".")[0] + ".rotary_emb")
    windows = sorted({layer.window for layer in layers if layer.window})
    activation = layers[0].activation
    mlp = "SiLU * up" if activation is None else f"{type(activation).__name__}(gate) * up unfused"
    description = (f"fused training forward: RMSNorm{' (1 + w)' if final_norm.weight_offset else ''} + residual add, "
                   f"RoPE, {mlp}, chunked head + cross entropy" + (f", sliding windows {windows}" if windows else "")
                   + (", q/k norms" if layers[0].q_norm is not None else ""))
    logit_scale = 1.0
    for kind, field in spec.logit_transforms:
        value = getattr(config, field, None)
        if value is not None:
            logit_scale = logit_scale / float(value) if kind == "divide" else logit_scale * float(value)
    return FusedForward(base, get_module(base, spec.embed_path), rotary, tuple(layers), final_norm, head,
                        float(getattr(config, "attention_dropout", 0.0) or 0.0),
                        spec.embedding_multiplier(config), spec.residual_multiplier(config),
                        logit_scale), description


def training_forward(model: nn.Module, setting: str, device: torch.device) -> tuple[FusedForward | None, str]:
    """The forward a run trains through, by the config's fused_ops (auto: fused on CUDA; on: fused anywhere; off:
    transformers'), and the one line saying which and, where the fused one does not apply, why."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None, f"training forward: transformers' (fused_ops {setting}{' on ' + device.type if setting == 'auto' else ''})"
    fused, description = plan_fused_forward(model)
    # the kernels' build-and-compare check only where the model would use them (it compiles them at start-up)
    why = description if fused is None else train_kernels_problem(device)
    if why:
        return None, f"training forward: transformers' ({why})"
    return fused, description
