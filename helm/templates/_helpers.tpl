{{- define "llmfdw.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "llmfdw.fullname" -}}
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

{{- define "llmfdw.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "llmfdw.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "llmfdw.selector" -}}
app.kubernetes.io/name: {{ include "llmfdw.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* An image reference: registry/repository:tag or @digest. Args: (list $ .Values.image.xxx) */}}
{{- define "llmfdw.image" -}}
{{- $root := index . 0 -}}
{{- $img := index . 1 -}}
{{- $repo := $img.repository -}}
{{- if $root.Values.image.registry -}}{{- $repo = printf "%s/%s" $root.Values.image.registry $img.repository -}}{{- end -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $repo $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default $root.Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end -}}

{{- define "llmfdw.gpu" -}}
{{- if gt (int .Values.sidecar.gpu.count) 0 -}}true{{- end -}}
{{- end -}}

{{- define "llmfdw.sidecarImage" -}}
{{- if include "llmfdw.gpu" . -}}
{{- include "llmfdw.image" (list . .Values.image.sidecarCuda) -}}
{{- else -}}
{{- include "llmfdw.image" (list . .Values.image.sidecar) -}}
{{- end -}}
{{- end -}}

{{- define "llmfdw.socketPath" -}}/var/run/llmfdw/sidecar.sock{{- end -}}

{{/* What the foreign server's `address` option is set to. */}}
{{- define "llmfdw.sidecarAddress" -}}
{{- if .Values.ddl.sidecarAddress -}}
{{- .Values.ddl.sidecarAddress -}}
{{- else if eq .Values.mode "colocated" -}}
{{- printf "unix://%s" (include "llmfdw.socketPath" .) -}}
{{- else -}}
{{- printf "dns:///%s-sidecar.%s.svc.cluster.local:%d" (include "llmfdw.fullname" .) .Release.Namespace (int .Values.sidecar.grpcPort) -}}
{{- end -}}
{{- end -}}

{{- define "llmfdw.tokensSecret" -}}
{{- default (printf "%s-tenants" (include "llmfdw.fullname" .)) .Values.tenants.existingSecret -}}
{{- end -}}

{{- define "llmfdw.postgresSecret" -}}
{{- default (printf "%s-postgres" (include "llmfdw.fullname" .)) .Values.postgres.auth.existingSecret -}}
{{- end -}}

{{/* The exporter's password file (postgres.exporter): the exporter container and the DDL Job,
which makes its role with it, mount the same volume. */}}
{{- define "llmfdw.exporterPasswordVolume" -}}
- name: exporter-password
  secret:
    secretName: {{ .Values.postgres.exporter.passwordSecret.name }}
    defaultMode: 0440
    items: [{key: {{ .Values.postgres.exporter.passwordSecret.key }}, path: password}]
{{- end -}}

{{/* The sidecar's YAML without tokens: what the ConfigMap holds. */}}
{{- define "llmfdw.sidecarConfig" -}}
{{- $tenants := list -}}
{{- range .Values.tenants.list -}}
{{- $tenants = append $tenants (omit . "token") -}}
{{- end -}}
{{- $cfg := deepCopy .Values.sidecar.config -}}
{{- $_ := set $cfg "tenants" $tenants -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* Checks the schema cannot express. */}}
{{- define "llmfdw.validate" -}}
{{- $gpus := int .Values.sidecar.gpu.count -}}
{{- range .Values.sidecar.config.models -}}
{{- if and (eq .engine "vllm") (eq $gpus 0) -}}
{{- fail (printf "model %s uses the vllm engine: set sidecar.gpu.count (the CPU image has no vLLM)" .name) -}}
{{- end -}}
{{- $tp := int (dig "engine_args" "tensor_parallel_size" 1 .) -}}
{{- if gt $tp (max $gpus 1 | int) -}}
{{- fail (printf "model %s: engine_args.tensor_parallel_size %d is more than sidecar.gpu.count %d" .name $tp $gpus) -}}
{{- end -}}
{{- end -}}
{{- if and (eq (toString .Values.sidecar.config.auth) "required") (not .Values.tenants.list) -}}
{{- fail "sidecar.config.auth is required: list the tenants in tenants.list" -}}
{{- end -}}
{{- if and (eq (toString .Values.sidecar.config.auth) "required") (not .Values.tenants.existingSecret) -}}
{{- range .Values.tenants.list -}}
{{- if not .token -}}
{{- fail (printf "tenant %s has no token: auth is required (set tenants.list[].token or tenants.existingSecret)" .name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.sidecar.tls.clientAuth (not .Values.sidecar.tls.secretName) -}}
{{- fail "sidecar.tls.clientAuth needs sidecar.tls.secretName (a kubernetes.io/tls Secret with ca.crt)" -}}
{{- end -}}
{{- with .Values.ddl.tls -}}
{{- if and (or .certFile .keyFile .serverName) (not .caFile) -}}
{{- fail "ddl.tls: certFile, keyFile and serverName need caFile (the CA of the sidecar's certificate)" -}}
{{- end -}}
{{- if ne (empty .certFile) (empty .keyFile) -}}
{{- fail "ddl.tls: a client certificate needs both certFile and keyFile" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.ddl.tls.caFile (hasPrefix "unix:" (include "llmfdw.sidecarAddress" .)) -}}
{{- fail "ddl.tls is for a sidecar over TCP: this release's PostgreSQL reaches it over a Unix socket" -}}
{{- end -}}
{{- if and (eq .Values.mode "colocated") (not .Values.postgres.auth.existingSecret) (not .Values.postgres.auth.password) -}}
{{- fail "colocated mode runs PostgreSQL: set postgres.auth.existingSecret or postgres.auth.password" -}}
{{- end -}}
{{- end -}}

{{/* How the kubelet asks the sidecar whether it serves: its gRPC probe on the port, or, when the
port speaks TLS (which the kubelet's gRPC probe does not), helm/files/probe.py on a Unix socket
inside the pod. */}}
{{- define "llmfdw.probeAction" -}}
{{- if .Values.sidecar.tls.secretName -}}
exec:
  command: [python, /etc/llmfdw/scripts/probe.py, unix:///run/llmfdw-probe/health.sock]
{{- else -}}
grpc: {port: {{ .Values.sidecar.grpcPort }}}
{{- end -}}
{{- end -}}

{{/* Security context of every container: non-root, read-only root, no privileges. Args: (list uid gid) */}}
{{- define "llmfdw.containerSecurity" -}}
runAsNonRoot: true
runAsUser: {{ index . 0 }}
runAsGroup: {{ index . 1 }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The sidecar's pod-level pieces shared by both shapes. */}}
{{- define "llmfdw.sidecarEnv" -}}
- name: HOME
  value: /home/llmfdw
- name: XDG_CACHE_HOME
  value: /home/llmfdw/.cache
- name: HF_HOME
  value: /home/llmfdw/.cache/huggingface
- name: HF_HUB_OFFLINE
  value: "1"
- name: TMPDIR
  value: /tmp
# glibc malloc: two arenas, big blocks through mmap, an earlier trim (deploy/embedded.py's
# SIDECAR_MALLOC_ENV: freed torch batch memory otherwise stays in up to 16 arenas)
- name: MALLOC_ARENA_MAX
  value: "2"
- name: MALLOC_MMAP_THRESHOLD_
  value: "1048576"
- name: MALLOC_TRIM_THRESHOLD_
  value: "4194304"
{{- if include "llmfdw.gpu" . }}
- name: VLLM_WORKER_MULTIPROC_METHOD
  value: spawn
{{- end }}
{{- end -}}

{{/* init container that writes the sidecar's YAML (ConfigMap + tokens Secret) into an emptyDir */}}
{{- define "llmfdw.renderConfigContainer" -}}
- name: render-config
  image: {{ include "llmfdw.sidecarImage" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: [python, /etc/llmfdw/scripts/render_config.py, /etc/llmfdw/config/sidecar.yaml,
            /etc/llmfdw/tokens, /run/llmfdw-config/sidecar.yaml]
  securityContext:
    {{- include "llmfdw.containerSecurity" (list .Values.sidecar.uid .Values.sidecar.gid) | nindent 4 }}
  resources:
    requests: {cpu: 50m, memory: 128Mi, ephemeral-storage: 16Mi}
    limits: {cpu: 500m, memory: 512Mi, ephemeral-storage: 64Mi}
  volumeMounts:
    - {name: config, mountPath: /etc/llmfdw/config, readOnly: true}
    - {name: scripts, mountPath: /etc/llmfdw/scripts, readOnly: true}
    - {name: tokens, mountPath: /etc/llmfdw/tokens, readOnly: true}
    - {name: rendered-config, mountPath: /run/llmfdw-config}
    - {name: tmp, mountPath: /tmp}
{{- end -}}

{{- define "llmfdw.sidecarContainer" -}}
{{- $colocated := eq .Values.mode "colocated" -}}
- name: sidecar
  image: {{ include "llmfdw.sidecarImage" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: [python, -m, llm_sidecar.server]
  args:
    {{- if $colocated }}
    - --listen
    - unix://{{ include "llmfdw.socketPath" . }}
    - --socket-group
    - {{ .Values.postgres.socketGroup | quote }}
    {{- end }}
    - --listen
    - 0.0.0.0:{{ .Values.sidecar.grpcPort }}
    - --config
    - /run/llmfdw-config/sidecar.yaml
    - --metrics-port
    - {{ .Values.sidecar.metricsPort | quote }}
    - --metrics-address
    - 0.0.0.0
    - --grace
    - {{ .Values.sidecar.grace | quote }}
    - --max-connection-age
    - {{ .Values.sidecar.maxConnectionAge | quote }}
    - --log-level
    - {{ .Values.sidecar.logLevel | quote }}
    {{- with .Values.sidecar.tls }}
    {{- if .secretName }}
    - --listen
    - unix:///run/llmfdw-probe/health.sock
    - --tls-cert
    - /etc/llmfdw/tls/tls.crt
    - --tls-key
    - /etc/llmfdw/tls/tls.key
    {{- if .clientAuth }}
    - --tls-client-ca
    - /etc/llmfdw/tls/ca.crt
    {{- end }}
    {{- end }}
    {{- end }}
  env:
    {{- include "llmfdw.sidecarEnv" . | nindent 4 }}
  ports:
    - {name: grpc, containerPort: {{ .Values.sidecar.grpcPort }}, protocol: TCP}
    - {name: metrics, containerPort: {{ .Values.sidecar.metricsPort }}, protocol: TCP}
  startupProbe:
    {{- include "llmfdw.probeAction" . | nindent 4 }}
    periodSeconds: {{ .Values.sidecar.probes.periodSeconds }}
    failureThreshold: {{ div .Values.sidecar.probes.startupSeconds .Values.sidecar.probes.periodSeconds | max 1 }}
  readinessProbe:
    {{- include "llmfdw.probeAction" . | nindent 4 }}
    periodSeconds: {{ .Values.sidecar.probes.periodSeconds }}
    failureThreshold: 1
    timeoutSeconds: 5
  livenessProbe:
    {{- include "llmfdw.probeAction" . | nindent 4 }}
    periodSeconds: {{ .Values.sidecar.probes.periodSeconds }}
    failureThreshold: {{ .Values.sidecar.probes.failureThreshold }}
    timeoutSeconds: 5
  securityContext:
    {{- include "llmfdw.containerSecurity" (list .Values.sidecar.uid .Values.sidecar.gid) | nindent 4 }}
  resources:
    {{- $res := deepCopy .Values.sidecar.resources -}}
    {{- if include "llmfdw.gpu" . -}}
    {{- $limits := default dict $res.limits -}}
    {{- $_ := set $limits .Values.sidecar.gpu.resourceName (int .Values.sidecar.gpu.count) -}}
    {{- $_ := set $res "limits" $limits -}}
    {{- end }}
    {{- toYaml $res | nindent 4 }}
  volumeMounts:
    - {name: rendered-config, mountPath: /run/llmfdw-config, readOnly: true}
    - {name: scripts, mountPath: /etc/llmfdw/scripts, readOnly: true}
    - {name: home, mountPath: /home/llmfdw}
    - {name: tmp, mountPath: /tmp}
    {{- if $colocated }}
    - {name: socket, mountPath: /var/run/llmfdw}
    {{- end }}
    {{- if .Values.sidecar.tls.secretName }}
    - {name: tls, mountPath: /etc/llmfdw/tls, readOnly: true}
    - {name: probe, mountPath: /run/llmfdw-probe}
    {{- end }}
    {{- if include "llmfdw.gpu" . }}
    - {name: dshm, mountPath: /dev/shm}
    {{- end }}
    {{- if .Values.sidecar.modelVolume }}
    - {name: models, mountPath: /models, readOnly: true}
    {{- end }}
{{- end -}}

{{- define "llmfdw.sidecarVolumes" -}}
- name: config
  configMap:
    name: {{ include "llmfdw.fullname" . }}-config
    items: [{key: sidecar.yaml, path: sidecar.yaml}]
- name: scripts
  configMap:
    name: {{ include "llmfdw.fullname" . }}-config
    items:
      - {key: render_config.py, path: render_config.py}
      - {key: probe.py, path: probe.py}
- name: tokens
  secret:
    secretName: {{ include "llmfdw.tokensSecret" . }}
    defaultMode: 0440
    optional: {{ not (eq (toString .Values.sidecar.config.auth) "required") }}
- name: rendered-config
  emptyDir: {medium: Memory, sizeLimit: 1Mi}
{{- if .Values.sidecar.tls.secretName }}
- name: tls
  secret:
    secretName: {{ .Values.sidecar.tls.secretName }}
    defaultMode: 0440
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
      {{- if .Values.sidecar.tls.clientAuth }}
      - {key: ca.crt, path: ca.crt}
      {{- end }}
- name: probe
  emptyDir: {medium: Memory, sizeLimit: 1Mi}
{{- end }}
- name: home
  emptyDir: {sizeLimit: {{ .Values.sidecar.cacheSize }}}
- name: tmp
  emptyDir: {sizeLimit: 1Gi}
{{- if include "llmfdw.gpu" . }}
- name: dshm
  emptyDir: {medium: Memory, sizeLimit: {{ .Values.sidecar.gpu.shmSize }}}
{{- end }}
{{- with .Values.sidecar.modelVolume }}
- name: models
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "llmfdw.podAnnotations" -}}
checksum/config: {{ include "llmfdw.sidecarConfig" . | sha256sum }}
{{- if .Values.metrics.prometheusAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.sidecar.metricsPort | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .Values.sidecar.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "llmfdw.scheduling" -}}
{{- $nodeSelector := deepCopy .Values.sidecar.nodeSelector -}}
{{- $tolerations := .Values.sidecar.tolerations -}}
{{- if include "llmfdw.gpu" . -}}
{{- $nodeSelector = merge $nodeSelector .Values.sidecar.gpu.nodeSelector -}}
{{- $tolerations = concat $tolerations .Values.sidecar.gpu.tolerations -}}
{{- end -}}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.sidecar.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.sidecar.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
