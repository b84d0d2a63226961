"""Issue 26's real-size quantization benchmarks: a Llama-2-7B-shaped (and a 70B-shaped, first layers only) model of
random float16 weights written as a Hugging Face directory with SmolLM2's tokenizer, quantized by `qtool quantize`'s
library entry points and by the peers (GPTQModel's torch path, ExLlamaV2's converter) on the same weights and the
same WikiText calibration, each job in its own process: time end to end and per layer, peak GPU memory (torch's
max allocated inside the job, nvidia-smi's used memory sampled from outside) and the job's peak host RSS.

    python bench/quantize/big_model.py plan gptq --work /tmp/big --data .device-data/big --out $OUT/big.jsonl
    python bench/quantize/big_model.py plan exl2-70b ...          (bench/device/big_quantize.sh runs both on the GPU)
    python bench/quantize/big_model.py plan weigh-70b ...         (EXL2's weighing pass alone on the 70B's layers)
    python bench/quantize/big_model.py plan gptq --tiny --work /tmp/big-tiny --data DIR --out rows.jsonl  (CPU)

A plan is a list of stages run in order within --deadline-s (a stage gets what is left, up to its own limit; one
that would start with too little time is recorded as skipped, one that runs out as timed out with the layers it
finished). Each stage is `big_model.py STAGE ...` in a child process, so its peak RSS and CUDA peak are its own:
    write      the model directory (weights generated on the GPU tensor by tensor, each from a seed derived from its
               name: a model of N layers holds exactly the first N layers of the full one)
    qtool      qtool's quantize_model / quantize_model_exl2 with the shipped presets, --set FIELD=VALUE overrides,
               and --cap-gib (torch.cuda.set_per_process_memory_fraction) for the memory-cap runs
    gptqmodel  GPTQModel.load -> quantize -> save, 4-bit g128 sym (its defaults otherwise), qtool's windows
    exllamav2  ExLlamaV2's converter (python -m exllamav2.conversion.convert_exl2) on a parquet of the same text
    weigh      qtool's EXL2 weighing pass alone (the first pass of quantize_model_exl2): where its every-layer
               inputs waited (the estimate's weighing tier, or --activation-tier), the memory ladder's steps under
               --cap-gib, and a digest of the sensitivities (equal digests, equal values)
A run on the first N of L layers is extrapolated to L: the layers' own time x L/N plus the rest (load, calibration,
write) scaled by L/N as well (load and write grow with the model); for a peer, which reports no per-layer time,
its whole time x L/N. The ratio that compares tools is the one measured on the same truncated model.

Results: one JSON line per stage (--out) and a markdown table on stdout.
"""


import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]  # bench/quantize/ -> the repo root
sys.path.insert(0, str(REPO / "bench"))  # the module every bench script shares (bench/ holds scripts, not packages)
import run_metadata  # noqa: E402
GIB = 2**30
CALIBRATION_FILE = "wiki.valid.tokens"  # WikiText-2 validation, what --data must hold
SHARD_BYTES = 4 * GIB  # transformers' usual shard size for float checkpoints of this size


@dataclass(frozen=True)
class Shape:
    """The Llama dimensions that size the job; the vocabulary is the tokenizer's (SmolLM2: 49152)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    max_positions: int = 4096
    rope_theta: float = 10000.0

    def layer_params(self) -> int:
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden


SHAPES = {
    "llama2-7b": Shape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32),
    "llama2-70b": Shape(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8),
    # --tiny: the same code on the CPU; widths multiples of 128 so that groups of 128 hold
    "tiny": Shape(hidden=256, intermediate=512, layers=6, heads=4, kv_heads=2, max_positions=512),
    "tiny-wide": Shape(hidden=384, intermediate=768, layers=6, heads=6, kv_heads=2, max_positions=512),
}


# ---------------------------------------------------------------- the model directory


def tensor_seed(name: str, seed: int) -> int:
    """A seed per tensor name, so that a model of N layers holds exactly the first N layers of the full one."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def tensor_shapes(shape: Shape, layers: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, shape.hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        names += [
            (p + "input_layernorm.weight", (shape.hidden,)),
            (p + "self_attn.q_proj.weight", (shape.hidden, shape.hidden)),
            (p + "self_attn.k_proj.weight", (kv, shape.hidden)),
            (p + "self_attn.v_proj.weight", (kv, shape.hidden)),
            (p + "self_attn.o_proj.weight", (shape.hidden, shape.hidden)),
            (p + "post_attention_layernorm.weight", (shape.hidden,)),
            (p + "mlp.gate_proj.weight", (shape.intermediate, shape.hidden)),
            (p + "mlp.up_proj.weight", (shape.intermediate, shape.hidden)),
            (p + "mlp.down_proj.weight", (shape.hidden, shape.intermediate)),
        ]
    names += [("model.norm.weight", (shape.hidden,)), ("lm_head.weight", (vocab, shape.hidden))]
    return names


def model_config(shape: Shape, layers: int, tokenizer) -> dict[str, Any]:
    """config.json as transformers 5 writes a Llama's, plus the top-level rope_theta ExLlamaV2 0.3.2 reads (it
    does not look inside rope_parameters; transformers ignores the copy)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.max_positions,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta}, dtype="float16",
    )
    data = config.to_dict()
    data["rope_theta"] = shape.rope_theta
    data["architectures"] = ["LlamaForCausalLM"]
    return data


def write_model(shape: Shape, layers: int, tokenizer_dir: Path, directory: Path, device: str, seed: int = 0,
                shard_bytes: int = SHARD_BYTES) -> dict[str, Any]:
    """Random float16 weights (normal, std 0.02 as Llama's initializer; norms 1) in size-capped safetensors shards
    with transformers' index, config.json and the tokenizer's files. Each tensor is generated on `device` and
    copied to the host only to be written, one shard at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    vocab = len(tokenizer)
    plan = tensor_shapes(shape, layers, vocab)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in plan:
        nbytes = 2 * _numel(dims)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for number, shard in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        tensors = {}
        for name, dims in shard:
            if len(dims) == 1:
                tensor = torch.ones(dims, dtype=torch.float16)
            else:
                generator = torch.Generator(device=device).manual_seed(tensor_seed(name, seed))
                tensor = torch.empty(dims, dtype=torch.float16, device=device).normal_(0.0, 0.02, generator=generator).cpu()
            tensors[name] = tensor
            weight_map[name] = file
            total += tensor.numel() * 2
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(model_config(shape, layers, tokenizer), indent=2) + "\n")
    tokenizer.save_pretrained(str(directory))
    return {"seconds": time.perf_counter() - started, "bytes": total, "shards": len(shards), "params": total // 2,
            "vocab": vocab, "layers": layers}


