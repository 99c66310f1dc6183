"""Experiments built from runs: the benchmark sweep and its worker processes, the demo, the paper's Gaussian
toy study.
"""
