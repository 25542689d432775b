{{/*
Names. The RayCluster takes the full name, and KubeRay limits RayCluster names to 53 characters
(DNS-1035) and RayJob names to 47, so the full name is kept to 40 and job names are checked.
*/}}
{{- define "metaplatform.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "metaplatform.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "metaplatform.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "metaplatform.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: metaplatform
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "metaplatform.selectorLabels" -}}
app.kubernetes.io/name: {{ include "metaplatform.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "metaplatform.image" -}}
{{ printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end }}

{{/*
A value for a Secret the chart generates (generateSecrets): the one already in the cluster (so
upgrades keep it), else a new random one. (`helm template` has no cluster: it always makes a new
one, which is why generateSecrets is off by default.)
Call with (dict "ctx" $ "name" <secret name> "key" <key> "length" <n>).
*/}}
{{- define "metaplatform.generatedSecretValue" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .name }}
{{- if and $existing (hasKey $existing.data .key) }}
{{- index $existing.data .key | b64dec }}
{{- else }}
{{- randAlphaNum (int .length) }}
{{- end }}
{{- end }}

{{/*
Stops rendering when a Secret the chart needs is neither named by its existingSecret value nor to
be generated (generateSecrets=true), naming each value to set.
*/}}
{{- define "metaplatform.checkSecrets" -}}
{{- if not .Values.generateSecrets }}
{{- $missing := list }}
{{- if not .Values.ray.auth.existingSecret }}
{{- $missing = append $missing "ray.auth.existingSecret (key auth_token)" }}
{{- end }}
{{- if and (include "metaplatform.bundledPostgres" .) (not .Values.postgresql.existingSecret) }}
{{- $missing = append $missing "postgresql.existingSecret (key password)" }}
{{- end }}
{{- if and .Values.mlflow.enabled .Values.mlflow.auth.enabled }}
{{- if not .Values.mlflow.auth.existingSecret }}
{{- $missing = append $missing "mlflow.auth.existingSecret (keys username, password)" }}
{{- end }}
{{- if not .Values.mlflow.auth.existingServerSecret }}
{{- $missing = append $missing "mlflow.auth.existingServerSecret (key flask-secret-key)" }}
{{- end }}
{{- end }}
{{- with $missing }}
{{- fail (printf "secrets: no Secret named for %s. Create them and set these values, or set generateSecrets=true to let the chart make them at helm install (never with helm template or Argo CD: they would change on every render); see docs/deploy.md" (join ", " .)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* A string quoted for a POSIX shell: RayJob entrypoints run through `sh -c`. */}}
{{- define "metaplatform.shellQuote" -}}
'{{ . | toString | replace "'" "'\\''" }}'
{{- end }}

{{- define "metaplatform.rayAuthSecret" -}}
{{- default (printf "%s-ray-auth" (include "metaplatform.fullname" .)) .Values.ray.auth.existingSecret }}
{{- end }}

{{- define "metaplatform.mlflowName" -}}
{{ include "metaplatform.fullname" . }}-mlflow
{{- end }}

{{- define "metaplatform.mlflowAuthSecret" -}}
{{- default (printf "%s-mlflow-auth" (include "metaplatform.fullname" .)) .Values.mlflow.auth.existingSecret }}
{{- end }}

{{- define "metaplatform.mlflowServerSecret" -}}
{{- default (printf "%s-server" (include "metaplatform.mlflowName" .)) .Values.mlflow.auth.existingServerSecret }}
{{- end }}

{{- define "metaplatform.postgresName" -}}
{{ include "metaplatform.fullname" . }}-postgresql
{{- end }}

{{- define "metaplatform.postgresSecret" -}}
{{- default (include "metaplatform.postgresName" .) .Values.postgresql.existingSecret }}
{{- end }}

{{- define "metaplatform.spoolClaim" -}}
{{- default (printf "%s-mlflow-spool" (include "metaplatform.fullname" .)) .Values.spool.existingClaim }}
{{- end }}

{{- define "metaplatform.bundledPostgres" -}}
{{- if and .Values.mlflow.enabled (not .Values.mlflow.backendStore.existingSecret) }}true{{ end }}
{{- end }}

{{/* The tracking URI the Ray pods get (MLFLOW_TRACKING_URI); empty when there is none. */}}
{{- define "metaplatform.trackingUri" -}}
{{- if .Values.mlflow.enabled }}
{{- printf "http://%s.%s.svc:%d" (include "metaplatform.mlflowName" .) .Release.Namespace (int .Values.mlflow.port) }}
{{- else }}
{{- .Values.mlflow.externalUri }}
{{- end }}
{{- end }}

{{/* Environment of every Ray container: tracking, S3, HOME on the writable /tmp, user's extras. */}}
{{- define "metaplatform.rayEnv" -}}
- name: HOME
  value: /tmp
# Read by Ray's job supervisor: how long a stopped job's driver has before SIGKILL.
- name: RAY_JOB_STOP_WAIT_TIME_S
  value: {{ .Values.ray.jobStopWaitSeconds | quote }}
{{- with (include "metaplatform.trackingUri" .) }}
- name: MLFLOW_TRACKING_URI
  value: {{ . | quote }}
{{- end }}
{{- if and .Values.mlflow.enabled .Values.mlflow.auth.enabled }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ include "metaplatform.mlflowAuthSecret" . }}
      key: username
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "metaplatform.mlflowAuthSecret" . }}
      key: password
{{- end }}
{{ include "metaplatform.s3Env" . }}
{{- with .Values.ray.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "metaplatform.s3Env" -}}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.s3.region | quote }}
{{- with .Values.s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: AWS_SECRET_ACCESS_KEY
{{- end }}
{{- end }}

{{/* Labels of the Ray pods (head, workers, job clusters): the PodMonitors and NetworkPolicies select them. */}}
{{- define "metaplatform.rayPodLabels" -}}
{{ include "metaplatform.selectorLabels" . }}
app.kubernetes.io/component: ray
{{- end }}

{{/*
The spec of a RayCluster: the chart's own, that of every `cluster: own` RayJob, and the serving one.
Call with (dict "ctx" $ "workerGroups" <list> "drivers" <bool>); `drivers`: job drivers run on its
head, which then mounts the MLflow spool volume (values: spool).
*/}}
{{- define "metaplatform.rayClusterSpec" -}}
{{- $ := .ctx }}
{{- $v := $.Values -}}
{{- $spool := and .drivers $v.spool.enabled -}}
rayVersion: {{ $v.ray.version | quote }}
authOptions:
  mode: token
  secretName: {{ include "metaplatform.rayAuthSecret" $ }}
enableInTreeAutoscaling: {{ $v.ray.autoscaler.enabled }}
{{- if $v.ray.autoscaler.enabled }}
autoscalerOptions:
  upscalingMode: {{ $v.ray.autoscaler.upscalingMode }}
  idleTimeoutSeconds: {{ $v.ray.autoscaler.idleTimeoutSeconds }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  resources:
    {{- toYaml $v.ray.autoscaler.resources | nindent 4 }}
  env:
    - name: HOME
      value: /tmp
  # The head pod's service-account token, for this container alone (the pod mounts none).
  volumeMounts:
    - {name: kube-api-access, mountPath: /var/run/secrets/kubernetes.io/serviceaccount, readOnly: true}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
{{- end }}
headGroupSpec:
  serviceType: {{ $v.ray.head.serviceType }}
  rayStartParams:
    dashboard-host: "0.0.0.0"
    metrics-export-port: {{ $v.ray.metricsPort | quote }}
    {{- range $key, $value := $v.ray.head.rayStartParams }}
    {{ $key }}: {{ $value | toString | quote }}
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "metaplatform.rayPodLabels" $ | nindent 8 }}
        metaplatform.io/ray-node: head
    spec:
      # The job drivers run in ray-head: no Kubernetes API token there. The autoscaler sidecar,
      # which scales the worker groups through the API, mounts the token itself.
      automountServiceAccountToken: false
      # The preStop hook's wait for the drivers, and some to spare for Ray's own shutdown.
      terminationGracePeriodSeconds: {{ add $v.ray.jobStopWaitSeconds 30 }}
      securityContext:
        {{- toYaml $v.podSecurityContext | nindent 8 }}
      {{- with $v.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.ray.head.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.ray.head.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.ray.head.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-head
          image: {{ include "metaplatform.image" $ }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          ports:
            - {name: gcs-server, containerPort: 6379}
            - {name: dashboard, containerPort: 8265}
            - {name: client, containerPort: 10001}
            - {name: metrics, containerPort: {{ $v.ray.metricsPort }}}
            - {name: as-metrics, containerPort: 44217}
            - {name: dash-metrics, containerPort: 44227}
            - {name: driver-metrics, containerPort: {{ $v.ray.driverMetricsPort }}}
          env:
            {{- include "metaplatform.rayEnv" $ | nindent 12 }}
            {{- if $spool }}
            # Where the drivers in this pod keep MLflow records not yet delivered (S3 checkpoints).
            - name: METAPLATFORM_SPOOL
              value: {{ $v.spool.mountPath | quote }}
            {{- end }}
          resources:
            {{- toYaml $v.ray.head.resources | nindent 12 }}
          securityContext:
            {{- toYaml $v.securityContext | nindent 12 }}
          # KubeRay deletes the head pod (activeDeadlineSeconds, a RayJob retry, an upgrade, the
          # end of a job's cluster) without stopping its jobs: stop them here, so each driver
          # checkpoints within ray.jobStopWaitSeconds, before the pod goes.
          lifecycle:
            preStop:
              exec:
                command:
                  - python
                  - -c
                  - |
                    {{- include "metaplatform.stopJobs" $ | nindent 20 }}
          volumeMounts:
            - {name: tmp, mountPath: /tmp}
            {{- if $spool }}
            - {name: mlflow-spool, mountPath: {{ $v.spool.mountPath | quote }}}
            {{- end }}
      volumes:
        - {name: tmp, emptyDir: {}}
        {{- if $spool }}
        - name: mlflow-spool
          persistentVolumeClaim:
            claimName: {{ include "metaplatform.spoolClaim" $ }}
        {{- end }}
        {{- if $v.ray.autoscaler.enabled }}
        # What automountServiceAccountToken would mount, for the autoscaler container only.
        - name: kube-api-access
          projected:
            defaultMode: 420
            sources:
              - serviceAccountToken: {path: token, expirationSeconds: 3607}
              - configMap:
                  name: kube-root-ca.crt
                  items: [{key: ca.crt, path: ca.crt}]
              - downwardAPI:
                  items:
                    - path: namespace
                      fieldRef: {apiVersion: v1, fieldPath: metadata.namespace}
        {{- end }}
workerGroupSpecs:
{{- if not .workerGroups }} []{{ end }}
{{- range .workerGroups }}
  - groupName: {{ .name }}
    replicas: {{ .replicas }}
    minReplicas: {{ .minReplicas }}
    maxReplicas: {{ .maxReplicas }}
    rayStartParams:
      metrics-export-port: {{ $v.ray.metricsPort | quote }}
      {{- range $key, $value := .rayStartParams }}
      {{ $key }}: {{ $value | toString | quote }}
      {{- end }}
    template:
      metadata:
        labels:
          {{- include "metaplatform.rayPodLabels" $ | nindent 10 }}
          metaplatform.io/ray-node: worker
      spec:
        # Workers never talk to the Kubernetes API.
        automountServiceAccountToken: false
        securityContext:
          {{- toYaml $v.podSecurityContext | nindent 10 }}
        {{- with $v.imagePullSecrets }}
        imagePullSecrets:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with .nodeSelector }}
        nodeSelector:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with .tolerations }}
        tolerations:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with .affinity }}
        affinity:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        containers:
          - name: ray-worker
            image: {{ include "metaplatform.image" $ }}
            imagePullPolicy: {{ $v.image.pullPolicy }}
            ports:
              - {name: metrics, containerPort: {{ $v.ray.metricsPort }}}
            env:
              {{- include "metaplatform.rayEnv" $ | nindent 14 }}
            resources:
              {{- $resources := deepCopy (default dict .resources) }}
              {{- if .gpus }}
              {{- $limits := merge (dict "nvidia.com/gpu" (int .gpus)) (default dict $resources.limits) }}
              {{- $_ := set $resources "limits" $limits }}
              {{- end }}
              {{- toYaml $resources | nindent 14 }}
            securityContext:
              {{- toYaml $v.securityContext | nindent 14 }}
            volumeMounts:
              - {name: tmp, mountPath: /tmp}
        volumes:
          - {name: tmp, emptyDir: {}}
{{- end }}
{{- end }}

