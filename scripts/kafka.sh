#!/usr/bin/env bash
# Provision and run a real single-node Apache Kafka 4.x broker (KRaft, combined
# broker+controller) on 127.0.0.1 for local runs and tests.
#
# Usage: scripts/kafka.sh {fetch|start|stop|status|reset|logs}
#
#   fetch   resolve the broker jars from Maven Central (kafka/pom.xml) into $KAFKA_LIBS_DIR
#   start   fetch if needed, format storage once, start in the background, wait until
#           the broker answers Kafka ApiVersions, print the bootstrap address (idempotent)
#   stop    SIGTERM, wait up to 30 s, then SIGKILL
#   status  exit 0 and print the bootstrap address if running, exit 1 otherwise
#   reset   stop and delete this port's data dir (the jars are kept)
#   logs    tail -F the broker log
#
# Environment:
#   KAFKA_PORT             PLAINTEXT port (default 9092)
#   KAFKA_CONTROLLER_PORT  KRaft controller port (default KAFKA_PORT+1000)
#   KAFKA_DIR              state dir (default <repo>/.local/kafka)
#   KAFKA_HEAP             JVM heap flags (default "-Xms256m -Xmx512m")
#   KAFKA_START_TIMEOUT    seconds to wait for the broker to answer (default 60)
#   KAFKA_LIBS_DIR         where the jars go (default $KAFKA_DIR/libs; share it between dirs)
#
# Security (off by default: then the broker has its PLAINTEXT listener only, as always).
# KAFKA_SECURITY adds listeners beside PLAINTEXT (which stays for the broker's own use, the
# readiness probe and tools), comma-separated:
#   sasl      SASL_PLAINTEXT on KAFKA_SASL_PORT (default KAFKA_PORT+1)
#   ssl       SSL on KAFKA_SSL_PORT (default KAFKA_PORT+2), client certificate required
#   sasl_ssl  SASL_SSL on KAFKA_SASL_SSL_PORT (default KAFKA_PORT+3), server TLS only
#   all       all three
# SASL listeners accept SCRAM-SHA-512, SCRAM-SHA-256 and PLAIN for the users of
#   KAFKA_SASL_USERS       user:password[,user:password ...] (no ',' or ':' in either;
#                          default stockstream:stockstream-secret)
# SCRAM users are written into the storage when it is formatted (StorageTool --add-scram), or
# set through the PLAINTEXT listener after start when the list changed since; PLAIN users live
# in the generated properties (mode 600). A running broker keeps the listeners it was started
# with: `stop` it to change KAFKA_SECURITY.
# TLS material is generated once with openssl into $KAFKA_DIR/tls-$PORT/: ca.pem (the CA
# clients trust: KAFKA_SSL_CAFILE), broker.pem (PEM keystore: key + certificate for 127.0.0.1
# and localhost), client.pem + client.key (a client certificate for the ssl listener:
# KAFKA_SSL_CERTFILE, KAFKA_SSL_KEYFILE). `start` prints one bootstrap address per listener:
#   KAFKA_SECURITY=sasl scripts/kafka.sh start  ->  127.0.0.1:9092 and SASL_PLAINTEXT://127.0.0.1:9093
#
# Everything that depends on the port is per port, so e.g. a test broker on 19092
# can run next to a dev broker on 9092:
#   $KAFKA_DIR/data-$PORT/              log.dirs (KRaft metadata + topic data)
#   $KAFKA_DIR/server-$PORT.properties  regenerated on every start
#   $KAFKA_DIR/broker-$PORT.pid         pid of the java process
#   $KAFKA_DIR/broker-$PORT.log         broker log (log4j2, rolled at 20 MB)
#   $KAFKA_DIR/broker-$PORT.out         JVM stdout/stderr (crashes, early errors)
#   $KAFKA_DIR/tls-$PORT/               CA, broker and client certificates (KAFKA_SECURITY)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$SCRIPT_DIR")"

KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1000))}"
KAFKA_DIR="${KAFKA_DIR:-$REPO_ROOT/.local/kafka}"
[[ "$KAFKA_DIR" == /* ]] || KAFKA_DIR="$PWD/$KAFKA_DIR"
KAFKA_HEAP="${KAFKA_HEAP:--Xms256m -Xmx512m}"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-60}"
KAFKA_SECURITY="${KAFKA_SECURITY:-}"
KAFKA_SASL_PORT="${KAFKA_SASL_PORT:-$((KAFKA_PORT + 1))}"
KAFKA_SSL_PORT="${KAFKA_SSL_PORT:-$((KAFKA_PORT + 2))}"
KAFKA_SASL_SSL_PORT="${KAFKA_SASL_SSL_PORT:-$((KAFKA_PORT + 3))}"
KAFKA_SASL_USERS="${KAFKA_SASL_USERS:-stockstream:stockstream-secret}"

HOST=127.0.0.1
BOOTSTRAP="$HOST:$KAFKA_PORT"
POM="$REPO_ROOT/kafka/pom.xml"
LOG4J_CONFIG="$REPO_ROOT/kafka/log4j2.properties"
LIBS_DIR="${KAFKA_LIBS_DIR:-$KAFKA_DIR/libs}"
[[ "$LIBS_DIR" == /* ]] || LIBS_DIR="$PWD/$LIBS_DIR"
# The fetch's lock, log and temporary dir sit beside the jars (= in $KAFKA_DIR by default).
LIBS_PARENT="$(dirname "$LIBS_DIR")"
POM_HASH_FILE="$LIBS_DIR/.pom.sha256"
DATA_DIR="$KAFKA_DIR/data-$KAFKA_PORT"
PROPS_FILE="$KAFKA_DIR/server-$KAFKA_PORT.properties"
PID_FILE="$KAFKA_DIR/broker-$KAFKA_PORT.pid"
LOG_FILE="$KAFKA_DIR/broker-$KAFKA_PORT.log"
OUT_FILE="$KAFKA_DIR/broker-$KAFKA_PORT.out"
TLS_DIR="$KAFKA_DIR/tls-$KAFKA_PORT"
SCRAM_MARKER="$DATA_DIR/stockstream-scram-users.sha256"
STOP_TIMEOUT=30

log() { echo "kafka.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

for v in KAFKA_PORT KAFKA_CONTROLLER_PORT KAFKA_START_TIMEOUT; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a number, got '${!v}'"
done
[[ "$KAFKA_PORT" != "$KAFKA_CONTROLLER_PORT" ]] || die "KAFKA_PORT and KAFKA_CONTROLLER_PORT must differ"

# ---------------------------------------------------------------- security options

SEC_SASL=0 SEC_SSL=0 SEC_SASL_SSL=0
IFS=', ' read -r -a _security_modes <<<"$KAFKA_SECURITY"
for _mode in "${_security_modes[@]}"; do
  case "${_mode,,}" in
    "" | none | plaintext) ;;
    sasl | sasl_plaintext) SEC_SASL=1 ;;
    ssl | tls) SEC_SSL=1 ;;
    sasl_ssl) SEC_SASL_SSL=1 ;;
    all) SEC_SASL=1 SEC_SSL=1 SEC_SASL_SSL=1 ;;
    *) die "KAFKA_SECURITY: unknown mode '$_mode' (sasl, ssl, sasl_ssl, all)" ;;
  esac
done
SEC_ANY_SASL=$((SEC_SASL || SEC_SASL_SSL))
SEC_ANY_TLS=$((SEC_SSL || SEC_SASL_SSL))

# "NAME:PORT" of each extra listener that is on.
extra_listeners() {
  ((SEC_SASL)) && echo "SASL_PLAINTEXT:$KAFKA_SASL_PORT"
  ((SEC_SSL)) && echo "SSL:$KAFKA_SSL_PORT"
  ((SEC_SASL_SSL)) && echo "SASL_SSL:$KAFKA_SASL_SSL_PORT"
  return 0
}

for v in KAFKA_SASL_PORT KAFKA_SSL_PORT KAFKA_SASL_SSL_PORT; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a number, got '${!v}'"
done
if ((SEC_ANY_SASL)); then
  IFS=',' read -r -a SASL_USERS <<<"$KAFKA_SASL_USERS"
  ((${#SASL_USERS[@]})) || die "KAFKA_SASL_USERS is empty"
  for _user in "${SASL_USERS[@]}"; do
    [[ "$_user" =~ ^[^:[:space:]]+:[^:[:space:]]+$ ]] \
      || die "KAFKA_SASL_USERS: expected user:password[,user:password ...]"
  done
fi

java_bin() {
  if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
    echo "$JAVA_HOME/bin/java"
  elif command -v java >/dev/null 2>&1; then
    command -v java
  else
    die "java not found (install a JDK 17+ or set JAVA_HOME)"
  fi
}

# Serialise concurrent invocations (e.g. parallel test sessions) on a lock file.
with_lock() {
  local lockfile="$1"; shift
  mkdir -p "$KAFKA_DIR"
  if command -v flock >/dev/null 2>&1; then
    (
      flock 9
      "$@"
    ) 9>"$lockfile"
  else
    "$@"
  fi
}

# ---------------------------------------------------------------- fetch

pom_hash() { sha256sum "$POM" | cut -d' ' -f1; }

libs_current() {
  [[ -f "$POM_HASH_FILE" ]] && [[ "$(cat "$POM_HASH_FILE")" == "$(pom_hash)" ]] \
    && compgen -G "$LIBS_DIR/kafka_2.13-*.jar" >/dev/null
}

fetch_locked() {
  if libs_current; then
    return 0
  fi
  command -v mvn >/dev/null 2>&1 || die "mvn not found (needed once to fetch the Kafka jars)"
  log "resolving Kafka jars from Maven Central into $LIBS_DIR"
  local tmp="$LIBS_PARENT/libs.tmp.$$"
  rm -rf "$tmp"
  # Output kept aside and shown only on failure (Debian's mvn 3.8 -q still emits stray ANSI resets).
  if ! mvn -q -B -Dstyle.color=never -f "$POM" dependency:copy-dependencies \
      -DoutputDirectory="$tmp" -DincludeScope=runtime >"$LIBS_PARENT/fetch.log" 2>&1; then
    sed -e $'s/\x1b\\[[0-9;]*m//g' "$LIBS_PARENT/fetch.log" >&2
    rm -rf "$tmp"
    die "mvn dependency:copy-dependencies failed (full output: $LIBS_PARENT/fetch.log)"
  fi
  pom_hash >"$tmp/.pom.sha256"
  rm -rf "$LIBS_DIR"
  mv "$tmp" "$LIBS_DIR"
  log "fetched $(find "$LIBS_DIR" -name '*.jar' | wc -l) jars"
}

cmd_fetch() { mkdir -p "$LIBS_PARENT" && with_lock "$LIBS_PARENT/fetch.lock" fetch_locked; }

# ---------------------------------------------------------------- process helpers

read_pid() {
  [[ -f "$PID_FILE" ]] || return 1
  local pid
  pid="$(tr -dc '0-9' <"$PID_FILE")"
  [[ -n "$pid" ]] || return 1
  echo "$pid"
}

# Process exists and is not a zombie (a broker we just started stays a zombie child
# of this script until it exits, so kill -0 alone is not enough).
proc_alive() {
  local pid="$1" state
  kill -0 "$pid" 2>/dev/null || return 1
  if [[ -r "/proc/$pid/stat" ]]; then
    state="$(sed -e 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)"
    [[ "$state" != "Z" ]] || return 1
  fi
  return 0
}

# Alive and really our broker for this port (guards against a recycled pid).
pid_alive() {
  local pid="$1"
  proc_alive "$pid" || return 1
  if [[ -r "/proc/$pid/cmdline" ]]; then
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$PROPS_FILE" || return 1
  fi
  return 0
}

running_pid() {
  local pid
  pid="$(read_pid)" || return 1
  pid_alive "$pid" || return 1
  echo "$pid"
}

# Does something speak Kafka on the port? Sends an ApiVersions (v0) request and
# expects a well-formed response with error_code 0. Falls back to a plain TCP
# connect when python3 is not available.
probe() {
  local port="$1"
  if command -v python3 >/dev/null 2>&1; then
    python3 - "$HOST" "$port" <<'PY' 2>/dev/null
import socket, struct, sys

host, port = sys.argv[1], int(sys.argv[2])
corr = 0x6B61666B

def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf

try:
    with socket.create_connection((host, port), timeout=2) as s:
        s.settimeout(3)
        client_id = b"kafka.sh"
        # RequestHeader v1: api_key=18 (ApiVersions), api_version=0, correlation_id, client_id
        body = struct.pack(">hhih", 18, 0, corr, len(client_id)) + client_id
        s.sendall(struct.pack(">i", len(body)) + body)
        (size,) = struct.unpack(">i", recv_exact(s, 4))
        resp = recv_exact(s, size)
        got_corr, error_code = struct.unpack(">ih", resp[:6])
        sys.exit(0 if got_corr == corr and error_code == 0 else 1)
except Exception:
    sys.exit(1)
PY
  else
    (exec 3<>"/dev/tcp/$HOST/$port") 2>/dev/null
  fi
}

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# ---------------------------------------------------------------- start

write_props() {
  local listeners="PLAINTEXT://$HOST:$KAFKA_PORT" advertised="PLAINTEXT://$HOST:$KAFKA_PORT"
  local protocols="PLAINTEXT:PLAINTEXT" name_port name
  while read -r name_port; do
    [[ -n "$name_port" ]] || continue
    name="${name_port%%:*}"
    listeners+=",$name://$HOST:${name_port#*:}"
    advertised+=",$name://$HOST:${name_port#*:}"
    protocols+=",$name:$name"
  done < <(extra_listeners)
  if ((SEC_ANY_SASL)); then  # the PLAIN users' passwords are written into it
    rm -f "$PROPS_FILE"
    (umask 077 && : >"$PROPS_FILE")
  fi
  cat >"$PROPS_FILE" <<EOF
# Generated by scripts/kafka.sh on every start -- edits are overwritten.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$KAFKA_CONTROLLER_PORT
listeners=$listeners,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=$advertised
listener.security.protocol.map=$protocols,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs=$DATA_DIR
num.partitions=3
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
# One broker: a single partition for group offsets makes first use of a group fast.
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.hours=168
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
EOF
  write_security_props
}

# The extra listeners' settings (KAFKA_SECURITY); nothing when it is off.
write_security_props() {
  local listener user plain_users=""
  if ((SEC_ANY_SASL)); then
    for user in "${SASL_USERS[@]}"; do
      plain_users+=" user_${user%%:*}=\"${user#*:}\""
    done
    echo "sasl.enabled.mechanisms=SCRAM-SHA-512,SCRAM-SHA-256,PLAIN" >>"$PROPS_FILE"
    for listener in sasl_plaintext sasl_ssl; do
      { [[ "$listener" == sasl_plaintext ]] && ((SEC_SASL)); } \
        || { [[ "$listener" == sasl_ssl ]] && ((SEC_SASL_SSL)); } || continue
      cat >>"$PROPS_FILE" <<EOF
listener.name.$listener.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.$listener.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.$listener.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required$plain_users;
EOF
    done
  fi
  if ((SEC_ANY_TLS)); then
    cat >>"$PROPS_FILE" <<EOF
ssl.keystore.type=PEM
ssl.keystore.location=$TLS_DIR/broker.pem
ssl.truststore.type=PEM
ssl.truststore.location=$TLS_DIR/ca.pem
EOF
    if ((SEC_SSL)); then
      echo "listener.name.ssl.ssl.client.auth=required" >>"$PROPS_FILE"
    fi
  fi
  return 0
}

# A CA, a broker certificate (127.0.0.1, localhost) and a client certificate, made once.
make_tls() {
  ((SEC_ANY_TLS)) || return 0
  [[ -f "$TLS_DIR/broker.pem" && -f "$TLS_DIR/client.pem" ]] && return 0
  command -v openssl >/dev/null 2>&1 || die "openssl not found (needed for KAFKA_SECURITY=ssl/sasl_ssl)"
  log "generating a local CA and certificates in $TLS_DIR"
  local tmp="$TLS_DIR.tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  if ! (
    cd "$tmp"
    umask 077
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -keyout ca.key -out ca.pem \
      -subj "/CN=stockstream local Kafka CA" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
    printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" "extendedKeyUsage=serverAuth" \
      "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid,issuer" >broker.ext
    printf '%s\n' "extendedKeyUsage=clientAuth" \
      "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid,issuer" >client.ext
    for who in broker client; do
      openssl req -newkey rsa:2048 -nodes -keyout "$who.key" -out "$who.csr" \
        -subj "/CN=stockstream-$who"
      openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
        -out "$who.pem" -extfile "$who.ext"
    done
    # Kafka's PEM keystore: the (PKCS#8, unencrypted) key followed by the certificate.
    cat broker.key broker.pem >broker-keystore.pem
    mv broker-keystore.pem broker.pem
    rm -f ./*.csr ./*.ext ca.srl broker.key
  ) >"$tmp.log" 2>&1; then
    cat "$tmp.log" >&2
    rm -rf "$tmp" "$tmp.log"
    die "openssl failed"
  fi
  rm -f "$tmp.log"
  chmod 644 "$tmp/ca.pem" "$tmp/client.pem"
  rm -rf "$TLS_DIR"
  mv "$tmp" "$TLS_DIR"
}

# Each "user:password" as SCRAM credentials for both mechanisms, in StorageTool's syntax.
scram_args() {
  local user
  for user in "${SASL_USERS[@]}"; do
    printf -- '--add-scram\nSCRAM-SHA-512=[name=%s,password=%s]\n' "${user%%:*}" "${user#*:}"
    printf -- '--add-scram\nSCRAM-SHA-256=[name=%s,password=%s]\n' "${user%%:*}" "${user#*:}"
  done
}

users_hash() { printf '%s' "$KAFKA_SASL_USERS" | sha256sum | cut -d' ' -f1; }

# Storage formatted before these users were asked for: set them through the running broker
# (one mechanism per request: the broker refuses two changes of one user in one request).
update_scram_users() {
  ((SEC_ANY_SASL)) || return 0
  [[ -f "$SCRAM_MARKER" && "$(cat "$SCRAM_MARKER")" == "$(users_hash)" ]] && return 0
  local java user mechanism
  java="$(java_bin)"
  java_opts
  for user in "${SASL_USERS[@]}"; do
    log "setting the SCRAM credentials of user ${user%%:*}"
    for mechanism in SCRAM-SHA-512 SCRAM-SHA-256; do
      "$java" "${JAVA_OPTS[@]}" -cp "$LIBS_DIR/*" kafka.admin.ConfigCommand \
        --bootstrap-server "$BOOTSTRAP" --alter --entity-type users \
        --entity-name "${user%%:*}" --add-config "$mechanism=[password=${user#*:}]" \
        >/dev/null || return 1
    done
  done
  users_hash >"$SCRAM_MARKER"
}

java_opts() {
  # shellcheck disable=SC2206  # KAFKA_HEAP is a list of flags on purpose
  JAVA_OPTS=($KAFKA_HEAP
    -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35
    -XX:+ExplicitGCInvokesConcurrent -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
    "-Dlog4j2.configurationFile=$LOG4J_CONFIG" "-Dkafka.log.file=$LOG_FILE"
    "-Dkafka.logs.dir=$KAFKA_DIR")
}

format_storage() {
  if [[ -f "$DATA_DIR/meta.properties" ]]; then
    return 0
  fi
  local java cluster_id
  java="$(java_bin)"
  java_opts
  cluster_id="$("$java" "${JAVA_OPTS[@]}" -cp "$LIBS_DIR/*" kafka.tools.StorageTool random-uuid | tail -n 1)"
  [[ -n "$cluster_id" ]] || die "kafka.tools.StorageTool random-uuid printed nothing"
  log "formatting $DATA_DIR (cluster id $cluster_id)"
  mkdir -p "$DATA_DIR"
  local scram=()
  if ((SEC_ANY_SASL)); then
    mapfile -t scram < <(scram_args)
  fi
  "$java" "${JAVA_OPTS[@]}" -cp "$LIBS_DIR/*" kafka.tools.StorageTool \
    format -t "$cluster_id" -c "$PROPS_FILE" "${scram[@]}" >&2 \
    || die "formatting $DATA_DIR failed"
  if ((SEC_ANY_SASL)); then
    users_hash >"$SCRAM_MARKER"
  fi
}

start_locked() {
  local pid
  if pid="$(running_pid)"; then
    # Possibly still starting (another `start` raced us): give it the usual grace.
    if wait_ready "$pid" -1; then
      log "already running (pid $pid)"
      echo "$BOOTSTRAP"
      return 0
    fi
    die "broker pid $pid is alive but does not answer on $BOOTSTRAP (see $LOG_FILE)"
  fi
  rm -f "$PID_FILE"

  if port_open "$KAFKA_PORT"; then
    die "port $KAFKA_PORT is already in use by another process"
  fi
  if port_open "$KAFKA_CONTROLLER_PORT"; then
    die "controller port $KAFKA_CONTROLLER_PORT is already in use by another process"
  fi
  local name_port
  while read -r name_port; do
    [[ -n "$name_port" ]] || continue
    if port_open "${name_port#*:}"; then
      die "${name_port%%:*} port ${name_port#*:} is already in use by another process"
    fi
  done < <(extra_listeners)

  cmd_fetch
  mkdir -p "$KAFKA_DIR"
  make_tls
  write_props
  format_storage

  local java log_offset=0 started
  java="$(java_bin)"
  java_opts
  [[ -f "$LOG_FILE" ]] && log_offset="$(stat -c %s "$LOG_FILE")"
  started="$(date +%s)"
  log "starting broker on $BOOTSTRAP (controller $HOST:$KAFKA_CONTROLLER_PORT, data $DATA_DIR)"
  {
    echo "=== $(date -Is) starting broker on $BOOTSTRAP"
  } >>"$OUT_FILE"
  # 9>&-: the broker must not inherit the flock fd, or it would hold the lock forever.
  nohup "$java" "${JAVA_OPTS[@]}" -cp "$LIBS_DIR/*" kafka.Kafka "$PROPS_FILE" \
    >>"$OUT_FILE" 2>&1 </dev/null 9>&- &
  pid=$!
  echo "$pid" >"$PID_FILE"

  if ! wait_ready "$pid" "$log_offset"; then
    if proc_alive "$pid"; then
      log "broker did not answer within ${KAFKA_START_TIMEOUT}s; stopping it"
      stop_pid "$pid"
    else
      log "broker process exited during startup"
    fi
    rm -f "$PID_FILE"
    log "--- last lines of $LOG_FILE:"
    tail -n 30 "$LOG_FILE" >&2 2>/dev/null || true
    log "--- last lines of $OUT_FILE:"
    tail -n 15 "$OUT_FILE" >&2 2>/dev/null || true
    exit 1
  fi
  log "broker up after $(($(date +%s) - started))s (pid $pid)"
  if ! update_scram_users; then
    stop_pid "$pid"
    rm -f "$PID_FILE"
    die "could not set the SCRAM users of KAFKA_SASL_USERS; broker stopped"
  fi
  echo "$BOOTSTRAP"
  print_extra_listeners
}

print_extra_listeners() {
  local name_port
  while read -r name_port; do
    [[ -n "$name_port" ]] && echo "${name_port%%:*}://$HOST:${name_port#*:}"
  done < <(extra_listeners)
  return 0
}

# Wait until the broker logged "Kafka Server started" (searched from byte offset
# $2 of the log, so an older start's line does not count; -1 skips the log check)
# and answers ApiVersions.
wait_ready() {
  local pid="$1" offset="$2"
  local deadline=$((SECONDS + KAFKA_START_TIMEOUT))
  local saw_started=0
  ((offset >= 0)) || saw_started=1
  while ((SECONDS < deadline)); do
    proc_alive "$pid" || return 1
    # The log rolled over meanwhile: search the new file from its start.
    if ((!saw_started)) && [[ -f "$LOG_FILE" ]] && (($(stat -c %s "$LOG_FILE") < offset)); then
      offset=0
    fi
    if ((!saw_started)) && [[ -f "$LOG_FILE" ]] \
        && tail -c "+$((offset + 1))" "$LOG_FILE" | grep -q "Kafka Server started"; then
      saw_started=1
    fi
    if ((saw_started)) && probe "$KAFKA_PORT"; then
      return 0
    fi
    sleep 0.5
  done
  return 1
}

cmd_start() { with_lock "$KAFKA_DIR/broker-$KAFKA_PORT.lock" start_locked; }

# ---------------------------------------------------------------- stop / status / reset / logs

stop_pid() {
  local pid="$1" waited=0
  kill -TERM "$pid" 2>/dev/null || true
  while proc_alive "$pid"; do
    if ((waited >= STOP_TIMEOUT * 2)); then
      log "broker pid $pid did not exit within ${STOP_TIMEOUT}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.5
    waited=$((waited + 1))
  done
}

stop_locked() {
  local pid
  if ! pid="$(running_pid)"; then
    rm -f "$PID_FILE"
    echo "not running ($BOOTSTRAP)"
    return 0
  fi
  log "stopping broker pid $pid ($BOOTSTRAP)"
  stop_pid "$pid"
  rm -f "$PID_FILE"
  echo "stopped ($BOOTSTRAP)"
}

cmd_stop() { with_lock "$KAFKA_DIR/broker-$KAFKA_PORT.lock" stop_locked; }

cmd_status() {
  local pid
  if pid="$(running_pid)"; then
    if probe "$KAFKA_PORT"; then
      echo "running (pid $pid), bootstrap: $BOOTSTRAP"
      return 0
    fi
    echo "process $pid alive but not answering on $BOOTSTRAP (starting or unhealthy)"
    return 1
  fi
  echo "not running ($BOOTSTRAP)"
  return 1
}

reset_locked() {
  stop_locked
  log "deleting $DATA_DIR"
  rm -rf "$DATA_DIR" "$PROPS_FILE"
}

cmd_reset() { with_lock "$KAFKA_DIR/broker-$KAFKA_PORT.lock" reset_locked; }

cmd_logs() {
  [[ -f "$LOG_FILE" ]] || die "no log yet at $LOG_FILE"
  exec tail -n "${KAFKA_LOG_LINES:-100}" -F "$LOG_FILE"
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

case "${1:-}" in
  fetch) cmd_fetch ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  reset) cmd_reset ;;
  logs) cmd_logs ;;
  -h | --help | help) usage ;;
  *) usage >&2; exit 2 ;;
esac