def _numel(dims: tuple[int, ...]) -> int:
    count = 1
    for d in dims:
        count *= d
    return count


# ---------------------------------------------------------------- measuring a job from outside


class PeakSampler:
    """Every `interval` seconds while a child runs: the GPU's used memory (what nvidia-smi shows: every process,
    CUDA contexts included; None where no NVIDIA GPU answers) and the resident memory summed over the child's
    process tree (from /proc; a peer's converter runs in a grandchild). wait4's ru_maxrss would not do: a child
    forked from a large parent starts with the parent's resident set counted in its maximum."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.gpu_max_bytes: int | None = None
        self.rss_max_bytes = 0
        self.pid: int | None = None
        self._stop = threading.Event()
        self._read_gpu = self._gpu_reader()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _gpu_reader() -> Callable[[], int] | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            return lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        except Exception:
            pass
        try:
            subprocess.run(["nvidia-smi", "-L"], capture_output=True, check=True, timeout=10)
        except Exception:
            return None

        def smi() -> int:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=10).stdout
            return int(float(out.strip().splitlines()[0])) * 2**20

        return smi

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._read_gpu is not None:
                try:
                    used = self._read_gpu()
                    self.gpu_max_bytes = used if self.gpu_max_bytes is None else max(self.gpu_max_bytes, used)
                except Exception:
                    pass
            if self.pid is not None:
                self.rss_max_bytes = max(self.rss_max_bytes, tree_rss_bytes(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def tree_rss_bytes(root: int) -> int:
    """Resident bytes of `root` and every process below it, now (0 for processes gone meanwhile)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/statm") as handle:
                total += int(handle.read().split()[1]) * PAGE_BYTES
        except (OSError, ValueError, IndexError):
            pass
        stack += children.get(pid, [])
    return total


