#!/usr/bin/env bash
# Local AWS emulators for fedstep, without Docker.
#
#   scripts/emulators.sh install   install pinned LocalStack + moto into .emu/ (idempotent)
#   scripts/emulators.sh up        install if needed, start both, wait until healthy
#   scripts/emulators.sh down      stop what `up` started
#   scripts/emulators.sh status    show pids and health (exit 1 if not healthy)
#   scripts/emulators.sh env       print `export ...` lines: eval "$(scripts/emulators.sh env)"
#                                  (also FEDSTEP_SFN_MOCK_CONFIG, see below)
#   scripts/emulators.sh python    print the path of the tool python (boto3, pytest live there)
#
# LocalStack 4.8.1 serves S3, SQS, SNS, Step Functions, STS and IAM on
# 127.0.0.1:4566; moto 5.1.22 serves DynamoDB and DynamoDB Streams on
# 127.0.0.1:5000 (LocalStack's DynamoDB needs a JVM download this network
# cannot reach), one request at a time (scripts/moto_server.py). Both are
# pinned with constraint files: LocalStack's own
# dependency ranges do not resolve to a working set.
#
# Settings (environment):
#   FEDSTEP_EMU_DIR        venvs, logs, pid files, state   (default <repo>/.emu)
#   FEDSTEP_LOCALSTACK_PORT                                (default 4566)
#   FEDSTEP_MOTO_PORT                                      (default 5000)
#   FEDSTEP_EMU_TIMEOUT    seconds to wait for health      (default 180)
#   PYTHON                 interpreter for the venvs       (default python3.11, else python3)
#
# Step Functions mocked service integrations: `up` starts LocalStack with
# SFN_MOCK_CONFIG=<emu dir>/sfn-mock-config.json and writes that file as an
# empty, valid mock config; `env` prints its path as FEDSTEP_SFN_MOCK_CONFIG.
# tests/statemachine/test_aws_variant.py writes mocked Lambda answers into it
# (LocalStack re-reads it when its mtime, in whole seconds, changes) and runs
# executions as <state machine arn>#<test case>: the AWS variant of the
# workflow, whose tasks invoke a Lambda that cannot run here.
#
# Users with Docker can run `localstack start` instead (with SFN_MOCK_CONFIG
# naming a file FEDSTEP_SFN_MOCK_CONFIG points the tests at): `up` does not
# start a second LocalStack when something healthy already answers on the
# port, and nothing in fedstep talks to the emulators except through the
# standard AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_<SERVICE> variables.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EMU_DIR="${FEDSTEP_EMU_DIR:-$ROOT/.emu}"
LS_PORT="${FEDSTEP_LOCALSTACK_PORT:-4566}"
MOTO_PORT="${FEDSTEP_MOTO_PORT:-5000}"
TIMEOUT="${FEDSTEP_EMU_TIMEOUT:-180}"

LS_VERSION=4.8.1
MOTO_VERSION=5.1.22
LS_SERVICES=s3,sqs,sns,stepfunctions,sts,iam

LS_VENV="$EMU_DIR/localstack"
MOTO_VENV="$EMU_DIR/moto"
SFN_MOCK_CONFIG_NAME=sfn-mock-config.json

