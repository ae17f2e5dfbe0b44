"""supervisord programs for GATE_MODELS: one vLLM server per model, written before supervisord starts.

docker/start-services.sh saves the vLLM arguments (the compose file's `command:`, NUL-separated) and, when
GATE_MODELS is set, runs `vllm-gate --write-programs DIR`, which writes:
- per model, an arguments file next to the saved one (`ARGS.NAME`): the saved arguments, then the model's
  own `--model`, `--served-model-name`, `--port` and `--gpu-memory-utilization` (vLLM's parser keeps the
  last value given, so these win over the command's);
- DIR/models.conf, which supervisord.conf's [include] reads: the default model stays program `vllm` (its
  arguments file set), every other one gets a [program:vllm-NAME] of the same shape; none starts by
  itself, because the gate starts them one after another (entrypoint/gate/startup.py).
"""

from __future__ import annotations

from pathlib import Path

from ..base.errors import ExitCode, ToolError
from .config import GateConfig, ModelEntry

PROGRAMS_FILE = "models.conf"
# What [program:vllm] in supervisord.conf has, for the other models' programs (the reasons are there).
PROGRAM_SETTINGS = """command=%(ENV_VLLM_LAUNCHER)s
priority=100
autorestart=true
startsecs=10
startretries=3
stopsignal=TERM
stopwaitsecs=30
stopasgroup=true
killasgroup=true
stdout_logfile=/dev/stdout
stdout_logfile_maxbytes=0
stderr_logfile=/dev/stderr
stderr_logfile_maxbytes=0
"""


def model_arguments(saved: list[str], model: ModelEntry) -> list[str]:
    return [*saved, "--model", model.model, "--served-model-name", model.name, "--port", str(model.port)] + [
        "--gpu-memory-utilization",
        f"{model.share:g}",
    ]


def read_arguments(path: Path) -> list[str]:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ToolError(
            f"cannot read the saved vLLM arguments {path}: {error}; docker/start-services.sh saves them", ExitCode.USAGE
        ) from None
    return [part.decode() for part in data.split(b"\0")[:-1]]  # each argument ends with a NUL


def program_section(model: ModelEntry, args_file: Path) -> str:
    environment = f'environment=VLLM_ARGS_FILE="{args_file}"\n'
    if model.default:  # [program:vllm] of supervisord.conf, with its arguments and without its autostart
        return f"[program:{model.program}]\nautostart=false\n{environment}"
    return f"[program:{model.program}]\nautostart=false\n{environment}{PROGRAM_SETTINGS}"


def write_programs(gate: GateConfig, args_file: Path, programs_dir: Path) -> list[str]:
    """Write the arguments files and DIR/models.conf for GATE_MODELS (remove it without); returns the programs."""
    conf = programs_dir / PROGRAMS_FILE
    if not gate.models:
        conf.unlink(missing_ok=True)
        return []
    saved = read_arguments(args_file)
    sections = []
    for model in gate.models:
        if '"' in str(args_file) or "%" in str(args_file):
            raise ToolError(f"VLLM_ARGS_FILE={args_file} has a quote or %: choose a plain path", ExitCode.USAGE)
        own = Path(f"{args_file}.{model.name}")
        encoded = b"".join(arg.encode() + b"\0" for arg in model_arguments(saved, model))
        temporary = own.with_name(own.name + ".tmp")
        temporary.write_bytes(encoded)
        temporary.replace(own)  # run-vllm never reads half a list
        sections.append(program_section(model, own))
    programs_dir.mkdir(parents=True, exist_ok=True)
    header = "; Written by `vllm-gate --write-programs` from GATE_MODELS at container start: do not edit.\n"
    temporary = conf.with_name(conf.name + ".tmp")
    temporary.write_text(header + "\n".join(sections))
    temporary.replace(conf)
    return [model.program for model in gate.models]