def own_peak_rss_bytes() -> int | None:
    """This process's peak resident set since its exec (VmHWM: the memory map's own high-water mark)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_child(argv: list[str], timeout_s: float, env: dict[str, str] | None = None, log: Path | None = None) -> dict[str, Any]:
    """One stage in its own process: its JSON lines (the last one with "result" is its result; "progress" lines
    survive a timeout), wall time, peak host memory (the larger of the child's own high-water mark, which it
    reports, and its process tree's sampled resident memory) and the GPU's used-memory peak while it ran."""
    started = time.perf_counter()
    lines: list[dict] = []
    handle = open(log, "a") if log else None
    killed = threading.Event()

    def kill(proc: subprocess.Popen) -> None:
        killed.set()
        try:
            os.killpg(proc.pid, 9)  # the child was started in its own session: this ends it and what it started
        except ProcessLookupError:
            pass

    with PeakSampler() as peaks:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=handle or subprocess.DEVNULL, text=True,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        peaks.pid = proc.pid
        timer = threading.Timer(timeout_s, kill, args=(proc,))
        timer.start()
        for line in proc.stdout:
            if handle:
                handle.write(line)
                handle.flush()
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        proc.wait()
        timer.cancel()
    if handle:
        handle.close()
    results = [line["result"] for line in lines if "result" in line]
    row: dict[str, Any] = dict(results[-1]) if results else {}
    row["progress"] = [line["progress"] for line in lines if "progress" in line] or row.get("progress", [])
    own = row.pop("own_peak_rss_bytes", None) or 0
    row.update({
        "exit": proc.returncode, "timed_out": killed.is_set(), "wall_s": round(time.perf_counter() - started, 2),
        "host_peak_rss_gib": round(max(own, peaks.rss_max_bytes) / GIB, 3),
        "gpu_peak_smi_gib": None if peaks.gpu_max_bytes is None else round(peaks.gpu_max_bytes / GIB, 3),
    })
    if not results and "error" not in row:
        row["error"] = f"no result (exit {proc.returncode}{', timed out after %.0f s' % timeout_s if killed.is_set() else ''})"
    return row


def emit(kind: str, payload: dict) -> None:
    print(json.dumps({kind: payload}, default=str), flush=True)


def progress_recorder(began: float) -> tuple[list[dict], Callable[..., None]]:
    """A pipeline's progress callback (done, total, detail) and the list it fills: each event, timed in seconds
    since began, is kept for the row's per-layer times and printed as it comes (what a timed-out stage leaves)."""
    events: list[dict] = []

    def progress(done: int, total: int, detail: str = "") -> None:
        event = {"t": round(time.perf_counter() - began, 3), "done": done, "total": total, "detail": detail}
        events.append(event)
        emit("progress", event)

    return events, progress


# ---------------------------------------------------------------- per-layer times from progress events

LAYER_KEY = re.compile(r"^(?:(measuring|quantizing) )?layer (\d+)/(\d+)")


def layer_seconds(events: list[dict]) -> dict[str, float]:
    """Per-step durations from the pipelines' progress events (t, detail): a step ("layer 3/32", "measuring layer
    3/32", "quantizing layer 3/32") lasts from its first event to the first event of the next step, the last one
    up to the first event after it that names no layer (writing the checkpoint, the head)."""
    starts: list[tuple[str, float]] = []
    end_after_last: float | None = None
    for event in events:
        match = LAYER_KEY.match(event["detail"])
        if match:
            key = f"{match.group(1) or 'gptq'} {match.group(2)}"
            if not starts or starts[-1][0] != key:
                if key not in {k for k, _ in starts}:
                    starts.append((key, event["t"]))
            end_after_last = None
        elif starts and end_after_last is None:
            end_after_last = event["t"]
    durations: dict[str, float] = {}
    for (key, start), following in zip(starts, starts[1:] + [(None, end_after_last)]):
        if following[1] is not None:
            durations[key] = round(following[1] - start, 3)
    return durations


def summarise_layers(events: list[dict], total_s: float | None, layers: int, full_layers: int) -> dict[str, Any]:
    """Per layer: the median over finished layers of each phase, summed over phases. A finished run: the rest
    (load, calibration, weighing, head, write) by difference, and both scaled to `full_layers`. A run cut short:
    a projection, the time before its first layer plus the per-layer time x `full_layers` (no write counted)."""
    durations = layer_seconds(events)
    phases: dict[str, list[float]] = {}
    for key, seconds in durations.items():
        phases.setdefault(key.split()[0], []).append(seconds)
    if not phases:
        return {"layer_seconds": durations}
    per_layer = sum(statistics.median(values) for values in phases.values())
    out: dict[str, Any] = {"layer_seconds": durations, "per_layer_s": round(per_layer, 3),
                           "layers_timed": min(len(v) for v in phases.values())}
    if total_s is not None and all(len(v) == layers for v in phases.values()):
        rest = total_s - sum(durations.values())
        out["rest_s"] = round(rest, 3)
        if full_layers != layers:
            out["extrapolated_s"] = round(per_layer * full_layers + rest * full_layers / layers, 1)
    else:
        first = min(e["t"] for e in events if LAYER_KEY.match(e["detail"]))
        out["projected_s"] = round(first + per_layer * full_layers, 1)
    return out


# ---------------------------------------------------------------- stages (each runs in its own process)


def versions() -> dict[str, Any]:
    import torch
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine()
    return {"torch": torch.__version__, "transformers": transformers.__version__, "device": device}


def apply_cap(cap_gib: float | None, device: str, set_fraction: bool = True) -> dict[str, Any]:
    """torch.cuda.set_per_process_memory_fraction for a cap in GiB: the allocator then refuses past it, as a card
    of that size would (the CUDA context, outside the allocator, is not counted). Without `set_fraction` only the
    facts (the qtool stages pass the cap to quantize's own --gpu-memory budget, which sets it for the run)."""
    if not cap_gib:
        return {}
    import torch

    if not device.startswith("cuda"):
        return {"cap_gib": cap_gib, "cap_note": "no cap on the CPU"}
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = min(1.0, cap_gib * GIB / total)
    if set_fraction:
        torch.cuda.set_per_process_memory_fraction(fraction, 0)
    return {"cap_gib": cap_gib, "cap_fraction": round(fraction, 4), "card_gib": round(total / GIB, 2),
            "cap_by": "set_per_process_memory_fraction" if set_fraction else "qtool --gpu-memory"}


def stage_write(args) -> dict[str, Any]:
    shape = SHAPES[args.shape]
    layers = args.layers or shape.layers
    facts = write_model(shape, layers, Path(args.tokenizer), Path(args.dir), args.device, seed=args.seed)
    return {**facts, "shape": args.shape, "full_layers": shape.layers}


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """--set FIELD=VALUE (a config field by its config-file name; the value read as YAML: 4, true, bfloat16)."""
    import yaml

    out = {}
    for pair in pairs:
        field, _, value = pair.partition("=")
        out[field] = yaml.safe_load(value)
    return out


def stage_qtool(args) -> dict[str, Any]:
    import torch

    from qtool.config.schema import QUANTIZE_DEFAULT_PRESET, QUANTIZE_EXL2_PRESET, resolve_config

    # the cap through the product's own budget (quantize --gpu-memory), which the memory plan then follows
    cap = apply_cap(args.cap_gib, args.device, set_fraction=False)
    budget = int(args.cap_gib * GIB) if cap.get("cap_fraction") else None
    overrides = {"output_format": args.format, "calibration_source": args.calibration, "samples": args.samples,
                 "seqlen": args.seqlen, **parse_sets(args.set)}
    if args.format == "exl2":
        overrides["bpw"] = args.bpw
    # the CLI's own path from flags to a validated config (cli/quantize.py): the preset, then the overrides
    config, _ = resolve_config(QUANTIZE_EXL2_PRESET if args.format == "exl2" else QUANTIZE_DEFAULT_PRESET, overrides)
    began = time.perf_counter()
    events, progress = progress_recorder(began)

    if args.format == "exl2":
        from qtool.quant.exl2_pipeline import quantize_model_exl2

        result = quantize_model_exl2(args.model, config, args.output, measurement=args.measurement, device=args.device,
                                     force=True, progress=progress, gpu_memory_bytes=budget)
    else:
        from qtool.quant.pipeline import quantize_model

        result = quantize_model(args.model, config, args.output, device=args.device, force=True, progress=progress,
                                gpu_memory_bytes=budget)
    seconds = time.perf_counter() - began
    torch_peak = torch.cuda.max_memory_allocated(0) if args.device.startswith("cuda") else None
    out_bytes = sum(f.stat().st_size for f in Path(args.output).glob("*.safetensors"))
    facts = {
        "seconds": round(seconds, 2), "library_seconds": round(result.seconds, 2),
        "gpu_peak_torch_gib": None if torch_peak is None else round(torch_peak / GIB, 3),
        "estimated_peak_gib": round(getattr(result, "estimated_peak_memory_bytes", 0) / GIB, 3) or None,
        # the estimate in full (weights streamed or whole, where the activations went) and the measured host/GPU peaks
        "memory": getattr(result, "memory", None) or None,
        "output_gib": round(out_bytes / GIB, 3), "output_shards": len(list(Path(args.output).glob("*.safetensors"))),
        "config": {k: v for k, v in config.to_dict().items() if k in ("method", "bits", "group_size", "sym", "desc_act", "static_groups",
                                                                       "refine_scales", "compute_dtype", "bpw", "head_bits")},
        "compute_dtype": getattr(result, "compute_dtype", None), "events": events, **cap,
    }
    modules = getattr(result, "modules", None) or []
    if modules:  # GPTQ's solves: their share of the time, by linear name within a layer; the damping they needed
        by_name: dict[str, float] = {}
        for module in modules:
            short = module.name.split(".", 3)[-1]
            by_name[short] = round(by_name.get(short, 0.0) + module.seconds, 3)
        facts["solve_s"] = by_name
        facts["max_damp_percent"] = max(module.damp_percent for module in modules)
    if args.format == "exl2":
        facts["bits_per_weight"] = round(result.bits_per_weight, 4)
        facts["measured"] = result.measured  # False where --measurement was reused
    return facts


def stage_gptqmodel(args) -> dict[str, Any]:
    """GPTQModel's own pipeline on the same windows as qtool's (qtool.data.text.calibration_windows: same text,
    tokenizer, seed and offsets): load -> quantize -> save, each timed."""
    if (os.cpu_count() or 1) < 4:  # 7.7.0's pool sizing raises on 2-core hosts (bench/peers/peer_gptqmodel.py)
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import torch
    from transformers import AutoTokenizer

    import gptqmodel
    from gptqmodel import GPTQConfig, GPTQModel

    from qtool.data.text import calibration_windows

    began = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    windows = calibration_windows(tokenizer, args.calibration, args.samples, args.seqlen, 0)
    calibration = [{"input_ids": w.tolist(), "attention_mask": [1] * w.numel()} for w in windows]
    qcfg = GPTQConfig(bits=args.bits, group_size=128, sym=True)
    t0 = time.perf_counter()
    model = GPTQModel.load(args.model, qcfg, device=args.device)
    load_s = time.perf_counter() - t0
    emit("progress", {"t": round(time.perf_counter() - began, 3), "detail": "loaded"})
    t0 = time.perf_counter()
    model.quantize(calibration, batch_size=args.batch_size, tokenizer=tokenizer)
    quantize_s = time.perf_counter() - t0
    emit("progress", {"t": round(time.perf_counter() - began, 3), "detail": "quantized"})
    t0 = time.perf_counter()
    model.save(args.output)
    save_s = time.perf_counter() - t0
    torch_peak = torch.cuda.max_memory_allocated(0) if torch.cuda.is_available() else None
    out_bytes = sum(f.stat().st_size for f in Path(args.output).glob("*.safetensors"))
    return {
        "seconds": round(time.perf_counter() - began, 2), "load_s": round(load_s, 2), "quantize_s": round(quantize_s, 2),
        "save_s": round(save_s, 2), "gptqmodel": gptqmodel.__version__,
        "gpu_peak_torch_gib": None if torch_peak is None else round(torch_peak / GIB, 3), "output_gib": round(out_bytes / GIB, 3),
        "config": {"bits": args.bits, "group_size": 128, "sym": True, "desc_act": getattr(qcfg, "desc_act", None),
                   "batch_size": args.batch_size, "dtype": str(next(model.model.parameters()).dtype)},
    }


def stage_weigh(args) -> dict[str, Any]:
    """EXL2's weighing pass as quantize_model_exl2 runs it first (the exl2 preset's calibration, the streamed float
    model, the estimate's tier for the kept inputs, the memory ladder), without the measuring and quantizing
    passes that follow: its time, the estimate beside the peaks, the ladder's log lines and the sensitivities'
    digest (sha256 of every value's float.hex(), by name)."""
    import logging

    import torch

    from qtool.checkpoints.sources import resolve_device, resolve_source
    from qtool.config.schema import QUANTIZE_EXL2_PRESET, resolve_config
    from qtool.data.text import calibration_windows
    from qtool.models.architectures import resolve_layer_groups
    from qtool.models.rules import ModelStats, cpu_free_memory, device_free_memory, estimate_peak_memory
    from qtool.quant.activation_store import open_store
    from qtool.quant.exl2_pipeline import _exl2_layout_check, weigh_linears
    from qtool.quant.float_source import open_float_model
    from qtool.quant.pipeline import split_quantizable

    cap = apply_cap(args.cap_gib, args.device)
    config, _ = resolve_config(QUANTIZE_EXL2_PRESET, {"output_format": "exl2", "calibration_source": args.calibration,
                                                      "samples": args.samples, "seqlen": args.seqlen})
    compute = resolve_device(args.device)
    ladder_steps: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: ladder_steps.append(record.getMessage())
    logging.getLogger("qtool.quant.memory_ladder").addHandler(handler)
    began = time.perf_counter()
    events, progress = progress_recorder(began)

    float_model = open_float_model(resolve_source(args.model), args.model)
    model, spec = float_model.model, float_model.spec
    layer_groups = [split_quantizable(resolve_layer_groups(model, index, spec), _exl2_layout_check)[0] for index in range(model.config.num_hidden_layers)]
    # the run's own estimate (free memory as mem_get_info sees it: a --cap-gib cap is not in it, so the ladder meets it)
    estimate = estimate_peak_memory(config, ModelStats.from_config(model.config), compute, streaming=float_model.streamed is not None,
                                    tier=args.activation_tier, cpu_free_bytes=cpu_free_memory(), device_free_bytes=device_free_memory(compute))
    windows = calibration_windows(float_model.tokenizer, args.calibration, args.samples, args.seqlen, config.calibration.seed)
    loaded_s = time.perf_counter() - began
    with open_store(estimate["weighing_tier"], compute, Path(args.output)) as store:
        sensitivities = weigh_linears(model, layer_groups, windows, compute, layer_weights=float_model.layer_in_memory, store=store,
                                      progress=progress)
    seconds = time.perf_counter() - began
    digest = hashlib.sha256(json.dumps({name: float(value).hex() for name, value in sorted(sensitivities.items())}).encode()).hexdigest()
    torch_peak = torch.cuda.max_memory_allocated(0) if args.device.startswith("cuda") else None
    return {
        "seconds": round(seconds, 2), "load_s": round(loaded_s, 2), "weighing_s": round(seconds - loaded_s, 2),
        "weighing_tier": estimate["weighing_tier"], "linears": len(sensitivities), "sensitivity_digest": digest[:16],
        "sensitivities": sensitivities,  # to compare rows whose digests differ (a GPU's kernels per batch shape)
        "ladder_steps": ladder_steps, "gpu_peak_torch_gib": None if torch_peak is None else round(torch_peak / GIB, 3),
        # the estimate of this pass alone (the run's figures are the larger of it and the later passes')
        **{f"estimated_{pool}_gib": round(estimate["weighing_peaks"][f"{key}_bytes"] / GIB, 3) for pool, key in (("device", "device"), ("host", "cpu"), ("disk", "disk"))},
        "estimate": estimate, "events": events, **cap,
    }


def write_calibration_parquet(text_file: Path, parquet: Path, rows: int = 64) -> None:
    """The calibration text as ExLlamaV2's converter reads it: a parquet file with a `text` column, whose rows it
    tokenizes one by one and joins until it has rows x length tokens, cut in order (not at random offsets). The
    text goes in `rows` pieces of whole lines (it concatenates a tensor per row: fewer rows, less of that)."""
    import pandas

    lines = text_file.read_text(encoding="utf-8").splitlines(keepends=True)
    step = -(-len(lines) // rows)
    pandas.DataFrame({"text": ["".join(lines[i:i + step]) for i in range(0, len(lines), step)]}).to_parquet(parquet)


def stage_exllamav2(args) -> dict[str, Any]:
    """ExLlamaV2 0.3.2's converter, as its README runs it, with the calibration of the same text and as many rows
    x length as qtool's; measurement rows at its default unless --measurement-rows. Runs with EXLLAMA_NO_SDPA=1 as
    every ExLlamaV2 run here (bench/peers/exl2_interop.py says why)."""
    import exllamav2

    waited = time.perf_counter()
    import exllamav2.ext  # noqa: F401  (builds, or waits for the build in progress, on first import: not timed)

    extension_s = time.perf_counter() - waited
    work = Path(args.output + ".work")
    work.mkdir(parents=True, exist_ok=True)
    parquet = work.parent / (work.name + ".calibration.parquet")
    write_calibration_parquet(Path(args.calibration), parquet)
    cmd = [sys.executable, "-m", "exllamav2.conversion.convert_exl2", "-i", args.model, "-o", str(work), "-cf", args.output,
           "-b", str(args.bpw), "-hb", str(args.head_bits), "-c", str(parquet), "-r", str(args.samples), "-l", str(args.seqlen),
           "-mr", str(args.measurement_rows), "-ml", str(args.seqlen), "-nr"]
    if args.measurement:  # an earlier run's measurement.json: the converter skips its measurement pass
        cmd += ["-m", args.measurement]
    began = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "EXLLAMA_NO_SDPA": "1"})
    seconds = time.perf_counter() - began
    (work.parent / (work.name + ".log")).write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"convert_exl2 exited {done.returncode}: {(done.stdout + done.stderr)[-800:]}")
    out_bytes = sum(f.stat().st_size for f in Path(args.output).glob("*.safetensors"))
    return {"seconds": round(seconds, 2), "measured": not args.measurement, "extension_wait_s": round(extension_s, 1), "exllamav2": getattr(exllamav2, "__version__", "?"), "output_gib": round(out_bytes / GIB, 3),
            "config": {"bpw": args.bpw, "head_bits": args.head_bits, "rows": args.samples, "length": args.seqlen,
                       "measurement_rows": args.measurement_rows, "measurement": args.measurement},
            "command": " ".join(shlex.quote(c) for c in cmd)}


