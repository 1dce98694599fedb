"""The cluster DNS server: Kubernetes records, negative caching, upstream forwarding.

Sans-IO cores (no sockets, no clock but an injected one):

    config.py   DNSConfig: zone, binds, upstreams, TTLs, cache bounds, client gate, TCP caps
    names.py    wire labels -> the parts of a cluster name; dashed endpoint names
    records.py  ClusterState -> replies; `resolve(request)` is the boundary
    wire.py     cheap question keys, full query checks, EDNS and truncation
    cache.py    the wire-answer cache and the upstream positive/negative/stale cache
    gate.py     who may query (allow-list) and how fast (response rate limiting)
    handler.py  DNSHandler: query bytes in, reply bytes or a ForwardRequest out; `Serving`,
                the one interface the socket shells call
    metrics.py  counters and their CoreDNS-named Prometheus collector

Shells (sockets, tasks, timers), importing the cores and never each other backwards:

    forward.py  the exchange with upstream servers (a bounded socket pool, TCP after
                truncation, failover on ICMP errors and timeouts, serve-stale)
    mmsg.py     recvmmsg/sendmmsg through libc (ctypes) and their message arrays
    batch.py    UDP served in batches with mmsg
    server.py   DNSServer: UDP/TCP listeners on each bind, implementing `Serving`
"""
