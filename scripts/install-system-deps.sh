#!/usr/bin/env bash
# System packages the tests use: Debian's Prometheus (a real server on loopback).
set -euo pipefail
if command -v prometheus >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "prometheus not found and apt-get unavailable: Prometheus tests will be skipped" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "installing Debian's prometheus package (used by the tests on loopback)" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# The package may start a system service; the tests run their own instances.
$SUDO service prometheus stop >/dev/null 2>&1 || true
