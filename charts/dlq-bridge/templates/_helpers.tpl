{{/* Names */}}
{{- define "dlq-bridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dlq-bridge.fullname" -}}
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

{{- define "dlq-bridge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dlq-bridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dlq-bridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "dlq-bridge.labels" -}}
helm.sh/chart: {{ include "dlq-bridge.chart" . }}
{{ include "dlq-bridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "dlq-bridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dlq-bridge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "dlq-bridge.leaseName" -}}
{{- default (include "dlq-bridge.fullname" .) .Values.leaderElection.leaseName -}}
{{- end -}}

{{- define "dlq-bridge.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the API token, and its key. */}}
{{- define "dlq-bridge.authSecretName" -}}
{{- default (printf "%s-auth" (include "dlq-bridge.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}
{{- define "dlq-bridge.authSecretKey" -}}
{{- if .Values.auth.existingSecret -}}{{ .Values.auth.existingSecretKey }}{{- else -}}api-token{{- end -}}
{{- end -}}

{{/*
The token of the chart-made Secret (no auth.existingSecret): auth.token, else
with auth.generate the one already in the cluster (kept across upgrades), else
a new one. Resolved once per render and kept in .Values.auth, so that the
Secret and the pods' checksum agree. Fails when none of the three is set: a
token generated at render time changes on every `helm template` (GitOps tools
would rotate the Secret on every sync).
*/}}
{{- define "dlq-bridge.apiToken" -}}
{{- if not (hasKey .Values.auth "resolvedToken_") -}}
{{- $token := .Values.auth.token -}}
{{- if not $token -}}
{{- if not .Values.auth.generate -}}
{{- fail "auth: set auth.existingSecret (a Secret you manage: recommended, and the choice for GitOps tools that render with `helm template`), auth.token, or auth.generate=true (helm install/upgrade only): the API listens on the pod IP and needs a bearer token" -}}
{{- end -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (printf "%s-auth" (include "dlq-bridge.fullname" .)) -}}
{{- if and $existing $existing.data (hasKey $existing.data "api-token") -}}
{{- $token = index $existing.data "api-token" | b64dec -}}
{{- else -}}
{{- $token = randAlphaNum 40 -}}
{{- end -}}
{{- end -}}
{{- $_ := set .Values.auth "resolvedToken_" $token -}}
{{- end -}}
{{- index .Values.auth "resolvedToken_" -}}
{{- end -}}

{{/*
Pod annotations that change when the config, the API token or secretValues
does, so that pods restart with the new one (the token and the environment
are read at start). With auth.existingSecret the chart cannot see the token:
only a change of Secret name or key restarts; after rotating its content,
restart the pods yourself. For sidecar mode, put them on your pod template's
annotations.
*/}}
{{- define "dlq-bridge.checksums" -}}
checksum/config: {{ include "dlq-bridge.config" . | sha256sum }}
{{- if .Values.auth.existingSecret }}
checksum/auth: {{ printf "%s/%s" .Values.auth.existingSecret .Values.auth.existingSecretKey | sha256sum }}
{{- else }}
checksum/auth: {{ include "dlq-bridge.apiToken" . | sha256sum }}
{{- end }}
{{- if .Values.secretValues }}
checksum/env: {{ toJson .Values.secretValues | sha256sum }}
{{- end }}
{{- end -}}

{{/* Each pod keeps its own data directory on a shared claim (see values.yaml, persistence). */}}
{{- define "dlq-bridge.perPodDataDir" -}}
{{- if and (eq .Values.persistence.type "pvc") (or (eq .Values.mode "sidecar") (gt (int .Values.replicaCount) 1)) -}}
true
{{- end -}}
{{- end -}}

{{- define "dlq-bridge.automountToken" -}}
{{- if kindIs "bool" .Values.serviceAccount.automountToken -}}
{{- .Values.serviceAccount.automountToken -}}
{{- else -}}
{{- .Values.leaderElection.enabled -}}
{{- end -}}
{{- end -}}

{{- define "dlq-bridge.configPath" -}}/etc/dlq-bridge/config.yaml{{- end -}}

{{/*
The config file: .Values.config with the settings the chart owns. The API must
listen on the pod IP (probes, Prometheus), so the token is always configured.
*/}}
{{- define "dlq-bridge.config" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $serve := deepCopy (default (dict) $cfg.serve) -}}
{{- $_ := set $serve "listen" (printf "%s:%d" .Values.service.listenAddress (int .Values.service.port)) -}}
{{- $_ := set $serve "token_env" "DLQ_BRIDGE_API_TOKEN" -}}
{{- $_ := set $serve "data_dir" .Values.persistence.mountPath -}}
{{- $le := dict "enabled" .Values.leaderElection.enabled -}}
{{- if .Values.leaderElection.enabled -}}
{{- $_ := set $le "lease_name" (include "dlq-bridge.leaseName" .) -}}
{{- $_ := set $le "lease_duration" .Values.leaderElection.leaseDuration -}}
{{- end -}}
{{- $_ := set $serve "leader_election" $le -}}
{{- $_ := set $cfg "serve" $serve -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* Pod-level labels (the Azure Workload Identity webhook keys on its label). */}}
{{- define "dlq-bridge.podLabels" -}}
{{- if .Values.workloadIdentity.azure.clientId }}
azure.workload.identity/use: "true"
{{- end }}
{{- with .Values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The dlq-bridge container, shared by the Deployment and the sidecar templates. */}}
{{- define "dlq-bridge.container" -}}
name: dlq-bridge
image: {{ include "dlq-bridge.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
args: ["serve", "--config", {{ include "dlq-bridge.configPath" . | quote }}]
ports:
  - name: dlq-http
    containerPort: {{ .Values.service.port }}
    protocol: TCP
env:
  - name: POD_NAME
    valueFrom:
      fieldRef: {fieldPath: metadata.name}
  - name: POD_NAMESPACE
    valueFrom:
      fieldRef: {fieldPath: metadata.namespace}
  - name: DLQ_BRIDGE_LOG
    value: {{ .Values.logLevel | quote }}
  {{- if include "dlq-bridge.perPodDataDir" . }}
  {{- /* serve's data_dir, and the state dir of CLI commands run in the pod. */}}
  - name: XDG_STATE_HOME
    value: {{ printf "%s/$(POD_NAME)" .Values.persistence.mountPath | quote }}
  - name: DLQ_BRIDGE__SERVE__DATA_DIR
    value: {{ printf "%s/$(POD_NAME)" .Values.persistence.mountPath | quote }}
  {{- else }}
  - name: XDG_STATE_HOME
    value: {{ .Values.persistence.mountPath | quote }}
  {{- end }}
  - name: DLQ_BRIDGE_API_TOKEN
    valueFrom:
      secretKeyRef:
        name: {{ include "dlq-bridge.authSecretName" . }}
        key: {{ include "dlq-bridge.authSecretKey" . }}
  {{- range .Values.secretEnv }}
  - name: {{ .name }}
    valueFrom:
      secretKeyRef:
        name: {{ .secretName }}
        key: {{ .key }}
  {{- end }}
  {{- if .Values.caBundle.configMap }}
  - name: SSL_CERT_FILE
    value: {{ printf "/etc/dlq-bridge-ca/%s" .Values.caBundle.key | quote }}
  {{- end }}
  {{- with .Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- if or .Values.envFromSecrets .Values.secretValues }}
envFrom:
  {{- if .Values.secretValues }}
  - secretRef:
      name: {{ include "dlq-bridge.fullname" . }}-env
  {{- end }}
  {{- range .Values.envFromSecrets }}
  - secretRef:
      name: {{ . }}
  {{- end }}
{{- end }}
livenessProbe:
  httpGet: {path: /healthz, port: dlq-http}
  {{- toYaml .Values.livenessProbe | nindent 2 }}
readinessProbe:
  httpGet: {path: /readyz, port: dlq-http}
  {{- toYaml .Values.readinessProbe | nindent 2 }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
resources:
  {{- toYaml .Values.resources | nindent 2 }}
volumeMounts:
  - name: dlq-bridge-config
    mountPath: /etc/dlq-bridge
    readOnly: true
  - name: dlq-bridge-data
    mountPath: {{ .Values.persistence.mountPath }}
  - name: dlq-bridge-tmp
    mountPath: /tmp
  {{- if .Values.caBundle.configMap }}
  - name: dlq-bridge-ca
    mountPath: /etc/dlq-bridge-ca
    readOnly: true
  {{- end }}
{{- end -}}

{{/* A YAML mapping (string) as one item of a list. */}}
{{- define "dlq-bridge.listItem" -}}
{{ printf "- %s" (. | indent 2 | trimPrefix "  ") }}
{{- end -}}

{{/* Volumes the container needs; add them to the pod that runs it. */}}
{{- define "dlq-bridge.sidecar.volumes" -}}
- name: dlq-bridge-config
  configMap:
    name: {{ include "dlq-bridge.fullname" . }}
- name: dlq-bridge-data
{{- if eq .Values.persistence.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-data" (include "dlq-bridge.fullname" .)) .Values.persistence.pvc.existingClaim }}
{{- else }}
  emptyDir:
    {{- toYaml .Values.persistence.emptyDir | nindent 4 }}
{{- end }}
- name: dlq-bridge-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- if .Values.caBundle.configMap }}
- name: dlq-bridge-ca
  configMap:
    name: {{ .Values.caBundle.configMap }}
    items:
      - key: {{ .Values.caBundle.key }}
        path: {{ .Values.caBundle.key }}
{{- end }}
{{- end -}}

{{/*
Native sidecar (Kubernetes >= 1.29): an initContainers entry that keeps running.
Renders nothing when .Values.sidecar.native is false, or when the cluster is
older (an API server that drops or refuses restartPolicy there would leave an
init container that never ends, and the app's containers would never start).
*/}}
{{- define "dlq-bridge.nativeSidecar" -}}
{{- if and .Values.sidecar.native (semverCompare ">=1.29-0" .Capabilities.KubeVersion.Version) -}}
true
{{- end -}}
{{- end -}}

{{- define "dlq-bridge.sidecar.initContainers" -}}
{{- if include "dlq-bridge.nativeSidecar" . }}
{{- include "dlq-bridge.container" . | printf "restartPolicy: Always\n%s" | include "dlq-bridge.listItem" }}
{{- end }}
{{- end -}}

{{/* Classic sidecar: a containers entry. Renders nothing when the native one renders. */}}
{{- define "dlq-bridge.sidecar.containers" -}}
{{- if not (include "dlq-bridge.nativeSidecar" .) }}
{{- include "dlq-bridge.container" . | include "dlq-bridge.listItem" }}
{{- end }}
{{- end -}}

{{/* Checks no schema can express. */}}
{{- define "dlq-bridge.validate" -}}
{{- if and (eq .Values.mode "deployment") (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) -}}
{{- fail "replicaCount > 1 needs leaderElection.enabled=true (one replica must own alerts and schedules)" -}}
{{- end -}}
{{- if and (eq .Values.mode "sidecar") .Values.service.enabled (empty .Values.sidecar.podSelector) -}}
{{- fail "mode=sidecar with service.enabled needs sidecar.podSelector (the labels of the pods carrying the sidecar)" -}}
{{- end -}}
{{- if and .Values.serviceMonitor.enabled (not .Values.service.enabled) -}}
{{- fail "serviceMonitor.enabled needs service.enabled" -}}
{{- end -}}
{{- if .Values.leaderElection.enabled -}}
{{- if eq (include "dlq-bridge.automountToken" .) "false" -}}
{{- fail "leaderElection.enabled needs the ServiceAccount token: serviceAccount.automountToken=false leaves serve no way to reach the Lease" -}}
{{- end -}}
{{- if eq (include "dlq-bridge.serviceAccountName" .) "default" -}}
{{- fail "leaderElection.enabled with serviceAccount.create=false needs serviceAccount.name: the Lease Role would be bound to the namespace's default ServiceAccount" -}}
{{- end -}}
{{- if regexMatch "^((0|1)(\\.[0-9]+)?s|[0-9.]+(ns|us|µs|ms))$" .Values.leaderElection.leaseDuration -}}
{{- fail (printf "leaderElection.leaseDuration %s: must be at least 2s (serve renews at a third of it)" .Values.leaderElection.leaseDuration) -}}
{{- end -}}
{{- end -}}
{{- with (default (dict) .Values.config.redrive).journal -}}
{{- if include "dlq-bridge.perPodDataDir" $ -}}
{{- fail (printf "config.redrive.journal (%s): each pod keeps its journal in its own directory on the shared claim (mountPath/POD_NAME); a path set here would be one file for every pod. Leave it unset" .) -}}
{{- end -}}
{{- if not (hasPrefix (printf "%s/" (trimSuffix "/" $.Values.persistence.mountPath)) .) -}}
{{- fail (printf "config.redrive.journal (%s) is outside persistence.mountPath (%s): the root filesystem is read-only. Leave it unset (mountPath/journal.jsonl)" . $.Values.persistence.mountPath) -}}
{{- end -}}
{{- end -}}
{{- if and (eq .Values.mode "deployment") (gt (int .Values.replicaCount) 1) (eq .Values.persistence.type "pvc") (not .Values.persistence.pvc.existingClaim) (not (has "ReadWriteMany" .Values.persistence.pvc.accessModes)) -}}
{{- fail "replicaCount > 1 with persistence.type=pvc shares one claim between the pods: persistence.pvc.accessModes needs ReadWriteMany (a ReadWriteOnce claim attaches to one node, and a replica scheduled on another never starts)" -}}
{{- end -}}
{{- /* The chart cannot see how many pods carry the sidecar, nor where they run: even one replica has two pods during a rolling update. */ -}}
{{- if and (eq .Values.mode "sidecar") (eq .Values.persistence.type "pvc") (not .Values.persistence.pvc.existingClaim) (not (has "ReadWriteMany" .Values.persistence.pvc.accessModes)) -}}
{{- fail "mode=sidecar with persistence.type=pvc mounts the chart's claim in every pod that carries the sidecar: set persistence.pvc.accessModes to [ReadWriteMany] (a ReadWriteOnce claim attaches to one node, and a pod scheduled on another never starts), or persistence.pvc.existingClaim (a claim you made for these pods), or persistence.type=emptyDir" -}}
{{- end -}}
{{- $owned := dict "listen" "service.port and service.listenAddress" "token_env" "auth.existingSecret, auth.token or auth.generate (the token reaches serve as DLQ_BRIDGE_API_TOKEN)" "data_dir" "persistence.mountPath" "leader_election" "leaderElection.enabled, leaderElection.leaseName and leaderElection.leaseDuration" -}}
{{- range $key, $use := $owned -}}
{{- if hasKey (default (dict) $.Values.config.serve) $key -}}
{{- fail (printf "config.serve.%s is set by the chart (it would be overwritten): remove it and use %s" $key $use) -}}
{{- end -}}
{{- end -}}
{{- /* A Slack webhook URL is a credential in itself, and a ConfigMap is no place for one. */ -}}
{{- range $i, $sink := (default (dict) .Values.config.alerts).sinks -}}
{{- if and (kindIs "map" $sink) (kindIs "map" $sink.slack) $sink.slack.url -}}
{{- fail (printf "config.alerts.sinks[%d].slack.url: a Slack webhook URL is a secret and would be rendered into the ConfigMap. Use slack.url_env (e.g. SLACK_WEBHOOK_URL) and fill that variable from a Secret: secretEnv or envFromSecrets (an existing Secret), or secretValues (a Secret the chart makes)" $i) -}}
{{- end -}}
{{- end -}}
{{- with (default (dict) .Values.config.serve).shutdown_grace -}}
{{- $m := regexFindAll "^([0-9]+)(s|m)$" (toString .) 1 -}}
{{- if and $m (eq $.Values.mode "deployment") -}}
{{- $n := int (regexReplaceAll "[sm]$" (toString .) "") -}}
{{- $seconds := ternary (mul $n 60) $n (hasSuffix "m" (toString .)) -}}
{{- if gt (add $seconds 5) (int $.Values.terminationGracePeriodSeconds) -}}
{{- fail (printf "config.serve.shutdown_grace (%s) needs terminationGracePeriodSeconds (%d) at least 5 s longer: the kubelet kills the pod at the end of its grace period, mid-drain" (toString .) (int $.Values.terminationGracePeriodSeconds)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $names := dict -}}
{{- range .Values.config.queues -}}
{{- if hasKey $names .name -}}
{{- fail (printf "config.queues: duplicate queue name %q" .name) -}}
{{- end -}}
{{- $_ := set $names .name true -}}
{{- end -}}
{{- end -}}
