{{/* Chart name, truncated to a DNS label. */}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: release-unique, used for every object (cluster-scoped ones included). */}}
{{- define "kubetune.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Cluster-scoped names carry the release namespace too: two releases of the same name never collide. */}}
{{- define "kubetune.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "kubetune.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end -}}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.image" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) -}}
{{- end -}}

{{/* "true" when RBAC and the operator are cluster-wide: no namespaces listed, or a glob among them. */}}
{{- define "kubetune.clusterWide" -}}
{{- $wide := empty .Values.operator.watchNamespaces -}}
{{- range .Values.operator.watchNamespaces -}}
{{- if regexMatch "[*?\\[]" . -}}{{- $wide = true -}}{{- end -}}
{{- end -}}
{{- if $wide -}}true{{- end -}}
{{- end -}}

{{/* The S3 endpoint given to the operator: explicit, else the built-in MinIO's Service. */}}
{{- define "kubetune.s3Endpoint" -}}
{{- if .Values.runDefaults.s3.endpoint -}}
{{- .Values.runDefaults.s3.endpoint -}}
{{- else if .Values.minio.enabled -}}
{{- printf "http://%s-minio.%s.svc:9000" (include "kubetune.fullname" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* Rules the operator needs in every namespace it watches (namespaced Role or ClusterRole); docs/helm.md
(Security) says why each verb is there. No ConfigMaps and no Secrets: a run's config travels in its Job. */}}
{{- define "kubetune.operatorRules" -}}
- apiGroups: ["kubetune.io"]
  resources: ["finetuneruns"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["kubetune.io"]
  resources: ["finetuneruns/status"]
  verbs: ["get", "patch"]
{{- /* children carry blockOwnerDeletion owner references to their run */}}
- apiGroups: ["kubetune.io"]
  resources: ["finetuneruns/finalizers"]
  verbs: ["update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
{{- /* the rendezvous Service of a run over several pods (owned by its rank-0 Job, which takes it along) */}}
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}