# The 7B goal's 12 GB as quantize's --gpu-memory budget: 10.5 GiB for torch's allocator leaves room for the CUDA
# context and libraries' workspaces (outside the allocator, in nvidia-smi's figure) below 12 GB
GOAL_BUDGET_GIB = 10.5
PLANS = ("gptq", "gptq-7b", "gptq-7b-batch", "gptq-pair", "exl2-70b", "exl2", "gptqmodel-7b", "weigh-70b")
STAGES = {"write": stage_write, "qtool": stage_qtool, "gptqmodel": stage_gptqmodel, "exllamav2": stage_exllamav2, "weigh": stage_weigh}


def run_stage(name: str, args) -> int:
    """The child side: one result line, or an error line; the exit status says which."""
    try:
        facts = STAGES[name](args)
        emit("result", {**facts, **versions(), "own_peak_rss_bytes": own_peak_rss_bytes()})
        return 0
    except Exception as exc:  # a failing stage is a result too: the plan goes on with the next
        import traceback

        emit("result", {"error": f"{type(exc).__name__}: {exc}"[:1500], "trace": traceback.format_exc()[-2000:]})
        return 1


# ---------------------------------------------------------------- plans (the parent side)


@dataclass
class Step:
    """One stage of a plan: the row's name, the stage, its arguments, its own time limit, and extra PYTHONPATH."""

    row: str
    stage: str
    argv: list[str]
    limit_s: float
    site: str | None = None  # a wheel folder's install target (peers), prepended to PYTHONPATH for this stage
    needs: str | None = None  # a module the stage imports (checked before it starts: a missing peer is a row saying so)
    model_layers: int = 0
    full_layers: int = 0
    shape: str = ""
    min_s: float = 30.0  # skipped (not started) with less time than this left


