{{/*
Test stub, written for semsearch's tests: not the real Milvus chart's templates.
*/}}

{{/*
The Milvus fullname, by the rule helm/semsearch's semsearch.milvusUri assumes: fullnameOverride,
else the release name when it contains "milvus", else "<release>-milvus".
*/}}
{{- define "milvus-stub.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains "milvus" .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-milvus" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/*
Selector labels. Call with (dict "ctx" $ "name" "<app name>" "component" "<component>").
*/}}
{{- define "milvus-stub.selectorLabels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
A minimal workload. Call with (dict "ctx" $ "kind" "Deployment|StatefulSet" "fullname" "<name>"
"name" "<app name>" "component" "<component>" "replicas" N "port" P "env" (dict ...)).
*/}}
{{- define "milvus-stub.workload" -}}
apiVersion: apps/v1
kind: {{ .kind }}
metadata:
  name: {{ .fullname }}
  labels:
    {{- include "milvus-stub.selectorLabels" . | nindent 4 }}
    app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
    helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version }}
spec:
  replicas: {{ .replicas }}
  {{- if eq .kind "StatefulSet" }}
  serviceName: {{ .fullname }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "milvus-stub.selectorLabels" . | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "milvus-stub.selectorLabels" . | nindent 8 }}
    spec:
      containers:
        - name: {{ .component }}
          # Not a real image: the stub only renders, it is never installed.
          image: example.invalid/semsearch-test-stub/{{ .name }}:stub
          ports:
            - name: {{ .portName | default "service" }}
              containerPort: {{ .port }}
              protocol: TCP
          {{- with .env }}
          env:
            {{- range $k, $v := . }}
            - name: {{ $k }}
              value: {{ $v | quote }}
            {{- end }}
          {{- end }}
{{- end }}
