"""bench/finetune/step_profile.py: kernels classified by the ops they ran under (as a GPU profile of a QLoRA step
names them), and a step's busy time, idle gaps and category totals against a unit-grid reference on random
timelines."""

import random

import pytest

from bench_scripts import load_bench_script

profile = load_bench_script("finetune/step_profile")
Record = profile.KernelRecord
RANK = 16
MM_SHAPES = ((2048, 4096), (4096, 4096))


@pytest.mark.parametrize("record,category", [
    (Record("gptq_checkpoint_dequant_kernel", 0, 1), "dequant"),  # a Triton launch under no op
    (Record("triton_poi_fused_0", 0, 1, ("qtool::dequantize", "DequantLowRankFunction")), "dequant"),
    (Record("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>", 0, 1, ("aten::empty",)), "dequant"),
    (Record("nvjet_tst_256x128_64x4_1x2_h_bz_coopB_NNT", 0, 1, ("aten::mm", "aten::matmul", "DequantLowRankFunction"),
            MM_SHAPES), "base_gemm"),
    (Record("nvjet_tst_64x8_64x16_4x1_v_bz_TNN", 0, 1, ("aten::mm", "aten::matmul"), ((2048, 4096), (4096, RANK))),
     "lora_gemm"),
    (Record("cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8", 0, 1, ("aten::addmm_",),
            ((2048, 11008), (2048, RANK), (RANK, 11008))), "lora_gemm"),
    (Record("sm90_xmma_gemm_bf16bf16_bf16f32", 0, 1), "base_gemm"),  # no op found: by its name
    (Record("void pytorch_flash::flash_fwd_kernel<...>", 0, 1, ("aten::_flash_attention_forward",
                                                               "aten::scaled_dot_product_attention")), "attention"),
    (Record("void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<...>>", 0, 1,
            ("aten::mul", "aten::_log_softmax_backward_data", "autograd::engine::evaluate_function: LogSoftmaxBackward0")),
     "loss"),
    (Record("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...>", 0, 1), "optimizer"),
    (Record("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<...>>", 0, 1,
            ("aten::fill_", "aten::zero_", "Optimizer.zero_grad#AdamW.zero_grad")), "optimizer"),
    (Record("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda<...>>", 0, 1,
            ("aten::copy_", "aten::_to_copy", "aten::to")), "cast_copy"),
    (Record("Memcpy DtoD (Device -> Device)", 0, 1), "cast_copy"),
    (Record("void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel<...>>", 0, 1, ("aten::silu",)),
     "elementwise"),
    (Record("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, MeanOps<...>>>", 0, 1),
     "elementwise"),
    (Record("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 0, 1), "other"),
    (Record("DequantLowRankFunction", 0, 1, ("DequantLowRankFunction",)), "other"),  # its host time, on the CPU
])
def test_kernels_fall_into_the_category_of_the_ops_they_ran_under(record, category):
    assert profile.classify(record, RANK) == category


def reference(kernels, wall):
    """Busy time, idle runs and per-category totals by marking unit cells of an integer timeline."""
    start, end = wall
    busy = set()
    for k in kernels:
        busy.update(range(max(int(k.start_us), start), min(int(k.start_us + k.duration_us), end)))
    idle_runs, previous_idle = 0, False
    for t in range(start, end):
        idle = t not in busy
        idle_runs += idle and not previous_idle
        previous_idle = idle
    totals = {}
    for k in kernels:
        totals[profile.classify(k, RANK)] = totals.get(profile.classify(k, RANK), 0) + k.duration_us
    return len(busy), idle_runs, totals


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_busy_time_gaps_and_categories_match_a_unit_grid_reference(seed):
    rng = random.Random(seed)
    names = [("nvjet_gemm", ("aten::mm",), MM_SHAPES), ("nvjet_gemm", ("aten::mm",), ((7, RANK),)),
             ("elementwise_kernel", ("aten::mul",), ()), ("gptq_checkpoint_dequant_kernel", (), ()),
             ("Memset (Device)", (), ())]
    wall = (rng.randrange(0, 50), rng.randrange(900, 1000))
    kernels = []
    for _ in range(rng.randrange(20, 60)):  # overlapping, some starting before or ending after the step
        name, ops, shapes = rng.choice(names)
        start = rng.randrange(-20, 1000)
        kernels.append(Record(name, start, rng.randrange(1, 40), ops, shapes))
    events = profile.StepEvents(kernels, wall, [(k.start_us, k.start_us + k.duration_us) for k in kernels], host_ops=3)
    summary = profile.summarize(events, RANK, top=3)
    busy, idle_runs, totals = reference(kernels, wall)
    assert summary["wall_us"] == wall[1] - wall[0]
    assert summary["busy_us"] == busy and summary["idle_us"] == wall[1] - wall[0] - busy
    assert summary["gaps"]["count"] == idle_runs
    largest = [g["us"] for g in summary["gaps"]["largest"]]
    assert largest == sorted(largest, reverse=True) and len(largest) == min(idle_runs, profile.TOP_GAPS)
    assert sum(largest) <= summary["idle_us"]
    # fewer launching ops than TOP_GAPS: the idle time by launching op is all of it (each figure rounded to 0.1 us)
    assert len(summary["gaps"]["waited_for"]) < profile.TOP_GAPS
    assert sum(w["us"] for w in summary["gaps"]["waited_for"]) == pytest.approx(summary["idle_us"], abs=1.0)
    for category in profile.CATEGORIES:
        assert summary["categories"][category]["us"] == pytest.approx(totals.get(category, 0), abs=0.1)
    assert summary["kernel_us"] == pytest.approx(sum(k.duration_us for k in kernels))
    top = summary["top_kernels"]
    assert len(top) == 3 and [k["us"] for k in top] == sorted((k["us"] for k in top), reverse=True)
    # the same kernel name under a base and a LoRA matmul stays two entries
    gemm_categories = {k["category"] for k in summarize_all(events)["top_kernels"] if k["name"] == "nvjet_gemm"}
    assert gemm_categories <= {"base_gemm", "lora_gemm"}


def summarize_all(events):
    return profile.summarize(events, RANK, top=100)


def test_the_table_names_every_category_and_the_largest_gap():
    kernels = [Record("nvjet_gemm", 10, 30, ("aten::mm",), MM_SHAPES), Record("elementwise_kernel", 90, 5, ("aten::add",))]
    summary = profile.summarize(profile.StepEvents(kernels, (0, 100), [(10, 40), (90, 95)]), RANK)
    assert summary["gaps"]["largest"][0] == {"us": 50, "at_us": 40, "after": "nvjet_gemm", "before": "elementwise_kernel",
                                             "launched_by": ["aten::add"]}
    table = profile.format_table("qtool-dequant", summary)
    assert all(category in table for category in profile.CATEGORIES) and "nvjet_gemm" in table


class FakeEvent:
    """What step_events reads of a torch.profiler FunctionEvent."""

    def __init__(self, name, start, end, device="cpu", id=0, parent=None, shapes=(), linked=0):
        from torch.autograd import DeviceType
        from torch.autograd.profiler_util import Interval

        self.name, self.id, self.cpu_parent, self.linked_correlation_id = name, id, parent, linked
        self.time_range = Interval(start, end)
        self.device_type = DeviceType.CUDA if device == "cuda" else DeviceType.CPU
        self.input_shapes = [list(s) for s in shapes]
        self.self_cpu_time_total = end - start if device == "cpu" else 0


def test_gpu_kernels_are_traced_to_the_ops_that_launched_them():
    """A kernel finds its op through the runtime call of its correlation id (cudaLaunchKernel, Triton's
    cuLaunchKernel) or, without one, through its linked op; ids of ops and runtime calls may coincide."""
    step = FakeEvent("qlora_step", 0, 1000)
    mm = FakeEvent("aten::mm", 10, 50, id=7, parent=step, shapes=((2048, 4096), (4096, RANK)))
    dequant = FakeEvent(profile.DEQUANTIZE_RANGE, 100, 150, id=8, parent=step)
    mul = FakeEvent("aten::mul", 250, 260, id=501, parent=step)  # an op id equal to a runtime call's
    events = [step, mm, FakeEvent("cudaLaunchKernel", 20, 25, id=501, parent=mm), dequant,
              FakeEvent("cuLaunchKernel", 110, 115, id=502, parent=dequant), mul, FakeEvent("aten::empty", 255, 256, parent=mul),
              FakeEvent("nvjet_tst_64x8", 30, 80, device="cuda", id=501),
              FakeEvent("gptq_checkpoint_dequant_kernel", 120, 200, device="cuda", id=502),
              FakeEvent("vectorized_elementwise_kernel", 300, 310, device="cuda", id=900, linked=501)]

    class Prof:
        @staticmethod
        def events():
            return events

    got = profile.step_events(Prof, "cuda")
    assert got.wall == (0, 1000) and got.dequantizations == 1 and got.allocating_ops == 1 and got.host_ops == 3
    assert [k.ops for k in got.kernels] == [("aten::mm", "qlora_step"), (profile.DEQUANTIZE_RANGE, "qlora_step"),
                                            ("aten::mul", "qlora_step")]
    summary = profile.summarize(got, RANK)
    assert {name: c["us"] for name, c in summary["categories"].items() if c["count"]} == {
        "lora_gemm": 50, "dequant": 80, "elementwise": 10}
    assert summary["categories"]["lora_gemm"]["tflops"] == pytest.approx(2 * 2048 * 4096 * RANK / 50e-6 / 1e12, rel=1e-3)
    assert summary["busy_us"] == 140 and summary["idle_us"] == 860 and summary["gaps"]["count"] == 4
    assert summary["gaps"]["largest"][0] == {"us": 690, "at_us": 310, "after": "vectorized_elementwise_kernel", "before": "",
                                             "launched_by": []}
    # the 30 us before the GEMM waited on aten::mm, the 40 before the dequantize on its range, 100 on aten::mul
    assert summary["gaps"]["waited_for"] == [{"op": "(end of step)", "us": 690}, {"op": "aten::mul", "us": 100},
                                             {"op": profile.DEQUANTIZE_RANGE, "us": 40}, {"op": "aten::mm", "us": 30}]
    with pytest.raises(ValueError, match="qlora_step"):
        profile.step_events(type("NoStep", (), {"events": staticmethod(lambda: events[1:])}), "cuda")


def test_gemm_flops_come_from_the_op_shapes_once_per_launch():
    m, k, n = 37, 96, 53
    assert profile.matmul_flops(((m, k), (k, n))) == 2 * m * k * n
    assert profile.matmul_flops(((m, n), (m, k), (k, n), (), ())) == 2 * m * k * n  # addmm: the bias first
    assert profile.matmul_flops(((n,), (m, k), (k, n))) == 2 * m * k * n
    assert profile.matmul_flops(((4, m, k), (4, k, n))) == 0  # batched: not a 2-D matmul
    split_k = [Record("gemm_splitk", 0, 30, ("aten::mm",), ((m, k), (k, n)), launch=1),
               Record("splitKreduce_kernel", 30, 10, ("aten::mm",), ((m, k), (k, n)), launch=1),
               Record("gemm", 40, 20, ("aten::mm",), ((m, k), (k, n)), launch=2)]
    summary = profile.summarize(profile.StepEvents(split_k, (0, 60)), RANK)
    assert summary["categories"]["base_gemm"]["tflops"] == pytest.approx(2 * (2 * m * k * n) / 60e-6 / 1e12, rel=1e-3)
