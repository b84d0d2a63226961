"""The engine's front: requests in (text or token ids, each with its SamplingParams), one step at a time through
scheduler, model runner and sampler, text streamed per request as it forms, results out with cache and preemption stats."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence as Seq

import torch
from torch import nn

from qtool.models.finite_outputs import model_name, non_finite_logits_error
from qtool.core.errors import QtoolError
from qtool.runtime.engine.block_manager import BlockManager, cache_window
from qtool.runtime.engine.detokenizer import IncrementalDetokenizer
from qtool.runtime.engine.drafters import DraftModelDrafter, NgramDrafter, check_draft_model
from qtool.runtime.engine.model_runner import ModelRunner
from qtool.runtime.engine.sampling import SamplingParams, request_generator, sample_finite, token_logprobs
from qtool.runtime.engine.scheduler import ScheduledChunk, Scheduler
from qtool.runtime.engine.sequence import Sequence
from qtool.runtime.engine.speculation import Speculator, verification_contexts
from qtool.runtime.engine.step_phases import StepPhases
from qtool.runtime.speculative_names import SPECULATIVE_METHODS
from qtool.runtime.generate import stop_token_ids
from qtool.runtime.kv_cache_names import check_kv_cache, default_block_size
from qtool.runtime.token_logprobs import TokenLogprob

# KV cache size when neither num_blocks nor kv_cache_bytes is given: room for max_num_seqs full contexts, capped here
DEFAULT_KV_CACHE_BYTES = 2 << 30
# on CUDA, chunks of at most this many tokens run as decode rows through the decode graphs (short_prefill_rows): a
# short prompt, a prefix-cache hit's new tokens, a chat turn over its cached history, a speculative verification
SHORT_PREFILL_ROWS = 64
TextCallback = Callable[[str], None]
LogprobsCallback = Callable[[list[TokenLogprob]], None]


@dataclass(frozen=True)
class EngineConfig:
    # tokens per KV cache block (and per prefix-cache key); None: kv_cache_names.default_block_size (64 for q4, whose
    # keys take per-channel parameters per block, else 16); resolved at construction, so dataclasses.replace with
    # another kv_cache keeps it unless given block_size=None too
    block_size: int | None = None
    num_blocks: int | None = None  # KV cache blocks; or size the cache by kv_cache_bytes
    kv_cache_bytes: int | None = None
    max_num_seqs: int = 64  # sequences in the running batch at most
    max_num_batched_tokens: int = 2048  # tokens computed per step at most (prefills are chunked to fit)
    kv_dtype: torch.dtype | None = None  # a float cache's dtype (None: the model's); kv_cache names the others
    kv_cache: str = "auto"  # auto (the model's dtype, or kv_dtype), fp16, bf16, q8 or q4
    # speculative decoding of greedy requests: None, "ngram" (prompt lookup) or "draft" (a draft model given to Engine)
    speculative: str | None = None
    num_speculative_tokens: int = 4  # the most draft tokens per step (each request's adaptive length stays under it)
    prompt_lookup_max: int = 3  # prompt lookup matches the last n tokens, n from this down to prompt_lookup_min
    prompt_lookup_min: int = 1
    # one-token steps through the whole-tensor decode step where the model allows it (decode_step.py); None: on CUDA
    fast_decode: bool | None = None
    cuda_graphs: bool = True  # on CUDA, capture that step as CUDA graphs at engine start (batch sizes 1, 2, 4, ...)
    # the largest captured batch (None: max_num_seqs, or short_prefill_rows where larger); larger batches run eagerly
    max_graph_batch: int | None = None
    # where the decode step runs, prefill and mixed steps run through its fused ops too (False: the model's modules,
    # a few thousand small torch ops per prefill step: host-bound on a GPU). None: on CUDA, where its test passed
    # (tests/runtime/engine/test_step_overhead.py, H100 2026-12-07) and a prefill step's host time fell from 44.7 to
    # 28 ms; on the CPU it gained nothing measurable, so the modules stay the reference there
    fast_prefill: bool | None = None
    # where the decode step runs, each layer's q/k/v and gate/up as one linear each (kernels/fused_linear.py)
    fuse_projections: bool = True
    # where the decode step runs (a float or q8 cache), steps whose chunks each bring at most this many tokens run
    # as one decode row per token (ModelRunner's short_prefill_rows; the decode graphs are captured up to this
    # batch too). None: SHORT_PREFILL_ROWS on CUDA with graphs, else 0 (never; on the CPU the module path stays the
    # reference)
    short_prefill_rows: int | None = None

    def __post_init__(self) -> None:
        if self.block_size is None:
            object.__setattr__(self, "block_size", default_block_size(check_kv_cache(self.kv_cache,
                                                                                     "engine setting kv_cache")))
        for field in ("block_size", "max_num_seqs", "max_num_batched_tokens", "num_speculative_tokens",
                      "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise QtoolError(f"engine setting {field}={value!r} is invalid", hint=f"{field} must be an int >= 1")
        check_kv_cache(self.kv_cache, "engine setting kv_cache")
        if self.kv_dtype is not None and self.kv_cache != "auto":
            raise QtoolError(f"engine settings kv_dtype and kv_cache={self.kv_cache!r} are both set",
                             hint="give one of them (kv_cache fp16 or bf16 names a float cache's dtype)")
        if self.speculative not in (None, *SPECULATIVE_METHODS):
            raise QtoolError(f"engine setting speculative={self.speculative!r} is invalid",
                             hint=f"speculative must be None or one of {', '.join(SPECULATIVE_METHODS)}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise QtoolError(f"engine settings prompt_lookup_min={self.prompt_lookup_min} and prompt_lookup_max="
                             f"{self.prompt_lookup_max} are invalid", hint="prompt_lookup_min must be <= prompt_lookup_max")
        if self.num_blocks is not None and self.kv_cache_bytes is not None:
            raise QtoolError("engine settings num_blocks and kv_cache_bytes are both set", hint="give one of them")
        rows = self.short_prefill_rows
        if rows is not None and (not isinstance(rows, int) or rows < 0):
            raise QtoolError(f"engine setting short_prefill_rows={rows!r} is invalid",
                             hint="short_prefill_rows must be an int >= 0 (0: never), or None for the default")
        for field in ("num_blocks", "kv_cache_bytes", "max_graph_batch"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise QtoolError(f"engine setting {field}={value!r} is invalid", hint=f"{field} must be an int >= 1")


@dataclass
class RequestOutput:
    request_id: int
    prompt_ids: list[int]
    token_ids: list[int]  # generated ids, the stop token included when one ended the request
    text: str  # the generated text (special tokens skipped), cut before a stop string
    finish_reason: str  # "stop" (stop token or string) or "length" (max_tokens or the model's context)
    time_to_first_token_s: float
    seconds: float  # from add_request to the finish
    tokens_per_second: float
    logprobs: list[TokenLogprob] | None = None  # one per token id when the request asked (params.logprobs)

    def to_dict(self) -> dict[str, Any]:
        logprobs = None if self.logprobs is None else [entry.to_dict() for entry in self.logprobs]
        return {**self.__dict__, "logprobs": logprobs}


@dataclass
class EngineStats:
    prefix_hit_requests: int
    saved_prompt_tokens: int
    preemptions: int
    evictions: int
    blocks_used: int
    blocks_free: int
    num_blocks: int
    steps: int
    generated_tokens: int
    # per drafter (the engine's one, by name): drafted, accepted, acceptance_rate, rounds, draft_forward_passes
    speculation: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Engine:
    """Paged-KV, prefix-caching, continuously batching generation over an already-loaded model (float, GPTQ or
    EXL2 linears alike). `engine_support(model)` says beforehand whether its family can run here. With
    config.speculative="draft", `draft_model` (same tokenizer; `draft_tokenizer` to check it) drafts for greedy
    requests; "ngram" drafts by prompt lookup."""

    def __init__(self, model: nn.Module, tokenizer: Any = None, config: EngineConfig = EngineConfig(),
                 draft_model: nn.Module | None = None, draft_tokenizer: Any = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.num_blocks = config.num_blocks or self._blocks_for_budget(model)
        short_rows = config.short_prefill_rows
        if short_rows is None:
            on_cuda = model.get_input_embeddings().weight.device.type == "cuda"
            short_rows = SHORT_PREFILL_ROWS if on_cuda and config.cuda_graphs else 0
        self.runner = ModelRunner(model, self.num_blocks, config.block_size, config.kv_dtype, config.kv_cache,
                                  config.fast_decode, config.max_num_seqs, config.fast_prefill,
                                  config.fuse_projections, short_rows)
        # by default the graphs cover a full batch and a short chunk's rows
        largest = max(config.max_num_seqs, self.runner.short_prefill_rows)
        graph_batch = (config.max_graph_batch or largest) if config.cuda_graphs else 0
        self.runner.warm_up(config.max_num_batched_tokens, config.max_num_seqs, graph_batch)
        self._warm_up_sampler()
        # every layer windowed (Mistral): blocks before the window are released; a mixed model keeps them all
        self.blocks = BlockManager(self.num_blocks, config.block_size, cache_window(self.runner.windows))
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.eos_ids = tuple(self._eos_ids())
        self.max_context = getattr(model.config, "max_position_embeddings", None)
        self._next_id = 0
        self._detokenizers: dict[int, IncrementalDetokenizer] = {}
        self._streams: dict[int, TextCallback] = {}  # request id -> its on_text callback
        self._logprob_streams: dict[int, LogprobsCallback] = {}  # request id -> its on_logprobs callback
        self._steps = 0
        self._generated = 0
        self.speculator = self._speculator(draft_model, draft_tokenizer)
        self.phases: StepPhases | None = None  # host time per step phase, when a profile attaches one

    def record_phases(self, phases: StepPhases | None) -> None:
        """Time every following step's phases into `phases` (None: stop); bench/runtime/engine_overhead.py reads it."""
        self.phases = phases
        self.runner.phases = phases

    def _warm_up_sampler(self) -> None:
        """On CUDA, the sampler's and logprobs' kernels run once now (greedy; sampled with every filter and a
        penalty), so that loading them never lands inside the first request's time to first token."""
        device = self.runner.device
        if device.type != "cuda":
            return
        logits = torch.zeros(2, self.model.config.vocab_size, device=device)
        params = [SamplingParams(temperature=0.0),
                  SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.1)]
        generator = request_generator(0, device)
        sample_finite(logits, params, [[], [1, 2]], [generator, generator])
        token_logprobs(logits, [0, 1], [0, 2])

    def _speculator(self, draft_model: nn.Module | None, draft_tokenizer: Any) -> Speculator | None:
        method = self.config.speculative
        if draft_model is not None and method != "draft":
            raise QtoolError(f"a draft model was given with speculative={method!r}",
                             hint="set speculative='draft' to use it, or give no draft model")
        if method is None:
            return None
        if method == "ngram":
            return Speculator(NgramDrafter(self.config.prompt_lookup_max, self.config.prompt_lookup_min),
                              self.config.num_speculative_tokens)
        if draft_model is None:
            raise QtoolError("speculative='draft' needs a draft model", hint="pass draft_model= (qtool run --draft MODEL)")
        check_draft_model(self.model, self.tokenizer, draft_model, draft_tokenizer)
        # the mirrors of all running sequences, each with room for a full draft past its target's blocks
        extra = self.config.max_num_seqs * (self.blocks.blocks_for(self.config.num_speculative_tokens) + 1)
        drafter = DraftModelDrafter(draft_model.eval(), self.num_blocks + extra, self.config.block_size,
                                    self.model.config.vocab_size, self.config.max_num_batched_tokens,
                                    self.config.max_num_seqs)
        return Speculator(drafter, self.config.num_speculative_tokens)

    def _blocks_for_budget(self, model: nn.Module) -> int:
        per_block = ModelRunner.kv_bytes_per_block(model, self.config.block_size, self.config.kv_dtype,
                                                   self.config.kv_cache)
        fixed = ModelRunner.kv_fixed_bytes(model, self.config.block_size, self.config.kv_dtype, self.config.kv_cache,
                                           self.config.max_num_seqs)
        if self.config.kv_cache_bytes is not None:
            blocks = (self.config.kv_cache_bytes - fixed) // per_block
            if blocks < 1:
                staging = (f" besides {fixed} bytes of q4 staging (max_num_seqs blocks of keys and values)"
                           if fixed else "")
                raise QtoolError(f"a KV cache of {self.config.kv_cache_bytes} bytes holds no block of {per_block} "
                                 f"bytes{staging}", hint="raise kv_cache_bytes or lower block_size")
            return blocks
        context = getattr(model.config, "max_position_embeddings", 4096)
        full = self.config.max_num_seqs * math.ceil(context / self.config.block_size)
        return max(1, min(full, (DEFAULT_KV_CACHE_BYTES - fixed) // per_block))

    def _eos_ids(self) -> list[int]:
        if self.tokenizer is not None:
            return stop_token_ids(self.model, self.tokenizer)
        value = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        return [int(t) for t in (value if isinstance(value, (list, tuple)) else [value]) if t is not None]

    def add_request(self, prompt: str | Seq[int], params: SamplingParams = SamplingParams(),
                    on_text: TextCallback | None = None, on_logprobs: LogprobsCallback | None = None) -> int:
        """Queue a request (text goes through the tokenizer, its BOS rule included); returns its id. `on_text`
        receives the reply piece by piece during step() as its text forms: complete characters only, never a stop
        string nor an end that may still become one; the pieces concatenate to the output's text. With
        params.logprobs set, `on_logprobs` receives each step's new TokenLogprobs, before that step's text piece;
        they concatenate to the output's logprobs."""
        if on_logprobs is not None and params.logprobs is None:
            raise QtoolError("on_logprobs was given for a request without logprobs",
                             hint="set SamplingParams(logprobs=k), or give no on_logprobs")
        if on_text is not None and self.tokenizer is None:
            raise QtoolError("streaming text needs a tokenizer", hint="pass tokenizer= to Engine, or no on_text")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise QtoolError("a text prompt needs a tokenizer", hint="pass tokenizer= to Engine, or token ids")
            prompt_ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            prompt_ids = [int(t) for t in prompt]
        if not prompt_ids:
            raise QtoolError("the prompt is empty", hint="give at least one token")
        if self.max_context and len(prompt_ids) >= self.max_context:
            raise QtoolError(f"the prompt is {len(prompt_ids)} tokens, the model's context is {self.max_context}",
                             hint="shorten the prompt")
        seq = Sequence(self._next_id, prompt_ids, params, request_generator(params.seed, self.runner.device),
                       eos_ids=self.eos_ids, max_context=self.max_context)
        needed = self.blocks.most_blocks(seq.token_limit(), self.config.max_num_batched_tokens)
        if needed > self.num_blocks:
            raise QtoolError(f"request {seq.seq_id} may need {needed} KV cache blocks, the cache has {self.num_blocks}",
                             hint="lower max_tokens or give the engine more num_blocks / kv_cache_bytes")
        self._next_id += 1
        if self.tokenizer is not None:
            self._detokenizers[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, params.stop)
        if on_text is not None:
            self._streams[seq.seq_id] = on_text
        if on_logprobs is not None:
            self._logprob_streams[seq.seq_id] = on_logprobs
        self.scheduler.add(seq)
        return seq.seq_id

    @property
    def capacity_tokens(self) -> int:
        """The most tokens (prompt + output) one request can reach in this KV cache: with a sliding window on every
        layer its blocks stay bounded, so up to the model's context once the window's blocks fit."""
        full = self.num_blocks * self.config.block_size
        limit = self.max_context or full
        if self.blocks.most_blocks(limit, self.config.max_num_batched_tokens) <= self.num_blocks:
            return max(full, limit)
        return full

    def abort_request(self, request_id: int) -> None:
        """Drop a request that is not finished (an interrupted reply): no output, no more text to its on_text."""
        self.scheduler.abort(request_id)
        if self.speculator is not None:
            self.speculator.release(request_id)
        self._detokenizers.pop(request_id, None)
        self._streams.pop(request_id, None)
        self._logprob_streams.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one batch step; the requests that finished in it."""
        phases = self.phases
        if phases is not None:
            phases.begin(self.runner.device)
        drafts = self.speculator.propose(self.scheduler.running) if self.speculator is not None else None
        chunks = self.scheduler.schedule(drafts)
        if not chunks:
            if self.has_unfinished():  # a bug, not a user error: never spin on a queue that cannot move
                raise RuntimeError("the scheduler placed no request although some are unfinished")
            return []
        if phases is not None:
            phases.step_kind(all(chunk.num_tokens == 1 for chunk in chunks))
            phases.mark("schedule")
        logits = self.runner.execute(chunks)
        sampling_chunks = [chunk for chunk in chunks if chunk.samples]
        sampling = [chunk.seq for chunk in sampling_chunks]
        tokens = self._next_tokens(sampling_chunks, logits)
        logprobs = self._token_logprobs(sampling_chunks, logits, tokens)
        if phases is not None:
            phases.mark("sample")
        logprobs_before = {seq.seq_id: len(seq.logprobs) for seq in sampling if seq.seq_id in self._logprob_streams}
        self.scheduler.update(chunks, tokens, on_token=lambda seq, token: self._on_token(seq, token, logprobs))
        self._steps += 1
        finished = self.scheduler.retire_finished()
        if self.speculator is not None:
            for seq in finished:
                self.speculator.release(seq.seq_id)
        outputs = [self._output(seq) for seq in finished]
        pieces = [(self._streams[seq.seq_id], self._detokenizers[seq.seq_id].stream_piece(final=seq.is_finished))
                  for seq in sampling if seq.seq_id in self._streams]
        # a step's logprobs go out before its text, so a streamed text piece can carry the tokens it came from
        pieces[:0] = [(self._logprob_streams[seq.seq_id], seq.logprobs[logprobs_before[seq.seq_id]:])
                      for seq in sampling if seq.seq_id in logprobs_before]
        for seq in finished:
            self._detokenizers.pop(seq.seq_id, None)
            self._streams.pop(seq.seq_id, None)
            self._logprob_streams.pop(seq.seq_id, None)
        # callbacks last, once every request's state is up to date: one that raises (Ctrl-C) leaves none half-done
        for stream, piece in pieces:
            if piece:
                stream(piece)
        if phases is not None:
            phases.end()
        return outputs

    def _next_tokens(self, chunks: list[ScheduledChunk], logits: torch.Tensor) -> list[int | list[int]]:
        """Per sampling chunk (logits: chunk.num_logits rows each, all sampled in one call): a sampled token, or a
        speculating chunk's verified run."""
        params, contexts, generators = [], [], []
        for chunk in chunks:
            seq = chunk.seq
            params += [seq.params] * chunk.num_logits
            generators += [seq.generator] * chunk.num_logits
            if chunk.draft_ids:
                contexts += verification_contexts(seq, chunk.draft_ids)
            else:
                contexts.append(seq.token_ids if seq.params.repetition_penalty != 1.0 else [])
        choices = sample_finite(logits, params, contexts, generators)
        if choices is None:  # the same refusal, in the same words, as every path that computes from a model's logits
            raise non_finite_logits_error(model_name(self.model))
        tokens: list[int | list[int]] = []
        row = 0
        for chunk in chunks:
            rows = choices[row : row + chunk.num_logits]
            row += chunk.num_logits
            tokens.append(self.speculator.verify(chunk.seq, chunk.draft_ids, rows) if chunk.draft_ids else rows[0])
        return tokens

    def _token_logprobs(self, chunks: list[ScheduledChunk], logits: torch.Tensor,
                        tokens: list[int | list[int]]) -> dict[int, Iterator[TokenLogprob]]:
        """seq id -> the logprobs of its step's tokens in order, for the requests that ask (only their rows are
        computed; none when no request asks). Token i of a speculating chunk's run was chosen at its row i: the
        row after the accepted drafts before it."""
        rows, chosen, counts, owners = [], [], [], []
        row = 0
        for chunk, run in zip(chunks, tokens):
            k = chunk.seq.params.logprobs
            if k is not None:
                run = [run] if isinstance(run, int) else list(run)
                rows += range(row, row + len(run))
                chosen += run
                counts += [k] * len(run)
                owners.append((chunk.seq.seq_id, len(run)))
            row += chunk.num_logits
        if not rows:
            return {}
        entries = iter(token_logprobs(logits[rows], chosen, counts))
        return {seq_id: iter([next(entries) for _ in range(count)]) for seq_id, count in owners}

    def _on_token(self, seq: Sequence, token: int, logprobs: dict[int, Iterator[TokenLogprob]]) -> None:
        """Each token a sequence keeps, as it is appended: its logprob kept (when asked), counted, and checked for
        a stop string."""
        if seq.seq_id in logprobs:
            seq.logprobs.append(next(logprobs[seq.seq_id]))
        self._generated += 1
        detokenizer = self._detokenizers.get(seq.seq_id)
        if detokenizer is not None and not seq.stops_on(token) and detokenizer.add(token):
            seq.finish("stop")  # a stop string: its tokens stay in token_ids, the text ends before it

    def _output(self, seq: Sequence) -> RequestOutput:
        detokenizer = self._detokenizers.get(seq.seq_id)
        if detokenizer is not None:
            detokenizer.flush()
        seconds = seq.finish_time - seq.arrival_time
        return RequestOutput(
            request_id=seq.seq_id,
            prompt_ids=seq.prompt_ids,
            token_ids=list(seq.output_ids),
            text=detokenizer.text if detokenizer is not None else "",
            finish_reason=seq.finish_reason,
            time_to_first_token_s=seq.first_token_time - seq.arrival_time,
            seconds=seconds,
            tokens_per_second=len(seq.output_ids) / seconds if seconds > 0 else float("inf"),
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
        )

    def generate(self, prompts: str | Seq[int] | Seq[str | Seq[int]],
                 params: SamplingParams | Seq[SamplingParams] = SamplingParams()) -> list[RequestOutput]:
        """Run prompts (one or a list; text or token ids) to completion, batched; results in prompt order."""
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        per_prompt = [params] * len(batch) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(batch):
            raise QtoolError(f"{len(per_prompt)} sampling params for {len(batch)} prompts",
                             hint="give one per prompt, or one for all")
        ids = [self.add_request(prompt, p) for prompt, p in zip(batch, per_prompt)]
        done: dict[int, RequestOutput] = {}
        while self.has_unfinished():
            for output in self.step():
                done[output.request_id] = output
        return [done[i] for i in ids]

    def stats(self) -> EngineStats:
        cache = self.blocks.stats()
        return EngineStats(
            prefix_hit_requests=cache.prefix_hit_requests,
            saved_prompt_tokens=cache.saved_prompt_tokens,
            preemptions=self.scheduler.num_preemptions,
            evictions=cache.evictions,
            blocks_used=cache.blocks_used,
            blocks_free=cache.blocks_free,
            num_blocks=self.num_blocks,
            steps=self._steps,
            generated_tokens=self._generated,
            speculation={} if self.speculator is None else
            {self.speculator.drafter.name: self.speculator.stats().to_dict()},
        )
