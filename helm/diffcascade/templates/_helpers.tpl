{{/* Chart name, truncated to a DNS label. */}}
{{- define "diffcascade.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart unless the release name already holds the chart name. */}}
{{- define "diffcascade.fullname" -}}
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

{{- define "diffcascade.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "diffcascade.selectorLabels" -}}
app.kubernetes.io/name: {{ include "diffcascade.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "diffcascade.labels" -}}
helm.sh/chart: {{ include "diffcascade.chart" . }}
{{ include "diffcascade.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: diffcascade
{{- end }}

{{- define "diffcascade.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "diffcascade.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository@digest when a digest is pinned (the tag is then ignored), else repository:tag. */}}
{{- define "diffcascade.imageRef" -}}
{{- $image := index . 0 }}
{{- $appVersion := index . 1 }}
{{- $key := index . 2 }}
{{- with $image.digest }}
{{- if not (regexMatch "^sha256:[a-f0-9]{64}$" .) }}
{{- fail (printf "%s.digest must be sha256:<64 hex digits>, not %q" $key .) }}
{{- end }}
{{- printf "%s@%s" $image.repository . }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $appVersion $image.tag) }}
{{- end }}
{{- end }}

{{- define "diffcascade.image" -}}
{{- include "diffcascade.imageRef" (list .Values.image .Chart.AppVersion "image") }}
{{- end }}

{{- define "diffcascade.workerImage" -}}
{{- include "diffcascade.imageRef" (list .Values.workerImage .Chart.AppVersion "workerImage") }}
{{- end }}

{{/* Rules every operator needs in each namespace it serves (a Role or the ClusterRole). */}}
{{- define "diffcascade.namespacedRules" -}}
# The cascades: Kopf lists/watches them and patches its progress annotations.
- apiGroups: [diffcascade.dev]
  resources: [diffusioncascades]
  verbs: [get, list, watch, patch]
- apiGroups: [diffcascade.dev]
  resources: [diffusioncascades/status]
  verbs: [get, patch]
# Children. They carry owner references, so the garbage collector removes them with their
# cascade; delete is for the per-variant children of a variant removed from a spec (prune).
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [services]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch, create, patch]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, create, patch, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, create, patch, delete]
# The profiling Job of a cascade (kube/profiling.py): created once, then read for its result.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, create]
# The config API's bearer token, one Secret per cascade (<cascade>-token). resourceNames cannot
# restrict create, and the names are per cascade, so get/patch cannot be pinned either; no
# list or watch, so the operator cannot enumerate secrets.
- apiGroups: [""]
  resources: [secrets]
  verbs: [create, get, patch]
# Worker pods: found by label to push the plan, annotated with pod-deletion-cost.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, patch]
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- if not .Values.peering.standalone }}
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end }}
