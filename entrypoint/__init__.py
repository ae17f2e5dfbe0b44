"""Suspend and resume a multi-GPU vLLM server with cuda-checkpoint, from inside its container.

The subpackages are layers, from the bottom: base, then cuda (the backends) and server (talking to vLLM),
suspend (the core), gate and cycle (what vllm-gate and selftest run), then the commands cuda_toggle_all.py
and selftest.py; imports point only down (docs/how-it-works.md, "The code"; tests/test_layers.py).
"""
