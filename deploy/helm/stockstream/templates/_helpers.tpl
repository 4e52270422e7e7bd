{{/* Names, labels and the checks every template relies on. */}}

{{- define "stockstream.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "stockstream.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of one component: pass (list $ "worker"). */}}
{{- define "stockstream.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ $root.Chart.Name }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "stockstream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "stockstream.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "stockstream.image" -}}
{{- $repository := required "image.repository is required: ghcr.io/<owner>/stockstream, the image the CI workflow pushes" .Values.image.repository -}}
{{- printf "%s:%s" $repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "stockstream.secretsDir" -}}/run/secrets/stockstream{{- end -}}

{{/*
Every setting both pods read, as a dict: the chart's own first, then .Values.config, which may
not redefine them (one place per setting). Rendering fails on values that cannot work.
*/}}
{{- define "stockstream.settings" -}}
{{- $v := .Values -}}
{{- if gt (int $v.worker.replicas) (int $v.kafka.partitions) -}}
{{- fail (printf "worker.replicas (%d) must not exceed kafka.partitions (%d): a worker beyond the partition count owns no partition and only adds rebalances" (int $v.worker.replicas) (int $v.kafka.partitions)) -}}
{{- end -}}
{{- if and $v.archive.enabled (not $v.objectStore.endpoint) -}}
{{- fail "objectStore.endpoint is required while archive.enabled: a pod's local archive folder is an emptyDir and vanishes with the pod" -}}
{{- end -}}
{{- if and (eq $v.warehouse.backend "bigquery") (not $v.warehouse.bqProject) -}}
{{- fail "warehouse.bqProject is required with warehouse.backend=bigquery" -}}
{{- end -}}
{{- if and (or $v.secrets.files $v.secrets.paths) (not (or $v.secrets.existingSecret $v.secrets.secretProviderClass)) -}}
{{- fail (printf "secrets.existingSecret (or secrets.secretProviderClass) is required: secrets.files and secrets.paths read %s from it" (concat (keys $v.secrets.files) (keys $v.secrets.paths) | sortAlpha | join ", ")) -}}
{{- end -}}
{{- if and (eq $v.environment "prod") (not (hasKey $v.secrets.files "STOCKSTREAM_WEB_TOKEN")) -}}
{{- fail "secrets.files.STOCKSTREAM_WEB_TOKEN is required with environment=prod: the web view listens on the pod's interfaces, which prod allows only with a token" -}}
{{- end -}}
{{- if and (has $v.producer.source (list "finnhub" "finnhub-ws")) $v.producer.enabled (not (hasKey $v.secrets.files "FINNHUB_API_KEY")) -}}
{{- fail (printf "secrets.files.FINNHUB_API_KEY is required with producer.source=%s" $v.producer.source) -}}
{{- end -}}
{{- $s := dict
  "STOCKSTREAM_ENV" $v.environment
  "KAFKA_BOOTSTRAP_SERVERS" (required "kafka.bootstrapServers is required: the existing Kafka cluster, host:port[,host:port...]" $v.kafka.bootstrapServers)
  "KAFKA_PARTITIONS" (toString (int $v.kafka.partitions))
  "KAFKA_SECURITY_PROTOCOL" $v.kafka.securityProtocol
  "ARCHIVE_ENABLED" (toString $v.archive.enabled)
  "WAREHOUSE_ENABLED" (toString (ne $v.warehouse.backend "disabled"))
  "STOCKSTREAM_WEB_HOST" "0.0.0.0"
  "STOCKSTREAM_WEB_PORT" (toString (int $v.service.port))
  "PRODUCER_METRICS_HOST" "0.0.0.0"
  "PRODUCER_METRICS_PORT" (toString (int $v.producer.metricsPort))
  "PRODUCER_SPOOL_DIR" "/var/lib/stockstream/spool"
-}}
{{- if $v.objectStore.endpoint -}}
{{- $_ := set $s "S3_ENDPOINT" $v.objectStore.endpoint -}}
{{- $_ := set $s "S3_BUCKET" $v.objectStore.bucket -}}
{{- $_ := set $s "S3_REGION" $v.objectStore.region -}}
{{- $_ := set $s "S3_SECURE" (toString $v.objectStore.secure) -}}
{{- end -}}
{{- if eq $v.warehouse.backend "bigquery" -}}
{{- $_ := set $s "WAREHOUSE_BACKEND" "bigquery" -}}
{{- $_ := set $s "BQ_PROJECT" $v.warehouse.bqProject -}}
{{- $_ := set $s "BQ_DATASET" $v.warehouse.bqDataset -}}
{{- end -}}
{{- range $name, $key := $v.secrets.files -}}
{{- $_ := set $s (printf "%s_FILE" $name) (printf "%s/%s" (include "stockstream.secretsDir" $) $key) -}}
{{- end -}}
{{- range $name, $key := $v.secrets.paths -}}
{{- $_ := set $s $name (printf "%s/%s" (include "stockstream.secretsDir" $) $key) -}}
{{- end -}}
{{- range $name, $value := $v.config -}}
{{- if hasKey $s $name -}}
{{- fail (printf "config.%s: set by the chart from its own value (see values.yaml)" $name) -}}
{{- end -}}
{{- $_ := set $s $name (toString $value) -}}
{{- end -}}
{{- toYaml $s -}}
{{- end -}}

{{/* The volume with the secrets' files, when there are any. */}}
{{- define "stockstream.secretsVolume" -}}
{{- if or .Values.secrets.files .Values.secrets.paths }}
- name: secrets
{{- if .Values.secrets.existingSecret }}
  secret:
    secretName: {{ .Values.secrets.existingSecret }}
    defaultMode: 0440
{{- else }}
  csi:
    driver: secrets-store.csi.k8s.io
    readOnly: true
    volumeAttributes:
      secretProviderClass: {{ .Values.secrets.secretProviderClass }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "stockstream.secretsMount" -}}
{{- if or .Values.secrets.files .Values.secrets.paths }}
- name: secrets
  mountPath: {{ include "stockstream.secretsDir" . }}
  readOnly: true
{{- end }}
{{- end -}}
