"""The data plane: capturing Service traffic, listeners, endpoint choice, TCP and UDP forwarding.

    config.py       ProxyConfig, what the daemon decides
    changes.py      ServiceChangeTracker: pending Service changes between syncs (sans-IO)
    proxier.py      Proxier: drains the tracker -> port tables, what serves them, health checks
    runtime.py      ServiceRuntime and Listener: the sockets and addresses a Service holds
    status.py       the /status document and the counts worker processes report
    capture.py      tproxy mode: Service tuples -> verdicts -> one nftables table (sans-IO)
    transparent.py  tproxy mode: the transparent listeners, the table's transactions, policy routing
    nft.py          nftables transactions: libnftables in-process, `nft -f -` without it
    listeners.py    interface/loopback modes: desired listeners of a Service and the diff (sans-IO)
    vip.py          the VIP interface (netlink), the loopback mapping, NodePort addresses
    topology.py     categorize_endpoints: ready / serving-terminating, topology, local (sans-IO)
    balancer.py     round robin, random, least connections; ClientIP affinity table (sans-IO)
    table.py        PortTable: one service port's live endpoints, balancer, affinity, counters
    tcp.py          TCP forwarding with asyncio Protocols, backpressure and half-close
    udp.py          UDP flows: their one lifecycle (both listener kinds) and the plain listener
    budget.py       caps on connections and UDP flows, in total and per client (sans-IO)
    healthcheck.py  health-check nodePorts of Local-policy Services, fed by the sync
    sctp.py         whether this kernel can carry SCTP
    metrics.py      hot-path counters and their prometheus Collector; kube-proxy sync metrics
"""
