{{/* Names and labels. */}}
{{- define "failover-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "failover-gateway.fullname" -}}
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

{{- define "failover-gateway.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "failover-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: include with (dict "root" $ "component" "gateway"). */}}
{{- define "failover-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "failover-gateway.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "failover-gateway.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "failover-gateway.gatewayName" -}}
{{- printf "%s-gateway" (include "failover-gateway.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "failover-gateway.jobsName" -}}
{{- printf "%s-jobs-api" (include "failover-gateway.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "failover-gateway.upstreamsConfigMap" -}}
{{- printf "%s-upstreams" (include "failover-gateway.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "failover-gateway.callersSecret" -}}
{{- printf "%s-callers" (include "failover-gateway.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The Secret and key GATEWAY_CALLERS is read from, as a dict (name, key), or an empty dict when no
callers are configured: the chart's own Secret for gateway.callers, else existingCallersSecret.
*/}}
{{- define "failover-gateway.callersRef" -}}
{{- $g := .Values.gateway -}}
{{- $existing := default dict $g.existingCallersSecret -}}
{{- if $g.callers -}}
{{- toJson (dict "name" (include "failover-gateway.callersSecret" .) "key" "callers.json") -}}
{{- else if $existing.name -}}
{{- toJson (dict "name" $existing.name "key" (default "callers.json" $existing.key)) -}}
{{- else -}}
{{- toJson dict -}}
{{- end -}}
{{- end -}}

{{/*
Seconds Kubernetes waits after SIGTERM: the preStop sleep, then the gateway's drain
(GATEWAY_SHUTDOWN_GRACE_S), plus 10 s of headroom for closing connections.
*/}}
{{- define "failover-gateway.terminationGrace" -}}
{{- $g := .gateway -}}
{{- $longest := max (int $g.shutdownGraceSeconds) (int (default 0 .other)) -}}
{{- add (int $g.preStopSleepSeconds) $longest 10 -}}
{{- end -}}

{{/*
The gateway container. Other charts include it to run the gateway next to their application:

  containers:
    - name: app
      env:
        - name: OPENAI_BASE_URL
          value: http://127.0.0.1:8080/v1
    {{- include "failover-gateway.sidecar" (dict "gateway" .Values.failoverGateway "image" "ghcr.io/example/failover-gateway:0.1.0") | nindent 4 }}

Parameters (a dict):
  gateway             required: a map shaped like this chart's `gateway` values (upstreams, port,
                      adminPort, providerKeys, adminToken, shutdownGraceSeconds, preStopSleepSeconds,
                      proxyEnv, extraEnv, resources, probes)
  image               required: image reference
  upstreamsConfigMap  optional: ConfigMap with key upstreams.json; without it the upstreams are
                      passed inline as GATEWAY_UPSTREAMS JSON
                      (gateway.modelAliases and gateway.modelFallbacks are always passed inline
                      as GATEWAY_MODEL_ALIASES / GATEWAY_MODEL_FALLBACKS JSON)
  callersSecret       optional: (dict "name" <Secret> "key" <key>) of a Secret holding the callers
                      JSON list, read as GATEWAY_CALLERS; then every request needs a caller's key
  listenHost          optional: proxy listen address, 127.0.0.1 (sidecar) by default; the admin
                      port always listens on 0.0.0.0 so the kubelet can probe it
  securityContext     optional: container securityContext (non-root, read-only root by default)
  pullPolicy          optional: IfNotPresent by default
  readiness           optional: true adds a /readyz readiness probe; off by default. /readyz fails
                      while no upstream is routable, and a failing container takes the whole pod,
                      i.e. your application, out of its Service during an inference outage. Turn
                      it on only when the app is useless without the gateway. The /healthz
                      liveness probe is always on.
Give the pod terminationGracePeriodSeconds greater than gateway.shutdownGraceSeconds plus
gateway.preStopSleepSeconds.
*/}}
{{- define "failover-gateway.sidecar" -}}
{{- $g := required "failover-gateway.sidecar: pass (dict \"gateway\" <gateway values> \"image\" <image>)" .gateway -}}
{{- $port := int (default 8080 $g.port) -}}
{{- $adminPort := int (default 9901 $g.adminPort) -}}
{{- $probes := default dict $g.probes -}}
- name: {{ default "gateway" .name }}
  image: {{ required "failover-gateway.sidecar: image is required" .image | quote }}
  imagePullPolicy: {{ default "IfNotPresent" .pullPolicy }}
  args: ["gateway"]
  ports:
    - name: gw-http
      containerPort: {{ $port }}
      protocol: TCP
    - name: gw-admin
      containerPort: {{ $adminPort }}
      protocol: TCP
  env:
    - name: GATEWAY_HOST
      value: {{ default "127.0.0.1" .listenHost | quote }}
    - name: GATEWAY_PORT
      value: {{ $port | quote }}
    - name: GATEWAY_ADMIN_HOST
      value: "0.0.0.0"
    - name: GATEWAY_ADMIN_PORT
      value: {{ $adminPort | quote }}
    - name: GATEWAY_SHUTDOWN_GRACE_S
      value: {{ default 30 $g.shutdownGraceSeconds | quote }}
    {{- if .upstreamsConfigMap }}
    - name: GATEWAY_UPSTREAMS
      valueFrom:
        configMapKeyRef:
          name: {{ .upstreamsConfigMap }}
          key: upstreams.json
    {{- else }}
    - name: GATEWAY_UPSTREAMS
      value: {{ required "failover-gateway.sidecar: gateway.upstreams must list at least one upstream" $g.upstreams | toJson | quote }}
    {{- end }}
    {{- with $g.modelAliases }}
    - name: GATEWAY_MODEL_ALIASES
      value: {{ toJson . | quote }}
    {{- end }}
    {{- with $g.modelFallbacks }}
    - name: GATEWAY_MODEL_FALLBACKS
      value: {{ toJson . | quote }}
    {{- end }}
    {{- with .callersSecret }}
    {{- if .name }}
    - name: GATEWAY_CALLERS
      valueFrom:
        secretKeyRef:
          name: {{ .name }}
          key: {{ default "callers.json" .key }}
    {{- end }}
    {{- end }}
    {{- with $g.adminToken }}
    {{- if .existingSecret }}
    - name: GATEWAY_ADMIN_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ .existingSecret }}
          key: {{ default "token" .key }}
    {{- end }}
    {{- end }}
    {{- with $g.providerKeys }}
    {{- $secret := .existingSecret }}
    {{- range $env, $key := .env }}
    - name: {{ $env }}
      valueFrom:
        secretKeyRef:
          name: {{ required "gateway.providerKeys.existingSecret is required when gateway.providerKeys.env is set" $secret }}
          key: {{ $key }}
    {{- end }}
    {{- end }}
    {{- range $name, $value := $g.proxyEnv }}
    - name: {{ $name }}
      value: {{ $value | toString | quote }}
    {{- end }}
    {{- range $name, $value := $g.extraEnv }}
    - name: {{ $name }}
      value: {{ $value | toString | quote }}
    {{- end }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: gw-admin
    {{- with $probes.liveness }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- /* Off unless asked for: see "readiness" above. */}}
  {{- if eq (toString .readiness) "true" }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: gw-admin
    {{- with $probes.readiness }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  lifecycle:
    preStop:
      exec:
        command: ["sleep", {{ default 5 $g.preStopSleepSeconds | toString | quote }}]
  {{- with $g.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- if .securityContext }}
    {{- toYaml .securityContext | nindent 4 }}
    {{- else }}
    runAsNonRoot: true
    readOnlyRootFilesystem: true
    allowPrivilegeEscalation: false
    capabilities:
      drop: [ALL]
    {{- end }}
{{- end -}}

{{/* Checks that hold whatever the schema says; `fail` gives the operator one clear line. */}}
{{- define "failover-gateway.validate" -}}
{{- $j := .Values.jobsApi -}}
{{- if and $j.enabled (eq $j.store.type "sqlite") -}}
{{- if gt (int $j.replicaCount) 1 -}}
{{- fail (printf "jobsApi.replicaCount is %d but the sqlite store allows exactly 1 replica (one writer on one volume); set jobsApi.store.type=redis to run more" (int $j.replicaCount)) -}}
{{- end -}}
{{- if $j.autoscaling.enabled -}}
{{- fail "jobsApi.autoscaling.enabled needs jobsApi.store.type=redis: the sqlite store allows exactly 1 replica" -}}
{{- end -}}
{{- end -}}
{{- if and $j.enabled (eq $j.store.type "redis") -}}
{{- if not (or $j.store.redis.url $j.store.redis.existingSecret) -}}
{{- fail "jobsApi.store.type=redis needs jobsApi.store.redis.url or jobsApi.store.redis.existingSecret" -}}
{{- end -}}
{{- end -}}
{{- $existing := default dict .Values.gateway.existingCallersSecret -}}
{{- if and .Values.gateway.callers $existing.name -}}
{{- fail "gateway.callers and gateway.existingCallersSecret.name are both set; give the callers in one place" -}}
{{- end -}}
{{- if and (or .Values.gateway.enabled $j.enabled) (not .Values.gateway.upstreams) -}}
{{- fail "gateway.upstreams is empty; list at least one upstream, e.g. --set gateway.upstreams[0].name=a,gateway.upstreams[0].url=http://vllm:8000" -}}
{{- end -}}
{{- end -}}
