{{/* Chart name. */}}
{{- define "ara-notify.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name, at most 63 chars (DNS label). */}}
{{- define "ara-notify.fullname" -}}
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

{{- define "ara-notify.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Common labels. Call with (dict "ctx" $ "component" "gateway"); component may be "". */}}
{{- define "ara-notify.labels" -}}
{{- $ctx := .ctx -}}
helm.sh/chart: {{ include "ara-notify.chart" $ctx }}
{{ include "ara-notify.selectorLabels" . }}
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
app.kubernetes.io/part-of: ara-notify
{{- with $ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels. Call with (dict "ctx" $ "component" "gateway"). */}}
{{- define "ara-notify.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ara-notify.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{- define "ara-notify.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "ara-notify.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ara-notify.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Name of the Secret the gateways and routers read. */}}
{{- define "ara-notify.secretName" -}}
{{- default (include "ara-notify.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/* Name of the Secret the migrate Job reads. As a pre-install hook it runs
     before the release's own Secret exists, so it gets a hook Secret of its own. */}}
{{- define "ara-notify.migrateSecretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else if .Values.migrate.useHelmHook }}
{{- printf "%s-migrate" (include "ara-notify.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- include "ara-notify.fullname" . }}
{{- end }}
{{- end }}

{{/* Gateway grace period: preStop + drain + margin. */}}
{{- define "ara-notify.gatewayGracePeriod" -}}
{{- add .Values.gateway.preStopSleepSeconds .Values.gateway.drainSeconds .Values.gateway.terminationMarginSeconds }}
{{- end }}

{{/*
A secret value: the one given in values, else the one already stored in the
release's Secret (so generated keys survive upgrades), else a random one.
Call with (list $ "API_KEY" .Values.secrets.apiKey 48).
*/}}
{{- define "ara-notify.secretValue" -}}
{{- $ctx := index . 0 -}}
{{- $key := index . 1 -}}
{{- $given := index . 2 -}}
{{- $length := index . 3 -}}
{{- if $given -}}
{{- $given -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" $ctx.Release.Namespace (include "ara-notify.fullname" $ctx) -}}
{{- if and $existing $existing.data (hasKey $existing.data $key) -}}
{{- index $existing.data $key | b64dec -}}
{{- else -}}
{{- randAlphaNum $length -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* The Secret's stringData (shared by the release Secret and the migrate hook Secret). */}}
{{- define "ara-notify.secretData" -}}
API_KEY: {{ include "ara-notify.secretValue" (list . "API_KEY" .Values.secrets.apiKey 40) | quote }}
JWT_SECRET: {{ include "ara-notify.secretValue" (list . "JWT_SECRET" .Values.secrets.jwtSecret 64) | quote }}
DATABASE_URL: {{ required "secrets.databaseUrl is required unless secrets.existingSecret is set" .Values.secrets.databaseUrl | quote }}
REDIS_URL: {{ required "secrets.redisUrl is required unless secrets.existingSecret is set" .Values.secrets.redisUrl | quote }}
{{- end }}

{{/* Probes shared by gateway and router (both serve /health and /ready on 8081). */}}
{{- define "ara-notify.probes" -}}
startupProbe:
  httpGet:
    path: /health
    port: http
  periodSeconds: 2
  timeoutSeconds: 2
  failureThreshold: 30
readinessProbe:
  httpGet:
    path: /ready
    port: http
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 2
livenessProbe:
  httpGet:
    path: /health
    port: http
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
{{- end }}

{{/* Env common to gateway and router containers. */}}
{{- define "ara-notify.podEnv" -}}
envFrom:
  - configMapRef:
      name: {{ include "ara-notify.fullname" . }}
  - secretRef:
      name: {{ include "ara-notify.secretName" . }}
{{- end }}
