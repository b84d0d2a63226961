"""qtool.configs"""
