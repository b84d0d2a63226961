"""Where the kernel tests run: on the GPU when there is one, else on the CPU through the Triton interpreter."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
