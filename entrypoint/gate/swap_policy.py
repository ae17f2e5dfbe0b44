"""The swap policy of GATE_MODELS: which waiting model is swapped in next, and which resident servers make room
for it. Swaps run one at a time, in the order their first waiting request arrived; the resident servers used
longest ago are suspended until the target's memory share fits (shares of the servers resident sum at most 1)."""

from __future__ import annotations

from .control import Phase
from .servers import ModelServer

# A little room for rounding: shares of 0.5 + 0.5 fit, 0.5 + 0.51 do not.
SHARE_SLACK = 1e-6


def next_to_swap_in(servers: list[ModelServer]) -> ModelServer | None:
    """The model whose oldest waiting request came first; None when no request waits."""
    waiting = [server for server in servers if server.tickets]
    if not waiting:
        return None
    return min(waiting, key=lambda server: server.tickets[0][0])


def victims_for(servers: list[ModelServer], target: ModelServer) -> list[ModelServer]:
    """The resident servers to suspend so that `target` fits: least recently used first."""
    others = [server for server in servers if server is not target]
    resident = [server for server in others if server.controller.refresh() is not Phase.SUSPENDED]
    used = sum(server.entry.share for server in resident)
    victims = []
    for server in sorted(resident, key=lambda s: s.stats.last_used):
        if used + target.entry.share <= 1 + SHARE_SLACK:
            break
        victims.append(server)
        used -= server.entry.share
    return victims
