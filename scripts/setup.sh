#!/usr/bin/env bash
# Installs everything kubeshim, its tests and its benchmarks need on a fresh Debian machine:
# the clients and peers from Debian's packages, and the Python package with its extras.
# Idempotent; run as root (or with sudo available).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  iproute2 procps iputils-ping curl dnsutils socat netcat-openbsd nftables
  wrk iperf3 dnsperf dnsmasq-base haproxy nginx libnginx-mod-stream nsd systemd
  musl-tools  # musl-gcc: the DNS tests build a getaddrinfo client against musl
  # The test node (tests/peers/node.py): runtime, CNI plugins, and the images' Debian base.
  containerd runc containernetworking-plugins debootstrap iptables
  # The compose lab (tests/e2e/test_compose_lab.py): Debian's Docker engine and Compose.
  docker.io docker-compose
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  # No service starts while installing (invoke-rc.d's policy): a dockerd started in the host's
  # namespace would add its bridge and firewall rules there.
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null && $SUDO chmod 755 "$policy"
    trap '$SUDO rm -f "$policy"' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ -z "$policy" ] || $SUDO rm -f "$policy"
  # nginx and haproxy are benchmark peers, containerd the test node's runtime, dockerd the
  # compose lab's engine: started on demand, never system services.
  for svc in nginx haproxy dnsmasq nsd containerd docker.socket docker; do
    $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || $SUDO service "$svc" stop >/dev/null 2>&1 || true
  done
fi

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import kubeshim, uvloop, dnslib, asyncio_dgram, scapy, pytest_asyncio, nftables, yaml_rs" 2>/dev/null \
   || [ pyproject.toml -nt .setup-stamp ]; then
  echo "setup: installing the kubeshim Python package and its extras"
  "$PYTHON" -m pip install -q --disable-pip-version-check -e ".[test,bench]" 2>&1 | grep -v "Running pip as the 'root' user" || true
  touch .setup-stamp
fi
