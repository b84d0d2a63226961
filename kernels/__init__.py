"""qtool.kernels"""
