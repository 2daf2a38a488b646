"""What every layer may use: the error hierarchy (``errors``), signals turned into
exceptions (``interrupts``), running under torchrun (``distributed``), and a run's
progress callbacks, phase timer and warnings (``context``).
"""
