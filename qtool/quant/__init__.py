"""qtool.quant"""