def plan_steps(name: str, work: Path, data: Path, tiny: bool, device: str, sites: dict[str, str], layers: dict[str, int],
               qtool_sets: list[str] = (), weigh_cap: float = 10.0) -> list[Step]:
    """The two device calls' plans (and --tiny's CPU versions of both): model directories under `work`."""
    seven, seventy = ("tiny", "tiny-wide") if tiny else ("llama2-7b", "llama2-70b")
    samples, seqlen = (8, 64) if tiny else (128, 2048)
    calibration = str(data / CALIBRATION_FILE)
    tokenizer = str(data / "tokenizer")
    full7 = SHAPES[seven].layers
    # the first N layers (defaults: 4 of 7B for GPTQModel's same-job ratio and the 24 GiB cap, 1 for EXL2, 2 of 70B)
    n_peer, n_exl2, n_70 = layers["peer"], layers["exl2"], layers["70b"]

    def model(shape: str, n: int) -> Path:
        return work / f"{shape}-{n}L"

    def write(shape: str, n: int, limit: float) -> Step:
        return Step(f"write {shape} {n}L", "write", ["--shape", shape, "--layers", str(n), "--tokenizer", tokenizer,
                                                       "--dir", str(model(shape, n)), "--device", device], limit,
                    model_layers=n, full_layers=SHAPES[shape].layers, shape=shape, min_s=10)

    def qtool(shape: str, n: int, fmt: str, limit: float, cap: float | None = None, suffix: str = "", more_sets: tuple[str, ...] = ()) -> Step:
        argv = ["--model", str(model(shape, n)), "--output", str(work / f"out-qtool-{fmt}-{shape}-{n}L{suffix}"), "--format", fmt,
                "--calibration", calibration, "--samples", str(samples), "--seqlen", str(seqlen), "--device", device]
        if cap:
            argv += ["--cap-gib", str(cap)]
        sets = [*qtool_sets, *more_sets]
        for pair in sets:
            argv += ["--set", pair]
        label = (f"qtool {'gptq 4-bit g128' if fmt == 'gptq' else 'exl2 4.0 bpw'} {shape} {n}L" + (f" cap {cap:g} GiB" if cap else "")
                 + "".join(f" {pair}" for pair in sets))
        return Step(label, "qtool", argv, limit, model_layers=n, full_layers=SHAPES[shape].layers, shape=shape)

    def gptqmodel(shape: str, n: int, limit: float) -> Step:
        argv = ["--model", str(model(shape, n)), "--output", str(work / f"out-gptqmodel-{shape}-{n}L"), "--calibration", calibration,
                "--samples", str(samples), "--seqlen", str(seqlen), "--device", device]
        return Step(f"GPTQModel 4-bit g128 {shape} {n}L", "gptqmodel", argv, limit, site=sites.get("gptqmodel"), needs="gptqmodel",
                    model_layers=n, full_layers=SHAPES[shape].layers, shape=shape, min_s=60)

    def weigh(shape: str, n: int, limit: float, cap: float | None = None, tier: str | None = None) -> Step:
        argv = ["--model", str(model(shape, n)), "--output", str(work / f"out-weigh-{shape}-{n}L"), "--calibration", calibration,
                "--samples", str(samples), "--seqlen", str(seqlen), "--device", device]
        argv += ["--cap-gib", str(cap)] if cap else []
        argv += ["--activation-tier", tier] if tier else []
        label = f"qtool exl2 weighing pass {shape} {n}L" + (f" cap {cap:g} GiB" if cap else "") + (f" tier {tier}" if tier else "")
        return Step(label, "weigh", argv, limit, model_layers=n, full_layers=SHAPES[shape].layers, shape=shape)

    def exllamav2(shape: str, n: int, limit: float) -> Step:
        argv = ["--model", str(model(shape, n)), "--output", str(work / f"out-exllamav2-{shape}-{n}L"), "--calibration", calibration,
                "--samples", str(samples), "--seqlen", str(seqlen), "--bpw", "4.0"]
        return Step(f"ExLlamaV2 convert 4.0 bpw {shape} {n}L", "exllamav2", argv, limit, site=sites.get("exllamav2"), needs="exllamav2",
                    model_layers=n, full_layers=SHAPES[shape].layers, shape=shape, min_s=60)

    if name == "gptq":
        # the same job on the 7B's first layers, qtool under a 24 GiB cap (the 7B-on-24-GB check; a cap that bites
        # shows as time: the ratio is then the capped run's) and GPTQModel uncapped; then the whole 7B end to end
        # (the goal) with what is left: cut short, its finished layers still give the per-layer time and a projection
        return [write(seven, n_peer, 60), qtool(seven, n_peer, "gptq", 150, cap=24.0), gptqmodel(seven, n_peer, 200),
                write(seven, full7, 120), qtool(seven, full7, "gptq", 540, cap=GOAL_BUDGET_GIB)]
    if name == "exl2-70b":
        # the 70B layers under an 80 GiB cap, then EXL2 on the 7B's first layer for both tools (ExLlamaV2's
        # extension builds in the background from the start; the converter gets what is left)
        return [write(seventy, n_70, 90), qtool(seventy, n_70, "gptq", 200, cap=80.0),
                write(seven, n_exl2, 60), qtool(seven, n_exl2, "exl2", 200), exllamav2(seven, n_exl2, 300)]
    if name == "exl2":
        # the EXL2 pair alone, with room (when exl2-70b cut it short)
        return [write(seven, n_exl2, 60), qtool(seven, n_exl2, "exl2", 300), exllamav2(seven, n_exl2, 300)]
    if name == "weigh-70b":
        # issue 26's weighing pass on the 70B's layers: as planned under an 80 GiB cap, its inputs forced to disk,
        # then a cap its planned tier does not fit (the estimate cannot see a cap: the ladder takes over)
        return [write(seventy, n_70, 90), weigh(seventy, n_70, 120, cap=80.0), weigh(seventy, n_70, 120, cap=80.0, tier="disk"),
                weigh(seventy, n_70, 150, cap=weigh_cap)]
    if name == "gptq-7b":
        # the whole 7B end to end alone in a call (the goal's row), when plan gptq's first stages leave it too little
        return [write(seven, full7, 120), qtool(seven, full7, "gptq", 540, cap=GOAL_BUDGET_GIB)]
    if name == "gptq-7b-batch":
        # the whole 7B twice under the budget: at the default calibration batch, then at 4x its tokens per forward
        # call (fewer, larger calls; more scratch counted by the plan) -- which one the GPU default should be
        return [write(seven, full7, 120), qtool(seven, full7, "gptq", 300, cap=GOAL_BUDGET_GIB),
                qtool(seven, full7, "gptq", 300, cap=GOAL_BUDGET_GIB, suffix="-bt16384", more_sets=("batch_tokens=16384",))]
    if name == "gptq-pair":
        # the goal's job whole for both tools in one call: qtool under the 12 GB budget first (the goal's row), then
        # GPTQModel on the same weights with what is left (the same-job ratio; cut short it gives no total, and
        # plan gptq's first-layers pair stands)
        return [write(seven, full7, 120), qtool(seven, full7, "gptq", 300, cap=GOAL_BUDGET_GIB), gptqmodel(seven, full7, 400)]
    if name == "gptqmodel-7b":
        # GPTQModel on the whole 7B, alone in a call (its time on the 7B's first layers is in plan gptq)
        return [write(seven, full7, 120), gptqmodel(seven, full7, 540)]
    raise SystemExit(f"unknown plan {name!r}: {', '.join(PLANS)}")


