"""The data plane: VIP plumbing, listeners, endpoint selection, TCP and UDP forwarding.

    config.py     ProxyConfig, what the daemon decides
    proxier.py    Proxier: state diffs -> port tables, VIPs and listeners (syncProxyRules shape)
    listeners.py  desired listeners of a Service and the diff to apply (sans-IO)
    topology.py   categorize_endpoints: ready / serving-terminating, cluster vs local (sans-IO)
    balancer.py   round robin, random, least connections; ClientIP affinity table (sans-IO)
    table.py      PortTable: one service port's live endpoints, balancer, affinity, counters
    tcp.py        TCP forwarding with asyncio Protocols, backpressure and half-close
    udp.py        UDP flows: one connected upstream socket per client address
    vip.py        the VIP interface (netlink), the loopback mapping, NodePort addresses
    metrics.py    hot-path counters and their prometheus Collector; kube-proxy sync metrics
"""
