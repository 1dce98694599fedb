"""The process's descriptor limit: raised at start, like Go daemons such as kube-proxy do.

The soft RLIMIT_NOFILE (usually 1024) is raised to the hard limit (systemd: LimitNOFILE=,
containers: the runtime's default, often 1048576). The proxy's caps on connections and flows
are then sized from the raised limit (proxy/budget.py), leaving a reserve for DNS, the API
watch and the ops endpoints.
"""

from __future__ import annotations

import resource

from kubeshim.cluster.log import get_logger

log = get_logger("daemon")


def raise_nofile() -> int:
    """Raise the soft descriptor limit to the hard limit; returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        # An unlimited hard limit is still capped by fs.nr_open for a soft limit.
        try:
            with open("/proc/sys/fs/nr_open") as f:
                hard = int(f.read())
        except (OSError, ValueError):
            hard = 1048576
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("raised descriptor limit", soft=soft, to=hard)
            soft = hard
        except (OSError, ValueError) as e:
            log.warning("cannot raise descriptor limit", soft=soft, hard=hard, reason=str(e))
    return int(soft if soft != resource.RLIM_INFINITY else hard)
