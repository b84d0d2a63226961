"""qtool.eval"""