log() { printf 'emulators: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The repo copy of a constraint file wins (the repo is self-contained); the
# shared copy beside a CI clone (<clone>/../shared/emulators/) is the fallback.
constraints() {
  local name="$1" f
  for f in "$ROOT/scripts/emulators/$name" "$ROOT/../shared/emulators/$name"; do
    if [[ -f "$f" ]]; then printf '%s\n' "$f"; return 0; fi
  done
  die "constraint file $name not found in scripts/emulators/ or ../shared/emulators/"
}

pick_python() {
  if [[ -n "${PYTHON:-}" ]]; then printf '%s\n' "$PYTHON"; return; fi
  if command -v python3.11 >/dev/null 2>&1; then printf 'python3.11\n'; return; fi
  command -v python3 >/dev/null 2>&1 || die "python3 not found"
  printf 'python3\n'
}

# install_venv <venv dir> <constraints file> <requirement>
# A marker file records what was installed (requirement + constraints hash);
# when it matches, nothing is done. A venv without a matching marker (a
# half-finished install, another version) is rebuilt from scratch.
install_venv() {
  local venv="$1" cfile="$2" req="$3" marker want py
  marker="$venv/.fedstep-installed"
  want="$req $(sha256sum "$cfile" | cut -d' ' -f1)"
  if [[ -f "$marker" && "$(cat "$marker")" == "$want" && -x "$venv/bin/python" ]]; then
    log "$req already installed in ${venv#"$ROOT"/}"
    return 0
  fi
  py="$(pick_python)"
  log "installing $req into ${venv#"$ROOT"/} with $py (a few minutes on a fresh machine)"
  rm -rf "$venv"
  mkdir -p "$EMU_DIR"
  "$py" -m venv "$venv"
  # No stdin, no prompts, no version nag: this runs unattended in CI.
  PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    "$venv/bin/pip" install --quiet -c "$cfile" "$req" </dev/null \
    || die "pip install of $req failed"
  printf '%s\n' "$want" >"$marker"
}

cmd_install() {
  install_venv "$LS_VENV" "$(constraints "localstack-$LS_VERSION-constraints.txt")" \
    "localstack-core[runtime]==$LS_VERSION"
  # jsonpath-ng's parse tables, written once instead of regenerated for
  # every path LocalStack's Step Functions evaluates (about 10x less CPU a
  # path; see the script).
  "$LS_VENV/bin/python" "$ROOT/scripts/jsonpath_tables.py" >/dev/null
  install_venv "$MOTO_VENV" "$(constraints "moto-$MOTO_VERSION-constraints.txt")" \
    "moto[server]==$MOTO_VERSION"
}

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# The mock config's path with symlinks resolved once the directory exists:
# LocalStack keeps the path it was started with, and .emu may be a symlink
# (a git worktree sharing the main checkout's emulators) that can go away.
sfn_mock_config() {
  if [[ -d "$EMU_DIR" ]]; then
    printf '%s/%s\n' "$(cd "$EMU_DIR" && pwd -P)" "$SFN_MOCK_CONFIG_NAME"
  else
    printf '%s/%s\n' "$EMU_DIR" "$SFN_MOCK_CONFIG_NAME"
  fi
}

# write_empty_sfn_mock_config: no state machines, no responses (valid: an
# invalid file makes every mocked StartExecution fail).
write_empty_sfn_mock_config() {
  mkdir -p "$EMU_DIR"
  printf '%s\n' '{"StateMachines": {}, "MockedResponses": {}}' >"$(sfn_mock_config)"
}

# LocalStack is healthy when every service we asked for is available/running.
localstack_healthy() {
  local body
  body="$(curl -sf --max-time 3 "http://127.0.0.1:$LS_PORT/_localstack/health" 2>/dev/null)" || return 1
  HEALTH="$body" SERVICES="$LS_SERVICES" python3 - <<'EOF'
import json, os, sys
try:
    services = json.loads(os.environ["HEALTH"]).get("services", {})
except ValueError:
    sys.exit(1)
ok = all(services.get(s) in ("available", "running") for s in os.environ["SERVICES"].split(","))
sys.exit(0 if ok else 1)
EOF
}

# moto answers DynamoDB ListTables once it is up (an unsigned-looking request
# with dummy credentials is fine for moto).
moto_healthy() {
  curl -sf --max-time 3 -o /dev/null -X POST "http://127.0.0.1:$MOTO_PORT/" \
    -H 'Content-Type: application/x-amz-json-1.0' \
    -H 'X-Amz-Target: DynamoDB_20120810.ListTables' \
    -H 'Authorization: AWS4-HMAC-SHA256 Credential=test/20250101/us-east-1/dynamodb/aws4_request, SignedHeaders=host, Signature=0' \
    -d '{}' 2>/dev/null
}

# start_bg <name> <command...>: run in its own session (setsid) so `down` can
# stop the whole process group by the recorded pid, detached from our stdin.
start_bg() {
  local name="$1"; shift
  mkdir -p "$EMU_DIR"
  setsid "$@" </dev/null >"$EMU_DIR/$name.log" 2>&1 &
  printf '%s\n' "$!" >"$EMU_DIR/$name.pid"
}

# wait_healthy <name> <check function>
wait_healthy() {
  local name="$1" check="$2" start=$SECONDS
  while ! "$check"; do
    if [[ -f "$EMU_DIR/$name.pid" ]] && ! pid_alive "$EMU_DIR/$name.pid"; then
      log "$name exited during start-up; last log lines:"
      tail -n 40 "$EMU_DIR/$name.log" >&2 || true
      exit 1
    fi
    if (( SECONDS - start >= TIMEOUT )); then
      log "$name not healthy after ${TIMEOUT}s; last log lines:"
      tail -n 40 "$EMU_DIR/$name.log" >&2 || true
      exit 1
    fi
    sleep 1
  done
  log "$name healthy after $((SECONDS - start))s"
}

cmd_up() {
  cmd_install
  local started=()
  if localstack_healthy; then
    log "LocalStack already answering on :$LS_PORT, not starting another"
  else
    pid_alive "$EMU_DIR/localstack.pid" && die "LocalStack pid $(cat "$EMU_DIR/localstack.pid") is running but not healthy; run: $0 down"
    log "starting LocalStack $LS_VERSION on 127.0.0.1:$LS_PORT"
    write_empty_sfn_mock_config
    # DNS_ADDRESS=0: no DNS server on :53 (needs root, collides with the host).
    # SKIP_SSL_CERT_DOWNLOAD / DISABLE_EVENTS: no network calls it cannot make here.
    # EAGER_SERVICE_LOADING: load the services now, so "healthy" means ready.
    # SQS_ENDPOINT_STRATEGY=path + LOCALSTACK_HOST: queue URLs like
    # http://127.0.0.1:4566/queue/us-east-1/000000000000/<name>; the default
    # *.localhost.localstack.cloud host names need public DNS, absent here.
    start_bg localstack env \
      GATEWAY_LISTEN="127.0.0.1:$LS_PORT" \
      SERVICES="$LS_SERVICES" \
      EAGER_SERVICE_LOADING=1 \
      SQS_ENDPOINT_STRATEGY=path \
      LOCALSTACK_HOST="127.0.0.1:$LS_PORT" \
      LOCALSTACK_VOLUME_DIR="$EMU_DIR/localstack-state" \
      DNS_ADDRESS=0 \
      SKIP_SSL_CERT_DOWNLOAD=1 \
      DISABLE_EVENTS=1 \
      SFN_MOCK_CONFIG="$(sfn_mock_config)" \
      "$LS_VENV/bin/python" -m localstack.runtime.main
    started+=(localstack)
  fi
  if moto_healthy; then
    log "moto already answering on :$MOTO_PORT, not starting another"
  else
    pid_alive "$EMU_DIR/moto.pid" && die "moto pid $(cat "$EMU_DIR/moto.pid") is running but not healthy; run: $0 down"
    log "starting moto $MOTO_VERSION on 127.0.0.1:$MOTO_PORT"
    # MOTO_ACCOUNT_ID: same account id as LocalStack, so ARNs agree.
    # moto_server.py, not moto_server: one request at a time, so that a
    # conditional write is atomic as in DynamoDB (see that file).
    start_bg moto env MOTO_ACCOUNT_ID=000000000000 \
      "$MOTO_VENV/bin/python" "$ROOT/scripts/moto_server.py" 127.0.0.1 "$MOTO_PORT"
    started+=(moto)
  fi
  local name
  for name in "${started[@]}"; do
    case "$name" in
      localstack) wait_healthy localstack localstack_healthy ;;
      moto) wait_healthy moto moto_healthy ;;
    esac
  done
  log "up; logs in ${EMU_DIR#"$ROOT"/}/{localstack,moto}.log"
}

