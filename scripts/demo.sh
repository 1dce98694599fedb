#!/usr/bin/env bash
# Runs kubeshim on the bundled example manifests, on this machine's loopback only:
# two web backends on 127.0.0.21/22:18080, the daemon in loopback VIP mode, then a curl
# through the `web` ClusterIP and digs of service names. With DEMO_ONCE=1 it stops after
# showing them; otherwise the daemon keeps running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

DNS_PORT="${DNS_PORT:-5353}"
LOG="$(mktemp -t kubeshim-demo.XXXXXX.log)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

python3 examples/backend.py web-0 127.0.0.21 18080 & pids+=($!)
python3 examples/backend.py web-1 127.0.0.22 18080 & pids+=($!)

python3 -m kubeshim run --manifests examples/manifests --vip-mode loopback \
  --hostname-override lab-node --dns-bind "127.0.0.1:$DNS_PORT" --upstream 127.0.0.1:9 \
  --healthz-bind-address 127.0.0.1:10256 --metrics-bind-address 127.0.0.1:10249 >"$LOG" 2>&1 &
pids+=($!)

for _ in $(seq 100); do
  curl -fs http://127.0.0.1:10256/healthz >/dev/null 2>&1 && break
  sleep 0.1
done

say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
say kubeshim state --manifests examples/manifests --vip-mode loopback
python3 -m kubeshim state --manifests examples/manifests --vip-mode loopback

say dig @127.0.0.1 -p "$DNS_PORT" +noall +answer web.default.svc.cluster.local
dig @127.0.0.1 -p "$DNS_PORT" +noall +answer web.default.svc.cluster.local
VIP="$(dig @127.0.0.1 -p "$DNS_PORT" +short web.default.svc.cluster.local | head -1)"

say "curl http://$VIP/  (the web ClusterIP 10.96.0.20:80, served at $VIP in loopback mode), 4 times"
for _ in 1 2 3 4; do curl -fsS --max-time 5 "http://$VIP/"; done

say dig @127.0.0.1 -p "$DNS_PORT" +noall +answer +additional SRV _http._tcp.web.default.svc.cluster.local
dig @127.0.0.1 -p "$DNS_PORT" +noall +answer +additional SRV _http._tcp.web.default.svc.cluster.local
say dig @127.0.0.1 -p "$DNS_PORT" +noall +answer db.default.svc.cluster.local "(headless)"
dig @127.0.0.1 -p "$DNS_PORT" +noall +answer db.default.svc.cluster.local
say dig @127.0.0.1 -p "$DNS_PORT" nope.default.svc.cluster.local "(NXDOMAIN with the zone's SOA)"
dig @127.0.0.1 -p "$DNS_PORT" +noall +comments +authority nope.default.svc.cluster.local | grep -E "status|SOA"

say curl -s http://127.0.0.1:10256/healthz
curl -s http://127.0.0.1:10256/healthz; echo

if [ "${DEMO_ONCE:-0}" = 1 ]; then
  echo; echo "demo ok (daemon log: $LOG)"
  exit 0
fi
echo
echo "kubeshim is running (log: $LOG). Try: curl http://$VIP/ ; dig @127.0.0.1 -p $DNS_PORT web.default.svc.cluster.local"
echo "Edit examples/manifests/*.yaml and watch it follow. Ctrl-C stops everything."
wait "${pids[2]}"
