"""Suspend and resume a multi-GPU vLLM server with cuda-checkpoint, from inside its container."""