# stop <name>: TERM the process group recorded by start_bg, KILL after 15 s.
stop() {
  local name="$1" pidfile="$EMU_DIR/$1.pid" pid i
  if ! pid_alive "$pidfile"; then
    rm -f "$pidfile"
    log "$name not running (from here)"
    return 0
  fi
  pid="$(cat "$pidfile")"
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 30; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name (pid $pid) ignored TERM, killing"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  log "$name stopped"
}

cmd_down() {
  stop localstack
  stop moto
  # Fresh state next time: the emulators keep state in memory only, but
  # LocalStack writes a few files under its volume dir.
  rm -rf "$EMU_DIR/localstack-state"
}

cmd_status() {
  local rc=0 name
  for name in localstack moto; do
    if pid_alive "$EMU_DIR/$name.pid"; then
      printf '%-10s pid %s\n' "$name" "$(cat "$EMU_DIR/$name.pid")"
    else
      printf '%-10s no pid file / not started from here\n' "$name"
    fi
  done
  if localstack_healthy; then echo "localstack healthy on :$LS_PORT"; else echo "localstack NOT healthy on :$LS_PORT"; rc=1; fi
  if moto_healthy; then echo "moto       healthy on :$MOTO_PORT"; else echo "moto       NOT healthy on :$MOTO_PORT"; rc=1; fi
  return "$rc"
}

cmd_env() {
  cat <<EOF
export AWS_ACCESS_KEY_ID=test
export AWS_SECRET_ACCESS_KEY=test
export AWS_REGION=us-east-1
export AWS_DEFAULT_REGION=us-east-1
export AWS_ENDPOINT_URL=http://127.0.0.1:$LS_PORT
export AWS_ENDPOINT_URL_DYNAMODB=http://127.0.0.1:$MOTO_PORT
export AWS_ENDPOINT_URL_DYNAMODB_STREAMS=http://127.0.0.1:$MOTO_PORT
export FEDSTEP_SFN_MOCK_CONFIG=$(printf %q "$(sfn_mock_config)")
EOF
}

case "${1:-}" in
  install) cmd_install ;;
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  python) printf '%s\n' "$MOTO_VENV/bin/python" ;;
  *) echo "usage: $0 install|up|down|status|env|python" >&2; exit 2 ;;
esac
