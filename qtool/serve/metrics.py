"""What /metrics reports: the server's request counts (kept by the routes, on the event loop) and each model's
engine state (its worker's last snapshot: queue, running, KV cache use, prefix hits, output tokens/s), as JSON or
as Prometheus text."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from qtool.serve.model_pool import ServedModel
from qtool.serve.stream_pacing import StreamPacer


@dataclass
class ServerMetrics:
    started: float = field(default_factory=time.time)
    requests: Counter = field(default_factory=Counter)  # (endpoint or path, status) -> count
    prompt_tokens: Counter = field(default_factory=Counter)  # model -> tokens
    completion_tokens: Counter = field(default_factory=Counter)  # model -> tokens
    aborted: Counter = field(default_factory=Counter)  # model -> requests whose client left before the end

    def count(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, status)] += 1

    def report(self, models: Sequence[ServedModel], in_flight: int,
               pacers: dict[str, StreamPacer] | None = None) -> dict[str, Any]:
        per_model = {}
        for served in models:
            snap = served.worker.snapshot
            pacer = (pacers or {}).get(served.name) or StreamPacer()
            stats = snap.stats
            blocks = stats.get("num_blocks") or 0
            per_model[served.name] = {
                "waiting": snap.waiting, "running": snap.running,
                "peak_waiting": snap.peak_waiting, "peak_running": snap.peak_running,
                "output_tokens_per_s": round(snap.output_tokens_per_s, 3),
                "busy_s": round(snap.busy_s, 3),
                "prompt_tokens": self.prompt_tokens[served.name],
                "completion_tokens": self.completion_tokens[served.name],
                "aborted_requests": self.aborted[served.name],
                "kv_cache_usage": (stats.get("blocks_used", 0) / blocks) if blocks else 0.0,
                "blocks_used": stats.get("blocks_used", 0), "num_blocks": blocks,
                "prefix_hit_requests": stats.get("prefix_hit_requests", 0),
                "saved_prompt_tokens": stats.get("saved_prompt_tokens", 0),
                "preemptions": stats.get("preemptions", 0), "steps": stats.get("steps", 0),
                "generated_tokens": stats.get("generated_tokens", 0), "steps_failed": snap.steps_failed,
                # streams' text goes out every this many engine steps (1 unless the event loop is over its budget)
                "stream_every_steps": pacer.every, "loop_cpu_share": round(pacer.loop_share, 4),
            }
        return {
            "uptime_s": round(time.time() - self.started, 3),
            "in_flight": in_flight,
            "requests": [{"endpoint": e, "status": s, "count": c} for (e, s), c in sorted(self.requests.items())],
            "requests_total": sum(self.requests.values()),
            "models": per_model,
        }


PROMETHEUS_MODEL_GAUGES = {  # report key -> (metric name, type, help)
    "waiting": ("qtool_requests_waiting", "gauge", "Requests queued for the engine's batch"),
    "running": ("qtool_requests_running", "gauge", "Requests in the engine's running batch"),
    "output_tokens_per_s": ("qtool_output_tokens_per_second", "gauge", "Output tokens per second, recent window"),
    "kv_cache_usage": ("qtool_kv_cache_usage_ratio", "gauge", "KV cache blocks in use over all blocks"),
    "blocks_used": ("qtool_kv_cache_blocks_used", "gauge", "KV cache blocks in use"),
    "prompt_tokens": ("qtool_prompt_tokens_total", "counter", "Prompt tokens of finished requests"),
    "completion_tokens": ("qtool_completion_tokens_total", "counter", "Output tokens of finished requests"),
    "aborted_requests": ("qtool_aborted_requests_total", "counter", "Requests whose client disconnected"),
    "prefix_hit_requests": ("qtool_prefix_hit_requests_total", "counter", "Requests that reused cached prefix blocks"),
    "saved_prompt_tokens": ("qtool_prefix_saved_tokens_total", "counter", "Prompt tokens the prefix cache skipped"),
    "preemptions": ("qtool_preemptions_total", "counter", "Sequences preempted for KV cache blocks"),
    "stream_every_steps": ("qtool_stream_every_steps", "gauge", "Engine steps a stream's text waits for (pacing)"),
    "loop_cpu_share": ("qtool_event_loop_cpu_share", "gauge", "Event loop CPU time over engine step time, recent"),
}


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(report: dict[str, Any]) -> str:
    lines = ["# HELP qtool_http_requests_total HTTP requests by endpoint and status",
             "# TYPE qtool_http_requests_total counter"]
    for row in report["requests"]:
        lines.append(f'qtool_http_requests_total{{endpoint="{_label(row["endpoint"])}",status="{row["status"]}"}} '
                     f'{row["count"]}')
    lines += ["# HELP qtool_requests_in_flight HTTP requests being served", "# TYPE qtool_requests_in_flight gauge",
              f"qtool_requests_in_flight {report['in_flight']}"]
    for key, (name, kind, text) in PROMETHEUS_MODEL_GAUGES.items():
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        for model, values in report["models"].items():
            lines.append(f'{name}{{model="{_label(model)}"}} {values[key]}')
    return "\n".join(lines) + "\n"
