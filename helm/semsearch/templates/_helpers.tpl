{{/*
Expand the name of the chart.
*/}}
{{- define "semsearch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 52 chars so that suffixes such as "-sglang-green" still fit the 63-character
DNS label limit. If release name contains chart name it will be used as a full name.
*/}}
{{- define "semsearch.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "semsearch.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels. Call with (dict "ctx" $ "component" "server").
*/}}
{{- define "semsearch.labels" -}}
helm.sh/chart: {{ include "semsearch.chart" .ctx }}
{{ include "semsearch.selectorLabels" . }}
{{- if .ctx.Chart.AppVersion }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: semsearch
{{- end }}

{{/*
Selector labels: name, instance and component only. These never change between value sets or
releases (Deployment selectors are immutable), so nothing version- or value-dependent goes here.
Call with (dict "ctx" $ "component" "server").
*/}}
{{- define "semsearch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "semsearch.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "semsearch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "semsearch.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from {repository, tag, digest}; refuses `latest` and empty tags.
Call with (dict "image" .Values.image "default" .Chart.AppVersion "what" "image").
*/}}
{{- define "semsearch.imageRef" -}}
{{- $tag := default .default .image.tag | toString }}
{{- if not .image.repository }}
{{- fail (printf "%s.repository must be set" .what) }}
{{- end }}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- if or (not $tag) (eq (lower $tag) "latest") }}
{{- fail (printf "%s: pin a version tag (or a digest); %q is not allowed" .what $tag) }}
{{- end }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{- define "semsearch.image" -}}
{{- include "semsearch.imageRef" (dict "image" .Values.image "default" .Chart.AppVersion "what" "image") }}
{{- end }}

{{/*
The CUDA variant of the semsearch image for the fine-tune Job.
*/}}
{{- define "semsearch.trainerImage" -}}
{{- $repo := default .Values.image.repository .Values.trainer.image.repository }}
{{- $tag := default (printf "%s-cuda" (default .Chart.AppVersion .Values.image.tag)) .Values.trainer.image.tag }}
{{- include "semsearch.imageRef" (dict "image" (dict "repository" $repo "tag" $tag "digest" "") "default" "" "what" "trainer.image") }}
{{- end }}

{{- define "semsearch.sglangImage" -}}
{{- include "semsearch.imageRef" (dict "image" .Values.sglang.image "default" "" "what" "sglang.image") }}
{{- end }}

{{/*
Milvus URI: the subchart's Service when milvus.enabled, else externalMilvus.uri.
The subchart's fullname is "<release>-milvus" (or the release name when it contains "milvus").
*/}}
{{- define "semsearch.milvusUri" -}}
{{- if and .Values.milvus.enabled .Values.externalMilvus.uri }}
{{- fail "set either milvus.enabled=true or externalMilvus.uri, not both" }}
{{- end }}
{{- if .Values.milvus.enabled }}
{{- $name := "" }}
{{- if .Values.milvus.fullnameOverride }}
{{- $name = .Values.milvus.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains "milvus" .Release.Name }}
{{- $name = .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name = printf "%s-milvus" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- printf "http://%s:19530" $name }}
{{- else if .Values.externalMilvus.uri }}
{{- .Values.externalMilvus.uri }}
{{- else }}
{{- fail "Milvus is required: set milvus.enabled=true or externalMilvus.uri" }}
{{- end }}
{{- end }}

{{/*
sglang Service names.
*/}}
{{- define "semsearch.sglangName" -}}
{{- printf "%s-sglang" (include "semsearch.fullname" .) }}
{{- end }}

{{/*
Encoder URL for a workload. Call with (dict "ctx" $ "color" "<blue|green|>").
An explicit encoder.url wins; else the sglang headless Service (one color, or the active one) as a
dns+http:// URL, which the client expands to one server per pod; else empty.
*/}}
{{- define "semsearch.encoderUrl" -}}
{{- $v := .ctx.Values }}
{{- if $v.encoder.url }}
{{- $v.encoder.url }}
{{- else if $v.sglang.enabled }}
{{- if .color }}
{{- if not (index $v.sglang .color).enabled }}
{{- fail (printf "encoderColor %q: sglang.%s.enabled is false" .color .color) }}
{{- end }}
{{- printf "dns+http://%s-%s:%v" (include "semsearch.sglangName" .ctx) .color $v.sglang.port }}
{{- else }}
{{- printf "dns+http://%s:%v" (include "semsearch.sglangName" .ctx) $v.sglang.port }}
{{- end }}
{{- end }}
{{- end }}

