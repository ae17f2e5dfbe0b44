"""Find the server's root process: by --pid, by asking supervisord, or by matching command lines."""

from __future__ import annotations

import http.client
import os
import xmlrpc.client
from dataclasses import dataclass

import psutil
from loguru import logger
from supervisor.xmlrpc import SupervisorTransport

from ..base.config import Config
from ..base.errors import ExitCode, ToolError
from ..base.processes import ancestors_of, describe


@dataclass(frozen=True)
class ServerRoot:
    pid: int
    how: str  # "--pid", "supervisord program 'vllm'", "command line matching 'vllm serve'"


def supervisor_proxy(url: str, timeout_s: float = 5.0) -> xmlrpc.client.ServerProxy:
    if url.startswith("unix://"):
        transport = SupervisorTransport(None, None, serverurl=url)
        transport.timeout = timeout_s
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
    return xmlrpc.client.ServerProxy(url)


def supervisor_program_pid(url: str, program: str) -> int | None:
    """The PID supervisord reports for `program`; None when supervisord is not there.

    Raises ToolError when supervisord runs the program but it is not running: then matching
    command lines would only find a process that is starting or dying.
    """
    if url.startswith("unix://") and not os.path.exists(url[len("unix://") :]):
        return None
    try:
        info = supervisor_proxy(url).supervisor.getProcessInfo(program)
    except xmlrpc.client.Fault as fault:
        logger.debug("supervisord at {} has no program {!r}: {}", url, program, fault.faultString)
        return None
    except (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError) as error:
        logger.debug("supervisord at {} did not answer: {}", url, error)
        return None
    # STARTING only means younger than the program's startsecs: the process is there and is the server.
    if info.get("statename") not in ("RUNNING", "STARTING") or not info.get("pid"):
        raise ToolError(
            f"supervisord's program {program!r} is {info.get('statename')}, not RUNNING "
            f"({info.get('description', '')}): see `supervisorctl status {program}` and the server's log",
            ExitCode.SERVER_NOT_FOUND,
        )
    return int(info["pid"])


def matching_roots(patterns: tuple[str, ...]) -> list[psutil.Process]:
    """Processes whose command line contains a pattern, without their matching descendants.

    vLLM's children inherit the server's command line until they set their own title, so during
    start-up several processes of one tree match: the topmost is the server. The tool itself and
    its ancestors (a shell that runs `cuda-toggle-all --match ...`) are never candidates.
    """
    excluded = ancestors_of(os.getpid())
    candidates: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["pid", "ppid", "cmdline"]):
        if process.info["pid"] in excluded:
            continue
        cmdline = " ".join(process.info["cmdline"] or [])
        if any(pattern in cmdline for pattern in patterns):
            candidates[process.info["pid"]] = process
    roots = []
    for process in candidates.values():
        try:
            ancestors = {parent.pid for parent in process.parents()}
        except psutil.NoSuchProcess:
            continue
        if not ancestors & candidates.keys():
            roots.append(process)
    return sorted(roots, key=lambda p: p.pid)


def looks_like_vllm(pid: int) -> bool:
    """The process's own command line or its descendants' titles say vLLM (an API server, EngineCore)."""
    info = describe(pid)
    if info is None:
        return False
    if "vllm" in info.title.lower():
        return True
    try:
        return any("VLLM::" in " ".join(child.cmdline()) for child in psutil.Process(pid).children(recursive=True))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _checked_pid(pid: int, force: bool) -> ServerRoot:
    """--pid PID: it must name a live vLLM server's root, not PID 1 or a tree of several servers."""
    if pid <= 0:
        raise ToolError(f"--pid {pid} is not a process ID: give the PID of the vLLM server's root", ExitCode.USAGE)
    if describe(pid) is None:
        raise ToolError(f"no process with PID {pid}: check the PID given with --pid", ExitCode.SERVER_NOT_FOUND)
    if force:
        return ServerRoot(pid, "--pid")
    if pid == 1 or pid == os.getpid() or pid in ancestors_of(os.getpid()):
        raise ToolError(
            f"--pid {pid} is an init process or an ancestor of this tool, whose tree holds every process (other "
            "servers too): give the vLLM server's own PID (supervisorctl pid vllm), or --force",
            ExitCode.USAGE,
        )
    if not looks_like_vllm(pid):
        raise ToolError(
            f"PID {pid} is not a vLLM server (neither its command line nor its children's titles mention vLLM): "
            "give the server's own PID, or --force to act on it anyway",
            ExitCode.USAGE,
        )
    try:
        nested = [c.pid for c in psutil.Process(pid).children(recursive=True) if _is_api_server(c)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        nested = []
    if nested:
        raise ToolError(
            f"PID {pid}'s tree holds other vLLM servers ({nested}): give one server's PID, or --force",
            ExitCode.USAGE,
        )
    return ServerRoot(pid, "--pid")


def _is_api_server(process: psutil.Process) -> bool:
    try:
        cmdline = " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return any(pattern in cmdline for pattern in ("vllm.entrypoints.openai.api_server", "vllm serve"))


def find_server(config: Config, pid: int | None = None, *, force: bool = False) -> ServerRoot:
    """The root process of the server; ToolError(SERVER_NOT_FOUND) with a hint otherwise."""
    if pid is not None:
        return _checked_pid(pid, force)

    supervised = supervisor_program_pid(config.supervisor_url, config.program)
    if supervised is not None:
        return ServerRoot(supervised, f"supervisord program {config.program!r}")

    roots = matching_roots(config.match)
    if len(roots) == 1:
        return ServerRoot(roots[0].pid, f"command line matching {list(config.match)}")
    if not roots:
        raise ToolError(
            f"no vLLM server found: supervisord ({config.supervisor_url}) has no running program "
            f"{config.program!r} and no command line contains any of {list(config.match)}; "
            "start the server, or name it with --pid PID or --match TEXT",
            ExitCode.SERVER_NOT_FOUND,
        )
    listing = "; ".join(f"{p.pid}: {' '.join(p.info['cmdline'] or [])[:100]}" for p in roots)
    raise ToolError(
        f"{len(roots)} processes look like a vLLM server ({listing}); choose one with --pid PID",
        ExitCode.SERVER_NOT_FOUND,
    )
