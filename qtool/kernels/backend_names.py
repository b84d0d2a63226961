"""The matmul backends each weight format has, by name, as "module:attribute" of their factories: plain data
without torch, so the CLI can offer --backend's choices without importing any kernel."""

from __future__ import annotations

from types import MappingProxyType

GPTQ, EXL2 = "gptq", "exl2"  # the weight formats with backends
# per format, name -> "module:attribute" of a zero-argument factory (imported only when first needed); read-only
BACKEND_FACTORIES = MappingProxyType({  # GPTQ's
    "triton": "qtool.kernels.triton_backend:default_triton_backend",
    "torch": "qtool.kernels.torch_backends:GptqTorchBackend",
    "cpu-int4": "qtool.kernels.cpu_int4_backend:GptqCpuInt4Backend",
    # dequantize into a shared scratch + cuBLAS, one packed copy of the weights: training (never auto)
    "dequant": "qtool.kernels.dequant_backend:GptqDequantBackend",
})
EXL2_BACKEND_FACTORIES = MappingProxyType({
    "triton": "qtool.kernels.exl2_triton_backend:Exl2TritonBackend",
    "torch": "qtool.kernels.torch_backends:Exl2TorchBackend",
})
FORMAT_FACTORIES = MappingProxyType({GPTQ: BACKEND_FACTORIES, EXL2: EXL2_BACKEND_FACTORIES})
# what --backend accepts besides "auto": the names of any format (one option serves GPTQ and EXL2 models)
BACKEND_CHOICES = tuple(dict.fromkeys(name for factories in FORMAT_FACTORIES.values() for name in factories))
BACKEND_HELP = ("Matmul backend of quantized linears (GPTQ and EXL2): auto (triton on CUDA, else torch; run and serve "
                "on the CPU: cpu-int4 for 4-bit GPTQ; dequant: GPTQ dequantized per call + cuBLAS, for long inputs), "
                + ", ".join(BACKEND_CHOICES) + ".")
