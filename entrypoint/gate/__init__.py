"""vllm-gate: the proxy in front of vLLM that suspends it when idle and resumes it on the next request, and the
fleet of models it swaps on one GPU."""
