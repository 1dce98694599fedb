"""The cluster DNS server: Kubernetes records, negative caching, upstream forwarding.

    config.py   DNSConfig: zone, binds, upstreams, TTLs, cache bounds
    names.py    query name -> the parts of a cluster name (sans-IO)
    records.py  ClusterState -> replies; `resolve(request)` is the boundary (sans-IO)
    wire.py     cheap question keys, full query checks, EDNS and truncation (sans-IO)
    cache.py    the wire-answer cache and the upstream positive/negative cache (sans-IO)
    forward.py  the exchange with upstream servers (UDP, TCP after truncation, failover)
    server.py   DNSServer: UDP/TCP listeners wiring the above
    batch.py    UDP served in batches: recvmmsg/sendmmsg through libc (ctypes)
    metrics.py  counters and their CoreDNS-named Prometheus collector
"""