def module_available(module: str, site: str | None) -> bool:
    code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    env = {**os.environ, "PYTHONPATH": _pythonpath(site)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 0


def _pythonpath(site: str | None) -> str:
    parts = [site] if site else []
    parts += [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(parts)


def git_commit() -> str:
    """run_metadata's (the device command's $QTOOL_COMMIT before the machine's stale .git), "?" when unknown."""
    return run_metadata.git_commit(short=True) or "?"


def finish_row(step: Step, row: dict[str, Any]) -> dict[str, Any]:
    """The stage's figures with the per-layer summary and the extrapolation to the full model."""
    events = row.pop("events", None) or [p for p in row.get("progress", []) if "detail" in p and "done" in p]
    progress = row.pop("progress", None) or events
    if progress:  # where a run cut short had got to
        row["last_progress"] = f"{progress[-1]['detail']} at {progress[-1]['t']:.0f} s"
    if step.stage == "qtool" and events:
        total = row.get("seconds") if "error" not in row else None
        row.update(summarise_layers(events, total, step.model_layers, step.full_layers))
    if step.stage in ("gptqmodel", "exllamav2") and "seconds" in row and step.full_layers != step.model_layers:
        row["extrapolated_s"] = round(row["seconds"] * step.full_layers / step.model_layers, 1)
    return row


def run_plan(args) -> int:
    work, data = Path(args.work), Path(args.data)
    work.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.tiny else args.device
    sites = {name: value for name, value in (("gptqmodel", args.gptqmodel_site), ("exllamav2", args.exllamav2_site)) if value}
    layers = {"peer": args.peer_layers, "exl2": args.exl2_layers, "70b": args.layers_70b}
    steps = plan_steps(args.plan, work, data, args.tiny, device, sites, layers, args.qtool_set, args.weigh_cap_gib)
    if args.only:
        steps = [s for s in steps if any(word in s.row for word in args.only)]
    deadline = time.monotonic() + args.deadline_s
    common = {"plan": args.plan, "date": datetime.date.today().isoformat(), "commit": git_commit(), "tiny": args.tiny,
              "host": platform.node(), "cpus": os.cpu_count()}
    if os.environ.get("BIG_BENCH_NOTE"):  # what else the machine was doing (bench/device/big_quantize.sh says)
        common["note"] = os.environ["BIG_BENCH_NOTE"]
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written: set[str] = set()
    for step in steps:
        left = deadline - time.monotonic()
        row: dict[str, Any] = {"row": step.row, "stage": step.stage, "shape": step.shape, "layers": step.model_layers,
                               "full_layers": step.full_layers}
        model_dir = next((step.argv[i + 1] for i, a in enumerate(step.argv) if a == "--model"), None)
        if model_dir and model_dir not in written and not (Path(model_dir) / "config.json").exists():
            row["skipped"] = f"its model {Path(model_dir).name} was not written"
        elif left < step.min_s:
            row["skipped"] = f"no time left ({left:.0f} s of the {args.deadline_s:.0f} s deadline)"
        elif step.stage == "exllamav2" and device == "cpu":
            row["skipped"] = "ExLlamaV2's converter needs CUDA (its extension)"
        elif step.needs and not module_available(step.needs, step.site):
            row["skipped"] = f"{step.needs} is not importable here (its wheels carried and installed?)"
        else:
            limit = min(step.limit_s, left)
            argv = [sys.executable, str(Path(__file__).resolve()), step.stage, *step.argv]
            env = {"PYTHONPATH": _pythonpath(step.site), "PYTHONUNBUFFERED": "1"}
            print(f"== {step.row} (limit {limit:.0f} s, {left:.0f} s left)", flush=True)
            row.update(finish_row(step, run_child(argv, limit, env, log=work / "stages.log")))
            row["limit_s"] = round(limit)
            if step.stage == "write" and "error" not in row:
                written.add(next(step.argv[i + 1] for i, a in enumerate(step.argv) if a == "--dir"))
        row.update(common)
        rows.append(row)
        with open(out, "a") as handle:
            handle.write(json.dumps(row, default=str) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k not in ("layer_seconds", "trace")}, default=str)[:1500], flush=True)
    add_ratios(rows)
    if rows and "ratios" in rows[-1]:
        with open(out, "a") as handle:
            handle.write(json.dumps({"row": "ratios", **rows[-1]["ratios"], **common}) + "\n")
    print(markdown_table(rows))
    return 0


