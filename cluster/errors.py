"""ConfigError: a configuration (file, flag, kubeconfig, service account) that cannot be used.

One class for every layer, so the command reports them all the same way: the message names
what is wrong and where.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file, field or flag."""
