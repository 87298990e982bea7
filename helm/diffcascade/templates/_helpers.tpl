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

{{/* Fails the render on router values the operator would refuse (kube/settings.py), with
the message `diffcascade render --values` gives (kube/render.py). Renders nothing. */}}
{{- define "diffcascade.checkRouter" -}}
{{- $router := .Values.router }}
{{- if not (has $router.scorer (list "learned" "rule" "none")) }}
{{- fail (printf "router.scorer must be learned, rule or none, not %q" (toString $router.scorer)) }}
{{- end }}
{{- $replicas := toString $router.replicas }}
{{- if not (and (regexMatch "^[0-9]+$" $replicas) (ge (atoi $replicas) 1)) }}
{{- fail (printf "router.replicas must be a whole number of at least 1, not %q" $replicas) }}
{{- end }}
{{- $port := toString $router.port }}
{{- if not (and (regexMatch "^[0-9]+$" $port) (ge (atoi $port) 1) (le (atoi $port) 65535)) }}
{{- fail (printf "router.port must be a port number from 1 to 65535, not %q" $port) }}
{{- end }}
{{- $share := toString $router.explorationShare }}
{{- if not (and (regexMatch "^[0-9]+(\\.[0-9]+)?([eE][-+]?[0-9]+)?$" $share) (le (float64 $share) 0.5)) }}
{{- fail (printf "router.explorationShare must be a number from 0 to 0.5, not %q" $share) }}
{{- end }}
{{- end }}