{{- define "semsearch.secretName" -}}
{{- default (include "semsearch.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "semsearch.modelStoreClaim" -}}
{{- default (printf "%s-models" (include "semsearch.fullname" .)) .Values.modelStore.existingClaim }}
{{- end }}

{{/*
Environment shared by every semsearch container. Call with (dict "ctx" $ "color" "").
*/}}
{{- define "semsearch.env" -}}
{{- $ctx := .ctx -}}
- name: SEMSEARCH_CONFIG
  value: /etc/semsearch/config.yaml
- name: SEMSEARCH_MILVUS_URI
  value: {{ include "semsearch.milvusUri" $ctx | quote }}
{{- $encoder := include "semsearch.encoderUrl" . }}
{{- if $encoder }}
- name: SEMSEARCH_ENCODER_URL
  value: {{ $encoder | quote }}
{{- end }}
- name: SEMSEARCH_METRICS_PORT
  value: {{ ternary $ctx.Values.metrics.port 0 $ctx.Values.metrics.enabled | quote }}
- name: SEMSEARCH_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "semsearch.secretName" $ctx }}
      key: api-keys
      optional: true
- name: SEMSEARCH_MILVUS_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "semsearch.secretName" $ctx }}
      key: milvus-token
      optional: true
- name: SEMSEARCH_ENCODER_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "semsearch.secretName" $ctx }}
      key: encoder-api-key
      optional: true
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "semsearch.secretName" $ctx }}
      key: hf-token
      optional: true
- name: HF_HOME
  value: /var/cache/huggingface
- name: XDG_DATA_HOME
  value: /var/lib
- name: HOME
  value: /tmp
- name: TOKENIZERS_PARALLELISM
  value: "false"
{{- with $ctx.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Writable volumes for a read-only root filesystem: /tmp, the HF cache, the data dir; plus the
settings ConfigMap, the model store when enabled, and the user's `volumes` (e.g. a CA bundle).
*/}}
{{- define "semsearch.volumes" -}}
- name: config
  configMap:
    name: {{ include "semsearch.fullname" . }}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
- name: hf-cache
  emptyDir:
    sizeLimit: {{ .Values.cacheSizeLimit }}
- name: data-dir
  emptyDir:
    sizeLimit: 1Gi
{{- if .Values.modelStore.enabled }}
- name: models
  persistentVolumeClaim:
    claimName: {{ include "semsearch.modelStoreClaim" . }}
{{- end }}
{{- range .Values.volumes }}
{{- if has .name (list "config" "tmp" "hf-cache" "data-dir" "models") }}
{{- fail (printf "volumes: %q is the name of a volume the chart mounts itself; pick another" .name) }}
{{- end }}
{{- end }}
{{- with .Values.volumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Mounts matching semsearch.volumes. Call with (dict "ctx" $ "modelsReadOnly" true).
*/}}
{{- define "semsearch.volumeMounts" -}}
- name: config
  mountPath: /etc/semsearch
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: hf-cache
  mountPath: /var/cache/huggingface
- name: data-dir
  mountPath: /var/lib/semsearch
{{- if .ctx.Values.modelStore.enabled }}
- name: models
  mountPath: {{ .ctx.Values.modelStore.mountPath }}
  readOnly: {{ .modelsReadOnly }}
{{- end }}
{{- with .ctx.Values.volumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Annotations that roll pods when the settings or the Secret change.
*/}}
{{- define "semsearch.checksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- if and .Values.secrets.create (not .Values.secrets.existingSecret) }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}
{{- end }}

{{/*
Helm hook annotations for a Job. Call with (dict "hook" .Values.indexer.hook "weight" 10).
*/}}
{{- define "semsearch.hookAnnotations" -}}
{{- if .hook -}}
helm.sh/hook: {{ .hook | quote }}
helm.sh/hook-weight: {{ .weight | quote }}
helm.sh/hook-delete-policy: before-hook-creation
{{- end }}
{{- end }}

{{/*
Job name: <fullname>-<kind>[-<runId>].
*/}}
{{- define "semsearch.jobName" -}}
{{- $base := printf "%s-%s" (include "semsearch.fullname" .ctx) .kind }}
{{- if .runId }}
{{- printf "%s-%s" $base (.runId | toString) | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $base }}
{{- end }}
{{- end }}
