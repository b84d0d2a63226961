"""qtool.cli"""
