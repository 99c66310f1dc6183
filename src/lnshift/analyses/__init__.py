"""Analyses over run directories: LayerNorm shift, FSR (oracle and estimated), lambda rescaling, a run read back, and
its export as a PEFT adapter.
"""
