#!/usr/bin/env bash
# End to end on a throwaway kind cluster: build both images (CPU worker), load them into kind,
# `helm install` the chart, apply the tiny CPU cascade, send load to it, and check that
# `kubectl get dcas` shows the operator's decision (demand, threshold, replicas, Ready).
#
#   e2e/run.sh                     # needs docker (running), kind, helm, kubectl, curl
#   E2E_KEEP=1 e2e/run.sh          # keep the cluster afterwards for a look around
#
# Settings (environment): E2E_CLUSTER (diffcascade-e2e), E2E_NAMESPACE (cascades),
# E2E_QPS (3), E2E_LOAD_SECONDS (120), E2E_TIMEOUT (600, seconds per wait),
# E2E_TORCH ("torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu": the worker's
# CPU torch), E2E_KEEP (0), E2E_SKIP_BUILD (0: reuse images already built).
# The last lines it prints between "--- kubectl get dcas ---" and "--- end ---" are what
# e2e/test_e2e.py checks; it exits non-zero on any failed step or check.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CLUSTER="${E2E_CLUSTER:-diffcascade-e2e}"
NS="${E2E_NAMESPACE:-cascades}"
SYSTEM_NS="diffcascade-system"
QPS="${E2E_QPS:-3}"
LOAD_SECONDS="${E2E_LOAD_SECONDS:-120}"
TIMEOUT="${E2E_TIMEOUT:-600}"
TORCH="${E2E_TORCH:-torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu}"
KEEP="${E2E_KEEP:-0}"
SKIP_BUILD="${E2E_SKIP_BUILD:-0}"
# The CPU worker's base: the operator image's base, pinned by digest (operator/Dockerfile).
PYTHON_IMAGE="python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7"
CASCADE="tiny"
LOCAL_PORT=18080
WORK="$ROOT/e2e/.work"

log() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'e2e: %s\n' "$*" >&2; exit 1; }

for tool in docker kind helm kubectl curl; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed"
done
docker info >/dev/null 2>&1 || die "docker is installed but its engine is not reachable"

PF_PID=""
LOAD_PID=""
cleanup() {
  [[ -n "$LOAD_PID" ]] && kill "$LOAD_PID" 2>/dev/null || true
  [[ -n "$PF_PID" ]] && kill "$PF_PID" 2>/dev/null || true
  if [[ "$KEEP" != "1" ]]; then
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  else
    log "keeping cluster $CLUSTER (kind delete cluster --name $CLUSTER)"
  fi
}
trap cleanup EXIT

