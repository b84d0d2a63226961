"""`qtool serve MODEL [MODEL ...]`: an OpenAI-compatible HTTP server over qtool's engine, one engine (and one
continuous batch) per model, each request routed by its `model` field. Binds 127.0.0.1 unless told otherwise; any
other address needs --api-key (or QTOOL_API_KEY). Ctrl-C drains the requests in flight, then exits."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from qtool.cli.choices import Backend, KvCache, ModelDtype, complete_device, plain
from qtool.cli.render import MODEL_LOADING, handle_errors, stderr
from qtool.kernels.backend_names import BACKEND_HELP

ENGINE = "Engine"  # the help panel of the engine's sizes
LIMITS = "Limits"


@handle_errors
def serve(
    models: Annotated[list[str], typer.Argument(help="The models to serve (directories, .gguf files, Hub ids or aliases).")],
    name: Annotated[Optional[list[str]], typer.Option("--name", help="The name a request's `model` field uses, one per model in order (default: the model as given).")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; anything but loopback needs --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on (0: any free port).")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="QTOOL_API_KEY", show_envvar=True, help="Bearer key every request but /health must send.")] = None,
    device: Annotated[str, typer.Option("--device", rich_help_panel=MODEL_LOADING, autocompletion=complete_device, help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[Optional[ModelDtype], typer.Option("--dtype", rich_help_panel=MODEL_LOADING, help="Dtype to load the models in (default: float32 on CPU, bfloat16 on CUDA).")] = None,
    backend: Annotated[Backend, typer.Option("--backend", rich_help_panel=MODEL_LOADING, help=BACKEND_HELP)] = Backend("auto"),
    kv_cache: Annotated[KvCache, typer.Option("--kv-cache", rich_help_panel=ENGINE, help="The engines' KV cache: auto (the model's dtype), fp16, bf16, or quantized q8 / q4.")] = KvCache("auto"),
    max_batch: Annotated[Optional[int], typer.Option("--max-batch", min=1, rich_help_panel=ENGINE, help="Most requests each engine decodes at once (default 64); more wait in its queue.")] = None,
    cache_blocks: Annotated[Optional[int], typer.Option("--cache-blocks", min=1, rich_help_panel=ENGINE, help="KV cache size per model in blocks of 16 tokens (default: the batch's full contexts, at most 2 GiB).")] = None,
    gpu_memory_fraction: Annotated[Optional[float], typer.Option("--gpu-memory-fraction", rich_help_panel=ENGINE, help="Size each model's KV cache to what is left of this fraction of the GPU's memory once it is loaded, 0 < F <= 1.")] = None,
    max_tokens_limit: Annotated[int, typer.Option("--max-tokens-limit", min=1, rich_help_panel=LIMITS, help="The most max_tokens a request may ask (also the default, cut at the context).")] = 4096,
    max_body_bytes: Annotated[int, typer.Option("--max-body-bytes", min=1, rich_help_panel=LIMITS, help="Larger request bodies are refused (413).")] = 1 << 20,
    drain_timeout: Annotated[float, typer.Option("--drain-timeout", min=0, rich_help_panel=LIMITS, help="On Ctrl-C, seconds the requests in flight may still run.")] = 30.0,
    arena_votes: Annotated[Optional[str], typer.Option("--arena-votes", help="The studio page's arena votes, appended as JSONL (default: ./arena-votes.jsonl).")] = None,
) -> None:
    """Serve models over an OpenAI-compatible HTTP API (chat and completions, streamed or not)."""
    from qtool.serve.settings import ServeSettings

    settings = ServeSettings(host=host, port=port, api_key=api_key, max_body_bytes=max_body_bytes,
                             max_tokens_limit=max_tokens_limit, drain_timeout_s=drain_timeout,
                             arena_votes=arena_votes)
    settings.check()  # an unsafe address is refused before any model loads

    from qtool.runtime.engine import EngineConfig
    from qtool.runtime.engine_sizing import EngineSizing
    from qtool.serve.app import create_app
    from qtool.serve.model_pool import load_served_models
    from qtool.serve.server import run_server

    served = load_served_models(models, name, EngineConfig(kv_cache=plain(kv_cache)),
                                EngineSizing(max_batch, cache_blocks, gpu_memory_fraction), device=device,
                                dtype=plain(dtype), backend=plain(backend))
    for model in served:
        stderr.print(f"[dim]{model.name}: {model.source}, {model.engine.num_blocks} KV cache blocks, batch "
                     f"{model.engine.config.max_num_seqs}[/]")
    shown = f"[{host}]" if ":" in host else host
    stderr.print(f"serving {', '.join(m.name for m in served)} at http://{shown}:{port}/v1 "
                 f"({'API key required' if api_key else 'no API key: loopback only'}); Ctrl-C drains and exits")
    stderr.print(f"studio page: http://{shown}:{port}/")
    run_server(create_app(served, settings), settings)
