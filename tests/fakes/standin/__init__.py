"""The stand-in vLLM server, one module per process (started by tests/fakes/standin_vllm.py)."""
