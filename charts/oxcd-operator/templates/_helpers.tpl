{{- define "oxcd-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "oxcd-operator.fullname" -}}
{{- if contains (include "oxcd-operator.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "oxcd-operator.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "oxcd-operator.labels" -}}
app.kubernetes.io/name: {{ include "oxcd-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "oxcd-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "oxcd-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
