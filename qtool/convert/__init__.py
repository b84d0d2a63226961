"""qtool.convert"""
