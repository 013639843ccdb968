{{/* Names, labels and the values derived from several others. */}}

{{- define "tactic-server.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tactic-server.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tactic-server.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tactic-server.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tactic-server.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "tactic-server.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "tactic-server.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tactic-server.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The server image: the GPU build (appVersion) or the CPU build (appVersion-cpu). */}}
{{- define "tactic-server.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s%s" .Chart.AppVersion (ternary "" "-cpu" .Values.gpu.enabled)) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* The model download's image: its own when set, else the server's. */}}
{{- define "tactic-server.downloadImage" -}}
{{- $image := .Values.model.download.image }}
{{- if $image.repository }}
{{- printf "%s:%s" $image.repository ($image.tag | default "latest") }}
{{- else }}
{{- include "tactic-server.image" . }}
{{- end }}
{{- end }}

{{/* Where the server reads the checkpoint: the model volume's mount plus model.directory. */}}
{{- define "tactic-server.modelDir" -}}
{{- if .Values.model.directory }}
{{- printf "/models/%s" (trimAll "/" .Values.model.directory) }}
{{- else }}
{{- print "/models" }}
{{- end }}
{{- end }}

{{/* Checks between values that values.schema.json cannot express. */}}
{{- define "tactic-server.validate" -}}
{{- if and (eq .Values.server.engine "sglang") (gt (int .Values.server.tensorParallel) (int .Values.gpu.count)) }}
{{- fail (printf "server.tensorParallel (%d) needs at least as many GPUs: gpu.count is %d" (int .Values.server.tensorParallel) (int .Values.gpu.count)) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not (or .Values.autoscaling.targetCPUUtilizationPercentage .Values.autoscaling.targetWaitingRequestsPerPod)) }}
{{- fail "autoscaling.enabled needs autoscaling.targetCPUUtilizationPercentage or autoscaling.targetWaitingRequestsPerPod" }}
{{- end }}
{{- end }}