{{/*
The head's preStop hook: stop every running job through the job API and wait until each has
ended (up to RAY_JOB_STOP_WAIT_TIME_S and 10 s more). KubeRay gives the container the token.
*/}}
{{- define "metaplatform.stopJobs" -}}
import os, time
if os.environ.get("RAY_AUTH_TOKEN"):
    os.environ.setdefault("RAY_AUTH_MODE", "token")
from ray.job_submission import JobSubmissionClient
client = JobSubmissionClient("http://127.0.0.1:8265")
running = [j.submission_id for j in client.list_jobs() if j.submission_id and not j.status.is_terminal()]
for job in running:
    client.stop_job(job)
deadline = time.monotonic() + int(os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", "3")) + 10
while running and time.monotonic() < deadline:
    time.sleep(1)
    running = [job for job in running if not client.get_job_status(job).is_terminal()]
print(f"stopped the running jobs; {len(running)} still running")
{{- end }}

{{/*
NetworkPolicy `to` peers for CIDRs, the cloud metadata endpoint cut out of each one that holds it
unless networkPolicy.egress.allowMetadataEndpoint. Call with (dict "ctx" $ "key" <values key>
"cidrs" <list>).
*/}}
{{- define "metaplatform.cidrPeers" -}}
{{- $allow := .ctx.Values.networkPolicy.egress.allowMetadataEndpoint }}
{{- range .cidrs }}
{{- $cut := and (not $allow) (include "metaplatform.holdsMetadata" .) }}
{{- if and $cut (eq . "169.254.169.254/32") }}
{{- fail (printf "%s: %s is the cloud metadata endpoint; allow it with networkPolicy.egress.allowMetadataEndpoint=true" $.key .) }}
{{- end }}
- ipBlock:
    cidr: {{ . | quote }}
    {{- if $cut }}
    except: ["169.254.169.254/32"]
    {{- end }}
{{- end }}
{{- end }}

{{/* NetworkPolicy ports, TCP, from a list of numbers. */}}
{{- define "metaplatform.tcpPorts" -}}
{{- range . }}
- {port: {{ . }}, protocol: TCP}
{{- end }}
{{- end }}

{{/* "true" when an IPv4 CIDR holds 169.254.169.254 (2852039166 as a number). */}}
{{- define "metaplatform.holdsMetadata" -}}
{{- if not (contains ":" .) }}
{{- $parts := splitList "/" . }}
{{- $ip := 0 }}
{{- range splitList "." (first $parts) }}
{{- $ip = add (mul $ip 256) (atoi .) }}
{{- end }}
{{- $block := 1 }}
{{- range until (sub 32 (atoi (last $parts)) | int) }}
{{- $block = mul $block 2 }}
{{- end }}
{{- if eq (div $ip $block) (div 2852039166 $block) }}true{{ end }}
{{- end }}
{{- end }}

{{/* Environment of the MLflow server and its migration steps: the backend store URI, S3. */}}
{{- define "metaplatform.mlflowEnv" -}}
- name: HOME
  value: /tmp
{{- if include "metaplatform.bundledPostgres" . }}
- name: POSTGRES_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "metaplatform.postgresSecret" . }}
      key: password
- name: MLFLOW_BACKEND_STORE_URI
  value: {{ printf "postgresql://%s:$(POSTGRES_PASSWORD)@%s:5432/%s" .Values.postgresql.username (include "metaplatform.postgresName" .) .Values.postgresql.database | quote }}
{{- else }}
- name: MLFLOW_BACKEND_STORE_URI
  valueFrom:
    secretKeyRef:
      name: {{ .Values.mlflow.backendStore.existingSecret }}
      key: {{ .Values.mlflow.backendStore.existingSecretKey }}
{{- end }}
{{- with .Values.s3.endpoint }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{ include "metaplatform.s3Env" . }}
# The server's background job runner (GenAI features) is not used here; it is a third process.
- name: MLFLOW_SERVER_ENABLE_JOB_EXECUTION
  value: "false"
{{- with .Values.mlflow.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
