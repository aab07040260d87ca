{{/* Names, labels and the pieces every pod shares. */}}

{{- define "budrt.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "budrt.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "budrt.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "budrt.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The Deployment and Service of one model-server group: (dict "root" $ "group" $group). */}}
{{- define "budrt.msName" -}}
{{- printf "%s-ms-%s" (include "budrt.fullname" .root) .group.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* modelServers, each over modelServerDefaults (the group's own keys win, maps merge), as JSON:
     every template reads the groups through this. */}}
{{- define "budrt.groups" -}}
{{- $groups := list -}}
{{- range .Values.modelServers -}}
{{- $groups = append $groups (include "budrt.over" (dict "base" $.Values.modelServerDefaults "top" .) | fromJson) -}}
{{- end -}}
{{- toJson $groups -}}
{{- end -}}

{{/* `top` over `base` as JSON, maps merged key by key. By key presence, not by value: Sprig's
     `merge` would replace a 0 or false of `top` (maxSurge: 0) with the default. */}}
{{- define "budrt.over" -}}
{{- $out := deepCopy .top -}}
{{- range $key, $base := .base -}}
{{- if not (hasKey $out $key) -}}
{{- $_ := set $out $key $base -}}
{{- else if and (kindIs "map" $base) (kindIs "map" (get $out $key)) -}}
{{- $_ := set $out $key (include "budrt.over" (dict "base" $base "top" (get $out $key)) | fromJson) -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{- define "budrt.gatewayName" -}}
{{- printf "%s-gateway" (include "budrt.fullname" .) -}}
{{- end -}}

{{/* Labels of objects that belong to no one role. */}}
{{- define "budrt.labels" -}}
app.kubernetes.io/name: {{ include "budrt.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{ include "budrt.chartLabels" . }}
{{- end -}}

{{/* What every object carries besides its selector labels. */}}
{{- define "budrt.chartLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Labels of one role's objects and pods: (dict "root" $ "component" ... ["group" name]). */}}
{{- define "budrt.roleLabels" -}}
{{ include "budrt.selectorLabels" . }}
{{ include "budrt.chartLabels" .root }}
{{- end -}}

{{/* Selector labels of one role: (dict "root" $ "component" "gateway"|"model-server" ["group" name]). */}}
{{- define "budrt.selectorLabels" -}}
app.kubernetes.io/name: {{ include "budrt.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- if .group }}
budrt.io/group: {{ .group }}
{{- end }}
{{- end -}}

{{/* `image` with a role's own override over it (e.g. a CUDA tag for GPU groups only):
     (dict "root" $ "image" override-or-nil). */}}
{{- define "budrt.image" -}}
{{- $image := merge (deepCopy (default dict .image)) .root.Values.image -}}
{{- printf "%s:%s" $image.repository (default .root.Chart.AppVersion $image.tag) -}}
{{- end -}}

{{- define "budrt.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "budrt.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "budrt.scheme" -}}
{{- if .Values.tls.enabled }}https{{ else }}http{{ end -}}
{{- end -}}

{{/* The Secret holding the platform CA (tls.crt + tls.key). */}}
{{- define "budrt.caSecret" -}}
{{- if .Values.tls.certManager.enabled -}}
{{- printf "%s-ca" (include "budrt.fullname" .) -}}
{{- else -}}
{{- required "tls.enabled needs tls.existingSecret (a CA in a kubernetes.io/tls Secret) or tls.certManager.enabled" .Values.tls.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* Every name the platform's server certificate must carry (budrt's tls.hosts): loopback for
     the probes, the gateway's and each group's Service names. */}}
{{- define "budrt.tlsHosts" -}}
{{- $ns := .Release.Namespace -}}
{{- $hosts := list "localhost" "127.0.0.1" -}}
{{- $services := list (include "budrt.gatewayName" .) -}}
{{- range include "budrt.groups" . | fromJsonArray -}}
{{- $services = append $services (include "budrt.msName" (dict "root" $ "group" .)) -}}
{{- end -}}
{{- range $services -}}
{{- $hosts = concat $hosts (list . (printf "%s.%s" . $ns) (printf "%s.%s.svc" . $ns) (printf "%s.%s.svc.cluster.local" . $ns)) -}}
{{- end -}}
{{- concat $hosts .Values.gateway.extraHosts .Values.tls.extraHosts | uniq | toJson -}}
{{- end -}}

{{/* The budrt YAML configuration (ConfigMap budrt.yaml): values.config plus what the chart owns. */}}
{{- define "budrt.config" -}}
{{- include "budrt.checkValues" . -}}
{{- $cfg := deepCopy (default dict .Values.config) -}}
{{- $gateway := deepCopy (default dict (get $cfg "gateway")) -}}
{{- $_ := set $gateway "host" "0.0.0.0" -}}
{{- $_ := set $gateway "port" (int .Values.gateway.port) -}}
{{- $_ := set $cfg "gateway" $gateway -}}
{{- if .Values.tls.enabled -}}
{{- $tls := deepCopy (default dict (get $cfg "tls")) -}}
{{- $_ := set $tls "enabled" true -}}
{{- $_ := set $tls "dir" .Values.tls.dir -}}
{{- $_ := set $tls "hosts" (include "budrt.tlsHosts" . | fromJsonArray) -}}
{{- $_ := set $cfg "tls" $tls -}}
{{- end -}}
{{- $servers := list -}}
{{- range include "budrt.groups" . | fromJsonArray -}}
{{- $owned := dict "name" .name "models" .models "host" "0.0.0.0" "port" (int .port) -}}
{{- $servers = append $servers (merge $owned (deepCopy (default dict .settings))) -}}
{{- end -}}
{{- $_ := set $cfg "models" .Values.models -}}
{{- $_ := set $cfg "model_servers" $servers -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* The gateway's deployments as JSON (BUDRT_DEPLOYMENTS): each served model -> the Services
     of the groups serving it. `managed`: health-checked, and the gateway is ready only once each
     has a ready endpoint. The internal key is expanded by the kubelet from BUDRT_INTERNAL_KEY,
     defined earlier in the same env list: the manifest never holds it. */}}
{{- define "budrt.deployments" -}}
{{- $deployments := list -}}
{{- range $model := .Values.models -}}
{{- $endpoints := list -}}
{{- $zones := list -}}
{{- range $group := include "budrt.groups" $ | fromJsonArray -}}
{{- if has $model.name $group.models -}}
{{- $service := include "budrt.msName" (dict "root" $ "group" $group) -}}
{{- $url := printf "%s://%s.%s.svc:%d/v1" (include "budrt.scheme" $) $service $.Release.Namespace (int $group.port) -}}
{{- $endpoints = append $endpoints $url -}}
{{- $zones = append $zones ($group.zone | default "") -}}
{{- end -}}
{{- end -}}
{{- if $endpoints -}}
{{- $d := dict "model" $model.name "endpoints" $endpoints "api_key" "$(BUDRT_INTERNAL_KEY)" "managed" true "task" $model.task -}}
{{- /* A group pinned to a zone names it: /admin/replicas shows the spread, and a gateway given
       BUDRT_ZONE prefers its zone's group. */ -}}
{{- if compact $zones }}{{ $_ := set $d "zones" $zones }}{{ end -}}
{{- if $model.aliases }}{{ $_ := set $d "aliases" $model.aliases }}{{ end -}}
{{- $deployments = append $deployments $d -}}
{{- end -}}
{{- end -}}
{{- toJson $deployments -}}
{{- end -}}

{{/* One env entry from an existing Secret: (dict "env" NAME "secret" NAME "key" KEY ["optional" true]). */}}
{{- define "budrt.secretEnv" -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ .key }}
      {{- if .optional }}
      optional: true
      {{- end }}
{{- end -}}

{{/* Environment shared by both roles: config file, home, the internal key, object store, KMS,
     and the database when `database` is true. (dict "root" $ "database" bool) */}}
{{- define "budrt.commonEnv" -}}
{{- $s := .root.Values.secrets -}}
- name: BUDRT_CONFIG
  value: /etc/budrt/budrt.yaml
- name: BUDRT_HOME
  value: /var/lib/budrt/home
- name: BUDRT_NODE  # informational: the node's zone label is not readable through the downward API
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
{{ include "budrt.secretEnv" (dict "env" "BUDRT_INTERNAL_KEY" "secret" (required "secrets.internalKey.name is required" $s.internalKey.name) "key" $s.internalKey.key) }}
{{- if .database }}
{{- if $s.databaseUrl.name }}
{{ include "budrt.secretEnv" (dict "env" "BUDRT_DATABASE_URL" "secret" $s.databaseUrl.name "key" $s.databaseUrl.key) }}
{{- end }}
{{- if $s.databaseReplicaUrls.name }}
{{ include "budrt.secretEnv" (dict "env" "BUDRT_DATABASE_REPLICA_URLS" "secret" $s.databaseReplicaUrls.name "key" $s.databaseReplicaUrls.key) }}
{{- end }}
{{- end }}
{{- if $s.s3.name }}
{{ include "budrt.secretEnv" (dict "env" "BUDRT_OBJECTS__S3__ACCESS_KEY_ID" "secret" $s.s3.name "key" $s.s3.accessKeyIdKey) }}
{{ include "budrt.secretEnv" (dict "env" "BUDRT_OBJECTS__S3__SECRET_ACCESS_KEY" "secret" $s.s3.name "key" $s.s3.secretAccessKeyKey) }}
{{- end }}
{{- if $s.kms.name }}
{{ include "budrt.secretEnv" (dict "env" "BUDRT_KMS__ACCESS_KEY_ID" "secret" $s.kms.name "key" $s.kms.accessKeyIdKey) }}
{{ include "budrt.secretEnv" (dict "env" "BUDRT_KMS__SECRET_ACCESS_KEY" "secret" $s.kms.name "key" $s.kms.secretAccessKeyKey) }}
{{- end }}
{{- end -}}

{{/* uvicorn's graceful shutdown: what is left of the pod's grace period after the preStop sleep,
     with 5 s of margin before the kubelet's SIGKILL. */}}
{{- define "budrt.shutdownGrace" -}}
{{- max 1 (sub (int .grace) (add (int .root.Values.preStopSleepSeconds) 5)) -}}
{{- end -}}

{{- define "budrt.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001  # the CA Secret's files are group-readable to the init container
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "budrt.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Zone and node spread of one role's pods: (dict "root" $ "component" ... ["group" name]). */}}
{{- define "budrt.topologySpread" -}}
{{- $spread := .root.Values.topologySpread -}}
- topologyKey: topology.kubernetes.io/zone
  maxSkew: {{ $spread.zone.maxSkew }}
  whenUnsatisfiable: {{ $spread.zone.whenUnsatisfiable }}
  labelSelector:
    matchLabels:
      {{- include "budrt.selectorLabels" . | nindent 6 }}
- topologyKey: kubernetes.io/hostname
  maxSkew: {{ $spread.hostname.maxSkew }}
  whenUnsatisfiable: {{ $spread.hostname.whenUnsatisfiable }}
  labelSelector:
    matchLabels:
      {{- include "budrt.selectorLabels" . | nindent 6 }}
{{- end -}}

{{/* Volumes of every pod: the config, the writable data and tmp, the CA Secret with TLS. */}}
{{- define "budrt.volumes" -}}
- name: config
  configMap:
    name: {{ include "budrt.fullname" . }}-config
- name: data
  emptyDir:
    sizeLimit: {{ .Values.dataVolume.sizeLimit }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpVolume.sizeLimit }}
{{- if .Values.tls.enabled }}
- name: tls-ca
  secret:
    secretName: {{ include "budrt.caSecret" . }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "budrt.volumeMounts" -}}
- name: config
  mountPath: /etc/budrt
  readOnly: true
- name: data
  mountPath: /var/lib/budrt
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* With TLS: copy the shared CA into tls.dir on the data volume ((dict "root" $ "image" ...)). budrt locks, narrows and writes
     certificates there (each pod issues its own server and client certificates from the CA),
     which a read-only Secret mount does not allow. */}}
{{- define "budrt.tlsInit" -}}
{{- $root := .root -}}
initContainers:
  - name: tls-ca
    image: {{ include "budrt.image" . }}
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    command: ["sh", "-c"]
    args:
      - umask 077 && mkdir -p "$TLS_DIR" && cp /etc/budrt/tls-ca/tls.crt "$TLS_DIR/ca.pem" && cp /etc/budrt/tls-ca/tls.key "$TLS_DIR/ca.key"
    env:
      - name: TLS_DIR
        value: {{ $root.Values.tls.dir | quote }}
    resources:
      requests: {cpu: 10m, memory: 16Mi}
      limits: {cpu: 100m, memory: 64Mi}
    securityContext:
      {{- include "budrt.containerSecurityContext" $root | nindent 6 }}
    volumeMounts:
      - name: data
        mountPath: /var/lib/budrt
      - name: tls-ca
        mountPath: /etc/budrt/tls-ca
        readOnly: true
{{- end -}}

{{/* Refuse values that would put a secret in the ConfigMap, or that cannot work across pods. */}}
{{- define "budrt.checkValues" -}}
{{- $cfg := default dict .Values.config -}}
{{- range list "secret_key" "admin_key" "internal_key" "database_url" "database_replica_urls" -}}
{{- if hasKey $cfg . -}}
{{- fail (printf "config.%s is a secret: name its Secret under `secrets` instead" .) -}}
{{- end -}}
{{- end -}}
{{- $nested := list (dig "gateway" "redis_url" "" $cfg) (dig "auth" "jwt" "secret" "" $cfg) -}}
{{- range list "access_key_id" "secret_access_key" -}}
{{- $nested = concat $nested (list (dig "kms" . "" $cfg) (dig "objects" "s3" . "" $cfg)) -}}
{{- end -}}
{{- if compact $nested -}}
{{- fail "config holds a secret (gateway.redis_url, auth.jwt.secret, kms or objects.s3 access keys): name its Secret under `secrets` instead" -}}
{{- end -}}
{{- range list "deployments" "home" "models" "model_servers" -}}
{{- if hasKey $cfg . -}}
{{- fail (printf "config.%s is set by the chart (models, modelServers)" .) -}}
{{- end -}}
{{- end -}}
{{- if lt (int .Values.gateway.replicas) 2 -}}
{{- fail "gateway.replicas must be at least 2 (one pod may be drained at a time)" -}}
{{- end -}}
{{- if not .Values.secrets.databaseUrl.name -}}
{{- fail "secrets.databaseUrl: gateways need a shared database (the default SQLite file would be one per pod)" -}}
{{- end -}}
{{- $shared := or (eq (dig "objects" "backend" "local" $cfg) "s3") (hasPrefix "s3://" (default "" $cfg.repository_url)) -}}
{{- if and $shared (dig "objects" "encrypt" true $cfg) (ne (dig "kms" "provider" "local" $cfg) "aws-kms") -}}
{{- fail "objects in S3 are encrypted under kms: a local keyring is one per pod; set config.kms.provider aws-kms (or objects.encrypt false)" -}}
{{- end -}}
{{- $names := list -}}
{{- range .Values.models -}}{{- $names = append $names .name -}}{{- end -}}
{{- range include "budrt.groups" . | fromJsonArray -}}
{{- if not (and .resources.requests .resources.limits) -}}
{{- fail (printf "modelServers: group %q needs resources.requests and resources.limits" .name) -}}
{{- end -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" .name) -}}
{{- fail (printf "modelServers: %q is not a DNS label (lower-case letters, digits, '-')" .name) -}}
{{- end -}}
{{- range .models -}}
{{- if not (has . $names) -}}
{{- fail (printf "modelServers: model %q is not in `models`" .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "true" when a group loads a model through the model registry (it then needs the database). */}}
{{- define "budrt.groupNeedsDatabase" -}}
{{- $group := .group -}}
{{- range .root.Values.models -}}
{{- if and (has .name $group.models) (or (hasPrefix "registry:" .source) (hasPrefix "sha256:" .source)) -}}
true
{{- end -}}
{{- end -}}
{{- end -}}
