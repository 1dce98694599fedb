"""The cluster DNS server: Kubernetes records, negative caching, upstream forwarding."""
