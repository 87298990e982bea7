#!/usr/bin/env bash
# `make images`: build the operator and worker images from this tree's Dockerfiles, tag them
# with the package version (pyproject.toml), push them to the registry you name, and print
# the Helm values that install exactly what was pushed (pinned by digest).
#
#   make images REGISTRY=ghcr.io/acme            # ghcr.io/acme/operator:0.1.0, .../worker:0.1.0
#   make images REGISTRY=registry.local:5000 PUSH=0   # build only
#   make images REGISTRY=ghcr.io/acme DRY_RUN=1  # print the docker commands, run nothing
#
# Settings (environment): REGISTRY (required), TAG (default: the package version), PUSH (1),
# PLATFORM (linux/amd64; the worker's base image is amd64 only), DRY_RUN (0),
# WORKER_BUILD_ARGS (extra `docker build` arguments of the worker image, e.g. a CPU base:
# "--build-arg BASE_IMAGE=python:3.11-slim --build-arg EXPECT_CUDA=false --build-arg
# TORCH_INSTALL='torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu'").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

die() { printf 'images: %s\n' "$*" >&2; exit 1; }

REGISTRY="${REGISTRY:-}"
[[ -n "$REGISTRY" ]] || die "name the registry to push to: make images REGISTRY=ghcr.io/<you> (the images become REGISTRY/operator and REGISTRY/worker; PUSH=0 builds only)"
REGISTRY="${REGISTRY%/}"
PUSH="${PUSH:-1}"
DRY_RUN="${DRY_RUN:-0}"
PLATFORM="${PLATFORM:-linux/amd64}"
VERSION="$(python3 -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")" \
  || die "cannot read the version from pyproject.toml (needs python3 >= 3.11)"
TAG="${TAG:-$VERSION}"

run() {  # print a command; run it unless DRY_RUN=1
  printf '+ %s\n' "$*" >&2
  if [[ "$DRY_RUN" != "1" ]]; then "$@" >&2; fi  # stdout is for the values alone
}

if [[ "$DRY_RUN" != "1" ]]; then
  command -v docker >/dev/null 2>&1 || die "docker is not installed"
  docker info >/dev/null 2>&1 || die "docker is installed but its engine is not reachable"
fi

declare -A DIGESTS=()
for image in operator worker; do
  ref="$REGISTRY/$image:$TAG"
  extra=()
  if [[ "$image" == worker && -n "${WORKER_BUILD_ARGS:-}" ]]; then
    eval "extra=($WORKER_BUILD_ARGS)"
  fi
  run docker build --platform "$PLATFORM" -f "$image/Dockerfile" -t "$ref" \
    --label "org.opencontainers.image.version=$VERSION" "${extra[@]}" .
  if [[ "$PUSH" == "1" ]]; then
    run docker push "$ref"
    if [[ "$DRY_RUN" != "1" ]]; then
      repo_digest="$(docker inspect --format '{{index .RepoDigests 0}}' "$ref")"
      DIGESTS[$image]="${repo_digest#*@}"
    else
      DIGESTS[$image]="sha256:<digest of $ref>"
    fi
  fi
done

if [[ "$PUSH" == "1" ]]; then
  if [[ "$DRY_RUN" == "1" ]]; then
    echo "# Dry run: after a push this prints the Helm values that install exactly those images:"
  else
    echo "# Pushed. Install exactly these images (Helm values; a digest wins over the tag):"
  fi
  cat <<VALUES
image:
  repository: $REGISTRY/operator
  digest: ${DIGESTS[operator]}
workerImage:
  repository: $REGISTRY/worker
  digest: ${DIGESTS[worker]}
allowedImageRegistries:
  - $REGISTRY
VALUES
else
  printf 'built %s/operator:%s and %s/worker:%s (not pushed: PUSH=0)\n' "$REGISTRY" "$TAG" "$REGISTRY" "$TAG"
fi
