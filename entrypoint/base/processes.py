"""A snapshot of the server's process tree, built with psutil as a plain ppid -> [pid] map first."""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    title: str  # the command line as the process shows it (vLLM sets `VLLM::Worker_TP0` etc. there)
    status: str  # psutil status: "running", "sleeping", "stopped", ...
    create_time: float

    @property
    def stopped(self) -> bool:
        """SIGSTOPped or traced: such a process must never be asked for its CUDA state or locked."""
        return self.status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)

    def short_title(self, width: int = 60) -> str:
        return self.title if len(self.title) <= width else self.title[: width - 1] + "…"

    def matches(self, patterns: tuple[str, ...]) -> bool:
        return any(pattern in self.title for pattern in patterns)


def describe(pid: int) -> ProcessInfo | None:
    """The process `pid`, or None when it is gone (a zombie counts as gone)."""
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            status = process.status()
            if status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                return None
            try:
                cmdline = process.cmdline()
            except psutil.AccessDenied:
                cmdline = []
            title = " ".join(part for part in cmdline if part).strip() or process.name()
            return ProcessInfo(pid, process.ppid(), title, status, process.create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


def children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for process in psutil.process_iter(["pid", "ppid"]):
        info = process.info
        children.setdefault(info["ppid"], []).append(info["pid"])
    return children


def walk_tree(root_pid: int) -> list[ProcessInfo]:
    """The root and all its descendants, breadth-first; processes that vanish on the way are skipped."""
    children = children_map()
    seen: set[int] = set()
    tree: list[ProcessInfo] = []
    queue = deque([root_pid])
    while queue:
        pid = queue.popleft()
        if pid in seen:
            continue
        seen.add(pid)
        info = describe(pid)
        if info is None:
            continue
        tree.append(info)
        queue.extend(sorted(children.get(pid, [])))
    return tree


def ancestors_of(pid: int) -> set[int]:
    """`pid` and every ancestor of it (used to keep the tool from matching its own command line)."""
    result = set()
    try:
        process: psutil.Process | None = psutil.Process(pid)
        while process is not None:
            result.add(process.pid)
            process = process.parent()
    except psutil.NoSuchProcess:
        pass
    return result


def read_environ(pid: int) -> dict[str, str] | None:
    """The process's environment (/proc/PID/environ), or None when it cannot be read."""
    try:
        return psutil.Process(pid).environ()
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess, OSError):
        return None


def inherited_environ(pid: int) -> dict[str, str] | None:
    """The environment `pid` runs with: its own, or that of the nearest ancestor with a readable one.

    setproctitle (vLLM titles its EngineCore and workers with it) overwrites the memory that
    /proc/PID/environ shows, so a worker's own environ reads empty; the variables it inherited are
    still those of its ancestors, which kept their command line.
    """
    try:
        chain = [psutil.Process(pid), *psutil.Process(pid).parents()]
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    unreadable = False
    for process in chain:
        if process.pid == 1 and len(chain) > 1:
            break
        environ = read_environ(process.pid)
        if environ is None:
            unreadable = True
        elif environ:
            return environ
    return None if unreadable else {}


def same_process(pid: int, create_time: float) -> bool:
    """True when `pid` still names the process created at `create_time` (PIDs get reused)."""
    info = describe(pid)
    return info is not None and abs(info.create_time - create_time) < 0.01


def own_pid() -> int:
    return os.getpid()
