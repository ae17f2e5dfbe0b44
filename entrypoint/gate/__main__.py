"""`python -m entrypoint.gate`: the gate, as the `vllm-gate` command (supervisord's GATE_LAUNCHER in tests)."""

from .app import main

if __name__ == "__main__":
    main()
