"""qtool.runtime"""
