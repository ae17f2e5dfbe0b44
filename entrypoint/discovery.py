"""Find the server's root process: by --pid, by asking supervisord, or by matching command lines."""

from __future__ import annotations

import http.client
import os
import xmlrpc.client
from dataclasses import dataclass

import psutil
from loguru import logger
from supervisor.xmlrpc import SupervisorTransport

from .config import Config
from .errors import ExitCode, SuspendError
from .processes import ancestors_of, describe


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

    Raises SuspendError when supervisord runs the program but it is not running: then matching
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
        raise SuspendError(
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


def find_server(config: Config, pid: int | None = None) -> ServerRoot:
    """The root process of the server; SuspendError(SERVER_NOT_FOUND) with a hint otherwise."""
    if pid is not None:
        if describe(pid) is None:
            raise SuspendError(f"no process with PID {pid}: check the PID given with --pid", ExitCode.SERVER_NOT_FOUND)
        return ServerRoot(pid, "--pid")

    supervised = supervisor_program_pid(config.supervisor_url, config.program)
    if supervised is not None:
        return ServerRoot(supervised, f"supervisord program {config.program!r}")

    roots = matching_roots(config.match)
    if len(roots) == 1:
        return ServerRoot(roots[0].pid, f"command line matching {list(config.match)}")
    if not roots:
        raise SuspendError(
            f"no vLLM server found: supervisord ({config.supervisor_url}) has no running program "
            f"{config.program!r} and no command line contains any of {list(config.match)}; "
            "start the server, or name it with --pid PID or --match TEXT",
            ExitCode.SERVER_NOT_FOUND,
        )
    listing = "; ".join(f"{p.pid}: {' '.join(p.info['cmdline'] or [])[:100]}" for p in roots)
    raise SuspendError(
        f"{len(roots)} processes look like a vLLM server ({listing}); choose one with --pid PID",
        ExitCode.SERVER_NOT_FOUND,
    )