wait_for() {  # wait_for DESCRIPTION COMMAND...: retry until COMMAND succeeds or TIMEOUT
  local what="$1"; shift
  local deadline=$((SECONDS + TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out waiting for $what"
    sleep 3
  done
}

mkdir -p "$WORK"

log "kind cluster $CLUSTER"
kind get clusters 2>/dev/null | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 180s
kubectl config use-context "kind-$CLUSTER" >/dev/null

if [[ "$SKIP_BUILD" != "1" ]]; then
  log "images"
  docker build -f operator/Dockerfile -t diffcascade-operator:dev .
  # shellcheck disable=SC2086  # TORCH holds pip arguments
  docker build -f worker/Dockerfile -t diffcascade-worker:dev \
    --build-arg BASE_IMAGE="$PYTHON_IMAGE" --build-arg EXPECT_CUDA=false \
    --build-arg TORCH_INSTALL="$TORCH" .
  docker build -f e2e/Dockerfile --target worker -t diffcascade-worker:e2e \
    --build-arg WORKER_IMAGE=diffcascade-worker:dev --build-arg OPERATOR_IMAGE=diffcascade-operator:dev .
  docker build -f e2e/Dockerfile --target operator -t diffcascade-operator:e2e \
    --build-arg WORKER_IMAGE=diffcascade-worker:dev --build-arg OPERATOR_IMAGE=diffcascade-operator:dev .
fi
kind load docker-image --name "$CLUSTER" diffcascade-operator:e2e diffcascade-worker:e2e

log "helm install (operator watches namespace $NS)"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -
helm upgrade --install diffcascade helm/diffcascade \
  --namespace "$SYSTEM_NS" --create-namespace \
  --set image.repository=diffcascade-operator --set image.tag=e2e --set image.pullPolicy=Never \
  --set workerImage.repository=diffcascade-worker --set workerImage.tag=e2e \
  --set prometheus.url= --set "watchNamespaces={$NS}" --set logLevel=verbose \
  --wait --timeout "${TIMEOUT}s"
kubectl -n "$SYSTEM_NS" rollout status deployment/diffcascade --timeout "${TIMEOUT}s"

log "apply examples/tiny-cpu.yaml"
kubectl apply -n "$NS" -f examples/tiny-cpu.yaml
for deployment in "$CASCADE-light" "$CASCADE-heavy" "$CASCADE"; do  # the stages, the router
  wait_for "deployment $deployment" kubectl -n "$NS" get deployment "$deployment"
  kubectl -n "$NS" rollout status "deployment/$deployment" --timeout "${TIMEOUT}s"
done

log "load: $QPS qps for ${LOAD_SECONDS}s at the cascade's endpoint (its router)"
kubectl -n "$NS" port-forward "service/$CASCADE" "$LOCAL_PORT:8000" >"$WORK/port-forward.log" 2>&1 &
PF_PID=$!
wait_for "port-forward" curl -fsS "http://127.0.0.1:$LOCAL_PORT/healthz"
LOADGEN="${E2E_LOADGEN:-$ROOT/.venv/bin/diffcascade}"
send_load() {
  if [[ -x "$LOADGEN" ]]; then
    "$LOADGEN" load --url "http://127.0.0.1:$LOCAL_PORT" --qps "$QPS" --duration "$LOAD_SECONDS" \
      --slo-seconds 3 --size 64x64 --report "$WORK/load.json"
  else  # no project venv: paced curl requests
    interval=$(awk -v q="$QPS" 'BEGIN { print 1 / q }')
    pids=()
    end=$((SECONDS + LOAD_SECONDS))
    while ((SECONDS < end)); do
      curl -s -o /dev/null -w '%{http_code}\n' --max-time 30 -H 'Content-Type: application/json' \
        -d "{\"prompt\": \"a red bicycle, photo $SECONDS\", \"size\": \"64x64\"}" \
        "http://127.0.0.1:$LOCAL_PORT/v1/images/generations" >>"$WORK/status-codes.txt" &
      pids+=($!)
      sleep "$interval"
    done
    wait "${pids[@]}" || true
    sort "$WORK/status-codes.txt" | uniq -c >&2
  fi
}
send_load >"$WORK/load.log" 2>&1 &
LOAD_PID=$!

log "the operator's decision (while the load runs)"
has_decision() {
  local qps threshold
  qps=$(kubectl -n "$NS" get dcas "$CASCADE" -o jsonpath='{.status.demand.qps}')
  threshold=$(kubectl -n "$NS" get dcas "$CASCADE" -o jsonpath='{.status.allocation.threshold}')
  [[ -n "$qps" && -n "$threshold" ]] && awk -v q="$qps" 'BEGIN { exit !(q > 0) }'
}
wait_for "status.demand.qps > 0 and a threshold on dcas/$CASCADE" has_decision
is_ready() {
  [[ "$(kubectl -n "$NS" get dcas "$CASCADE" \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" == "True" ]]
}
wait_for "dcas/$CASCADE Ready=True" is_ready

kubectl -n "$NS" describe dcas "$CASCADE" >&2
kubectl -n "$NS" get dcas "$CASCADE" -o yaml >"$WORK/cascade.yaml"
echo "--- kubectl get dcas ---"
kubectl -n "$NS" get dcas -o wide
echo "--- end ---"
wait "$LOAD_PID" || log "the load generator exited non-zero (see $WORK/load.log)"
cat "$WORK/load.log" >&2