def add_ratios(rows: list[dict]) -> None:
    """qtool's time over the peer's on the same model (same shape and layers), where both finished; each pair
    named by its rows (a capped qtool run says so in its name)."""
    ratios = {}
    for peer in (r for r in rows if r["stage"] in ("gptqmodel", "exllamav2") and "seconds" in r and "error" not in r):
        fmt = "gptq" if peer["stage"] == "gptqmodel" else "exl2"
        for mine in rows:
            if (mine["stage"] == "qtool" and "seconds" in mine and "error" not in mine and mine["shape"] == peer["shape"]
                    and mine["layers"] == peer["layers"] and fmt in mine["row"]):
                ratios[f"{mine['row']} / {peer['row']}"] = round(mine["seconds"] / peer["seconds"], 4)
    if rows and ratios:
        rows[-1]["ratios"] = ratios


def _gib(value) -> str:
    return "" if value is None else f"{value:.2f}"


def markdown_table(rows: list[dict]) -> str:
    head = ("| job | model | s (end to end) | per layer s | all layers s (extrapolated, or *projected*) | peak GPU GiB (torch) | peak GPU GiB "
            "(nvidia-smi) | host peak RSS GiB | cap | note |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if r["stage"] == "write":
            note = r.get("skipped") or r.get("error") or f"{r.get('bytes', 0) / GIB:.1f} GiB in {r.get('shards', '?')} shards"
            lines.append(f"| {r['row']} | | {r.get('seconds', '') and round(r['seconds'], 1)} | | | | | "
                         f"{_gib(r.get('host_peak_rss_gib'))} | | {note} |")
            continue
        note = r.get("skipped") or r.get("error") or ""
        if r.get("timed_out"):
            note = f"timed out after {r.get('limit_s')} s ({r.get('layers_timed', 0)} layers finished; last: {r.get('last_progress', '-')})"
        if r.get("bits_per_weight"):
            note = (note + f" {r['bits_per_weight']:.3f} bpw").strip()
        if r.get("sensitivity_digest"):
            note = (note + f" inputs: {r['weighing_tier']}; {len(r['ladder_steps'])} ladder steps; sensitivities {r['sensitivity_digest']}").strip()
        cap = f"{r['cap_gib']:g} GiB" if r.get("cap_gib") else ""
        model = f"{r['shape']}, {r['layers']} of {r['full_layers']} layers" if r.get("shape") else ""
        whole = r.get("extrapolated_s", f"*{r['projected_s']}*" if "projected_s" in r else "")
        lines.append(f"| {r['row']} | {model} | {r.get('seconds', '')} | {r.get('per_layer_s', '')} | {whole} | "
                     f"{_gib(r.get('gpu_peak_torch_gib'))} | {_gib(r.get('gpu_peak_smi_gib'))} | {_gib(r.get('host_peak_rss_gib'))} | "
                     f"{cap} | {note} |")
    ratios = rows[-1].get("ratios") if rows else None
    if ratios:
        lines.append("")
        lines += [f"- {name}: **{value:.3f}**" for name, value in ratios.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="run a plan of stages, each in its own process")
    plan.add_argument("plan", choices=PLANS)
    plan.add_argument("--work", required=True, help="where the models and outputs are written")
    plan.add_argument("--data", required=True, help=f"a folder with {CALIBRATION_FILE} and tokenizer/ (SmolLM2's)")
    plan.add_argument("--out", required=True, help="JSON lines, appended")
    plan.add_argument("--device", default="cuda")
    plan.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, 8 x 64 calibration tokens")
    plan.add_argument("--deadline-s", type=float, default=530.0)
    plan.add_argument("--peer-layers", type=int, default=4, help="layers of the 7B shape for GPTQModel's same-job ratio and the 24 GiB cap")
    plan.add_argument("--exl2-layers", type=int, default=1, help="layers of the 7B shape for EXL2 (qtool and ExLlamaV2)")
    plan.add_argument("--layers-70b", type=int, default=2)
    plan.add_argument("--gptqmodel-site", default=None, help="a folder GPTQModel's wheels were installed into")
    plan.add_argument("--exllamav2-site", default=None, help="a folder ExLlamaV2's wheel was installed into")
    plan.add_argument("--qtool-set", action="append", default=[], help="FIELD=VALUE for every qtool stage (e.g. compute_dtype=bfloat16)")
    plan.add_argument("--only", nargs="*", default=None, help="only the steps whose row name contains one of these words")
    plan.add_argument("--weigh-cap-gib", type=float, default=10.0, help="weigh-70b: the cap of its last stage (below what its plan needs)")

    write = sub.add_parser("write")
    write.add_argument("--shape", choices=sorted(SHAPES), required=True)
    write.add_argument("--layers", type=int, default=0, help="the first N layers (0: all)")
    write.add_argument("--tokenizer", required=True)
    write.add_argument("--dir", required=True)
    write.add_argument("--device", default="cuda")
    write.add_argument("--seed", type=int, default=0)

    for name in ("qtool", "gptqmodel", "exllamav2", "weigh"):
        s = sub.add_parser(name)
        s.add_argument("--model", required=True)
        s.add_argument("--output", required=True)
        s.add_argument("--calibration", required=True)
        s.add_argument("--samples", type=int, default=128)
        s.add_argument("--seqlen", type=int, default=2048)
        s.add_argument("--device", default="cuda")
        if name == "qtool":
            s.add_argument("--format", choices=["gptq", "exl2"], default="gptq")
            s.add_argument("--bpw", type=float, default=4.0)
            s.add_argument("--cap-gib", type=float, default=None)
            s.add_argument("--set", action="append", default=[], help="FIELD=VALUE config override (repeatable)")
            s.add_argument("--measurement", default=None, help="exl2: an earlier run's measurement.json to reuse")
        if name == "weigh":
            s.add_argument("--cap-gib", type=float, default=None)
            s.add_argument("--activation-tier", choices=["device", "host", "disk"], default=None, help="default: the estimate's plan")
        if name == "gptqmodel":
            s.add_argument("--batch-size", type=int, default=1)
            s.add_argument("--bits", type=int, default=4)
        if name == "exllamav2":
            s.add_argument("--bpw", type=float, default=4.0)
            s.add_argument("--head-bits", type=int, default=6)
            s.add_argument("--measurement-rows", type=int, default=16, help="-mr: the converter's default")
            s.add_argument("--measurement", default=None, help="-m: an earlier run's measurement.json to reuse")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "plan":
        return run_plan(args)
    return run_stage(args.command, args)


if __name__ == "__main__":
    sys.exit(main())
