"""Training: a method's phases, the heads, the one loop, a run trained top to bottom (fit), a grid searched on
validation, many runs in one batched pass, data parallelism, evaluation and its metrics.
"""
