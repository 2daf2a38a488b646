"""Files in and out: checkpoints (safetensors, weights-only torch files, Hugging Face
folders), calibration and evaluation data, atomic writes and the output guard that keeps
every input and existing file safe (``files``); how padded token data (an
``attention_mask``) travels to the models (``padding``).
"""
