{{/* Chart name, truncated to the 63 characters DNS labels allow. */}}
{{- define "arbiter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the release name, or release-chart when the release name does not
contain the chart name. Pod names add "-N" and the headless Service "-peers",
so keep it short enough for both.
*/}}
{{- define "arbiter.fullname" -}}
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

{{/* The headless Service that gives each pod its stable peer DNS name. */}}
{{- define "arbiter.peersService" -}}
{{- printf "%s-peers" (include "arbiter.fullname" .) }}
{{- end }}

{{/*
The peer address pattern `arbiter serve --peers-dns` expands, {} being the pod
ordinal: <pod>.<headless service>.<namespace>.svc.<domain>:<peer port>.
*/}}
{{- define "arbiter.peersDns" -}}
{{- printf "%s-{}.%s.%s.svc.%s:%d" (include "arbiter.fullname" .) (include "arbiter.peersService" .) .Release.Namespace .Values.clusterDomain (int .Values.ports.peer) }}
{{- end }}

{{- define "arbiter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "arbiter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "arbiter.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "arbiter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "arbiter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "arbiter.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The Secrets mounted into the pod, by volume name: the TLS Secrets and the
auth file's.
*/}}
{{- define "arbiter.secretVolumes" -}}
{{- if .Values.tls.client.secretName }}
tls-client:
  secretName: {{ .Values.tls.client.secretName }}
  path: /tls/client
{{- end }}
{{- if ne (include "arbiter.peerTlsMode" .) "none" }}
tls-peer:
  secretName: {{ include "arbiter.peerTlsSecret" . }}
  path: /tls/peer
{{- end }}
{{- if and .Values.tls.client.secretName .Values.tls.client.verifyClients .Values.tls.client.probeSecretName (not .Values.tls.client.allowTokenClients) }}
tls-probe:
  secretName: {{ .Values.tls.client.probeSecretName }}
  path: /tls/probe
{{- end }}
{{- if .Values.tls.metrics.secretName }}
tls-metrics:
  secretName: {{ .Values.tls.metrics.secretName }}
  path: /tls/metrics
{{- end }}
{{- if .Values.auth.secretName }}
auth:
  secretName: {{ .Values.auth.secretName }}
  path: /auth
{{- end }}
{{- end }}

{{/*
A probe of the health service named "service": kubelet's gRPC probe on a
plaintext client port; with client TLS (which kubelet's gRPC probe cannot
speak) `arbiter health` run in the pod, trusting the Secret's ca.crt, and
presenting a client certificate when the port requires one.
*/}}
{{- define "arbiter.probe" -}}
{{- $v := .root.Values -}}
{{- if $v.tls.client.secretName }}
exec:
  command:
    - arbiter
    - health
    - --server
    - "https://127.0.0.1:{{ $v.ports.client }}"
    - --tls-ca
    - /tls/client/ca.crt
    - --tls-server-name
    - {{ $v.tls.client.serverName | quote }}
    {{- if and $v.tls.client.verifyClients (not $v.tls.client.allowTokenClients) }}
    {{- $dir := ternary "/tls/probe" "/tls/client" (ne $v.tls.client.probeSecretName "") }}
    - --tls-cert
    - {{ $dir }}/tls.crt
    - --tls-key
    - {{ $dir }}/tls.key
    {{- end }}
    - --service
    - {{ .service | quote }}
{{- else }}
grpc:
  port: {{ $v.ports.client }}
  service: {{ .service | quote }}
{{- end }}
{{- end }}

{{/*
The ConfigMap holding the named limits, or "" when there are none.
*/}}
{{- define "arbiter.limitsConfigMap" -}}
{{- if .Values.limits.existingConfigMap -}}
{{- .Values.limits.existingConfigMap -}}
{{- else if .Values.limits.files -}}
{{- include "arbiter.fullname" . }}-limits
{{- end -}}
{{- end }}

{{/*
Where the peer certificates come from: generate, secret, certManager or none
(a set tls.peer.secretName means secret).
*/}}
{{- define "arbiter.peerTlsMode" -}}
{{- if .Values.tls.peer.secretName -}}
secret
{{- else -}}
{{- .Values.tls.peer.mode -}}
{{- end -}}
{{- end }}

{{/* The Secret holding the peer certificates. */}}
{{- define "arbiter.peerTlsSecret" -}}
{{- if .Values.tls.peer.secretName -}}
{{- .Values.tls.peer.secretName -}}
{{- else -}}
{{- include "arbiter.fullname" . }}-peer-tls
{{- end -}}
{{- end }}

{{/* A member's peer host name: <pod>.<headless service>.<namespace>.svc.<domain>. */}}
{{- define "arbiter.peerHost" -}}
{{- printf "%s-%d.%s.%s.svc.%s" (include "arbiter.fullname" .root) (int .ordinal) (include "arbiter.peersService" .root) .root.Release.Namespace .root.Values.clusterDomain }}
{{- end }}
