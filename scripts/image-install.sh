#!/bin/sh
# kubeshim's image recipe, run inside the image being built with the sources in /app: by the
# Dockerfile (RUN, on debian:bookworm-slim or any Debian base) and by tests/peers/images.py
# (in a chroot over a debootstrapped Debian base, no container engine). Installs the Debian
# packages the daemon and the lab clients use, then the kubeshim Python package.
set -eu
# python3: the daemon; nftables: the tproxy capture table (nft, libnftables1); iproute2: its
# policy route, and the lab client routes the Service CIDR; curl, dig: clients.
PACKAGES="python3 python3-pip nftables iproute2 curl dnsutils ca-certificates"
missing=""
for pkg in $PACKAGES; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  apt-get update
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing
  rm -rf /var/lib/apt/lists/*
fi
# KUBESHIM_WHEELS: a folder or http:// URL of wheels (kubeshim's dependencies and setuptools,
# e.g. from `pip wheel -w DIR . 'setuptools>=68'`) to install from instead of the package
# index, for a build without access to it.
if [ -n "${KUBESHIM_WHEELS:-}" ]; then
  set -- --no-index --find-links "$KUBESHIM_WHEELS"
  case "$KUBESHIM_WHEELS" in
    http://*) set -- "$@" --trusted-host "$(echo "$KUBESHIM_WHEELS" | sed -E 's#^http://([^/]+).*#\1#')" ;;
  esac
fi
# Debian marks its Python as externally managed; the image has no other Python user.
python3 -m pip install --no-cache-dir --no-compile --break-system-packages "$@" /app
rm -rf /app/build /app/kubeshim.egg-info
