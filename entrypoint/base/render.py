"""Human-readable tables for results (stderr, through loguru) and the logging setup both tools share."""

from __future__ import annotations

import json
import sys

from loguru import logger


def setup_logging(verbose: bool = False) -> None:
    logger.remove()
    logger.add(
        sys.stderr,
        level="DEBUG" if verbose else "INFO",
        colorize=False,
        format="{time:HH:mm:ss.SSS} {level: <7} {message}",
    )


def print_settings(rows: list[tuple[str, str, str]], as_json: bool) -> None:
    """The settings in force, (variable, value, where it came from), as `config` / `--print-config` show them."""
    if as_json:
        print(json.dumps({env: {"value": value, "from": source} for env, value, source in rows}))
    else:
        for env, value, source in rows:
            print(f"{env}={value}  ({source})")


def _gpu_line(before: list[dict], after: list[dict]) -> str:
    after_by_uuid = {g["uuid"]: g for g in after}
    parts = []
    for gpu in before:
        now = after_by_uuid.get(gpu["uuid"])
        parts.append(f"GPU{gpu['index']} {gpu['used_mib']} -> {now['used_mib'] if now else '?'} MiB")
    return ", ".join(parts)


ROLE_WIDTH = 10  # "dispatcher", the longest role, in every table


def toggle_table(result: dict) -> str:
    lines = [f"{'PID':>8}  {'ROLE':<{ROLE_WIDTH}}  {'BEFORE':<12}    {'AFTER':<12}  {'SECONDS':>7}  PROCESS"]
    for entry in result["pids"]:
        lines.append(
            f"{entry['pid']:>8}  {entry['role']:<{ROLE_WIDTH}}  {entry['before'] or '-':<12} -> "
            f"{entry['after'] or '-':<12}  {entry['seconds']:>7.2f}  {entry['name'][:60]}"
        )
        if entry["error"]:
            lines.append(f"{'':>8}  error: {entry['error']}")
    for dispatcher in result["dispatchers"]:
        state = "frozen (SIGSTOP) while suspended" if dispatcher["frozen_after"] else "running"
        lines.append(f"{dispatcher['pid']:>8}  {'dispatcher':<{ROLE_WIDTH}}  {state}  {dispatcher['name'][:40]}")
    for skipped in result["skipped"]:
        if not any(d["pid"] == skipped["pid"] for d in result["dispatchers"]):
            lines.append(f"{skipped['pid']:>8}  skipped: {skipped['reason']}  {skipped['name'][:60]}")
    phases = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in result["phases"].items())
    server = result.get("server") or {}
    lines.append(
        f"{'ok' if result['ok'] else 'FAILED'}: -> {result['target']} in {result['seconds']:.2f} s"
        f" ({phases or 'no change'}); mode {result['mode']}, requests held by {result['quiesce']};"
        f" backend {result['backend']}; lock rounds {result['lock_rounds']};"
        f" server PID {result['root_pid']} ({result['root_how']}), vLLM {server.get('version') or '?'}"
    )
    if result["gpus_before"]:
        lines.append("GPU memory: " + _gpu_line(result["gpus_before"], result["gpus_after"] or result["gpus_before"]))
    evidence = result.get("evidence") or {}
    if isinstance(evidence.get("gpus"), dict) and "ok" in evidence["gpus"]:
        lines.append(f"proof, GPU memory ({evidence['gpus']['how']}): {'ok' if evidence['gpus']['ok'] else 'FAILED'}")
    if evidence.get("probe"):
        probe = evidence["probe"]
        lines.append(
            f"proof, a one-token completion: {'ok' if probe['ok'] else 'FAILED ' + probe['error']}"
            f" ({probe['seconds']:.2f} s)"
        )
    for note in result["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def status_table(status: dict) -> str:
    server, flags = status.get("server") or {}, status.get("vllm") or {}
    lines = [
        f"server PID {status['root_pid']} ({status['root_how']}), backend {status['backend']}: {status['state']};"
        f" vLLM {server.get('version') or '?'}, scheduler pause {'yes' if server.get('pause') else 'no'},"
        f" sleep mode {'yes' if server.get('sleep') else 'no'}; paused {flags.get('is_paused')},"
        f" sleeping {flags.get('is_sleeping')}"
    ]
    if status.get("hold"):
        hold = status["hold"]
        lines.append(f"HELD by the operator ({hold['by']}, requests in flight: {hold['inflight']}) until `release`")
    if status.get("asleep_since"):
        lines.append("in light sleep (the gate's first idle stage: vLLM asleep, no checkpoint)")
    lines.append(f"{'PID':>8}  {'ROLE':<{ROLE_WIDTH}}  {'STATE':<13}  {'GPU MiB':>8}  PROCESS")
    frozen = {d["pid"]: d["frozen"] for d in status["dispatchers"]}
    for entry in status["pids"]:
        role = entry["role"] + (" (frozen)" if frozen.get(entry["pid"]) else "")
        mib = "-" if entry.get("gpu_mib") is None else entry["gpu_mib"]
        lines.append(f"{entry['pid']:>8}  {role:<{ROLE_WIDTH}}  {entry['state']:<13}  {mib:>8}  {entry['name'][:60]}")
    listed = {entry["pid"] for entry in status["pids"]}
    for dispatcher in status["dispatchers"]:
        if dispatcher["pid"] not in listed:  # frozen: its CUDA state is never asked
            state = "FROZEN" if dispatcher["frozen"] else "not frozen"
            lines.append(
                f"{dispatcher['pid']:>8}  {'dispatcher':<{ROLE_WIDTH}}  {state:<13}  {'-':>8}"
                f"  {dispatcher['name'][:60]}"
            )
    for skipped in status["skipped"]:
        lines.append(
            f"{skipped['pid']:>8}  {'skipped':<{ROLE_WIDTH}}  {skipped['reason']:<13}  {'-':>8}  {skipped['name'][:60]}"
        )
    if status["gpus"]:
        lines.append(
            "GPU memory: "
            + ", ".join(f"GPU{g['index']} {g['used_mib']}/{g['total_mib']} MiB" for g in status["gpus"])
            + f" ({status['gpu_source']})"
        )
    else:
        lines.append(f"GPU memory: unknown ({status['gpu_source']})")
    if status["suspend_record"]:
        lines.append(
            "suspend record: "
            + ", ".join(
                f"GPU{g['index']} released {g['used_before_mib'] - g['used_after_mib']} MiB"
                for g in status["suspend_record"]["gpus"]
            )
        )
    return "\n".join(lines)
