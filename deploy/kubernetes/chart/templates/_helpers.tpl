{{/* The release's objects are named after the release (at most 63 characters, a DNS label). */}}
{{- define "vcs.fullname" -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vcs.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "vcs.labels" -}}
{{ include "vcs.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The GPUs of the pod: vllm.tensorParallelSize, or `gpus` when it says the same. */}}
{{- define "vcs.gpus" -}}
{{- $tp := int .Values.vllm.tensorParallelSize -}}
{{- if and (not (kindIs "invalid" .Values.gpus)) (ne (int .Values.gpus) $tp) -}}
{{- fail (printf "gpus=%v does not match vllm.tensorParallelSize=%d: vLLM runs one worker on each of tensorParallelSize GPUs (every model of `models` too); set gpus to %d, or leave it unset" .Values.gpus $tp $tp) -}}
{{- end -}}
{{- $tp -}}
{{- end -}}

{{/* GATE_MODELS from `models`: served-name:model:port:memory-share, the first the default. */}}
{{- define "vcs.gateModels" -}}
{{- $entries := list -}}
{{- $names := dict -}}
{{- $ports := dict -}}
{{- range .Values.models -}}
{{- if hasKey $names .name -}}
{{- fail (printf "models: the served name %s is given to several models: give each model its own name" .name) -}}
{{- end -}}
{{- if hasKey $ports (toString .port) -}}
{{- fail (printf "models: the port %v is given to several models: give each model its own port" .port) -}}
{{- end -}}
{{- if eq (int .port) 8000 -}}
{{- fail (printf "models: %s has the port 8000, the gate's own: give it another port (8001 and up)" .name) -}}
{{- end -}}
{{- $_ := set $names .name true -}}
{{- $_ := set $ports (toString .port) true -}}
{{- $entries = append $entries (printf "%s:%s:%v:%v" .name .model .port .memoryShare) -}}
{{- end -}}
{{- join "," $entries -}}
{{- end -}}

{{/* The start-up allowance must cover every server of `models` loading one after another. */}}
{{- define "vcs.startupAllowance" -}}
{{- $allowance := int .Values.startupAllowanceSeconds -}}
{{- $perServer := int (default 1800 (index .Values.settings "GATE_START_TIMEOUT_S")) -}}
{{- $needed := mul (len .Values.models) $perServer -}}
{{- if lt $allowance $needed -}}
{{- fail (printf "startupAllowanceSeconds=%d is shorter than the %d models loading one after another (%d x GATE_START_TIMEOUT_S=%d s): set it to at least %d, or the pod is restarted before the default model serves" $allowance (len .Values.models) (len .Values.models) $perServer $needed) -}}
{{- end -}}
{{- $allowance -}}
{{- end -}}

{{/* The probes' /health must stay a path the gate forwards without waking the server (GATE_PASSIVE_PATHS). */}}
{{- define "vcs.checkProbePaths" -}}
{{- if hasKey .Values.settings "GATE_PASSIVE_PATHS" -}}
{{- $passive := splitList "," (toString (index .Values.settings "GATE_PASSIVE_PATHS")) -}}
{{- $trimmed := list -}}
{{- range $passive }}{{ $trimmed = append $trimmed (trim .) }}{{ end -}}
{{- if not (has "/health" $trimmed) -}}
{{- fail (printf "settings.GATE_PASSIVE_PATHS=%q leaves out /health, which the readiness and startup probes ask every 10 s: each would wake a suspended server (and no idle suspend would ever happen); add /health to it" (index .Values.settings "GATE_PASSIVE_PATHS")) -}}
{{- end -}}
{{- end -}}
{{- end -}}
