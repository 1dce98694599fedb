"""Side-by-side benchmarks: kubeshim against the limit (no proxy) and against what users would run
instead (HAProxy, nginx stream, kernel nftables DNAT, dnsmasq), in one run on one machine.
Entry point: `python -m bench` (see bench/__main__.py) or bench/run.sh."""
