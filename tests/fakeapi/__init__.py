"""A fake kube-apiserver speaking the real list/watch protocol, for fault tests and benchmarks."""

from .certs import PKI, make_pki
from .server import FakeAPIServer

__all__ = ["PKI", "FakeAPIServer", "make_pki"]
