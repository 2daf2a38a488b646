"""What every layer may use: the error hierarchy (``errors``), signals turned into
exceptions (``interrupts``), and running under torchrun (``distributed``).
"""
