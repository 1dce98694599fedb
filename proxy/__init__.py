"""The data plane: VIP plumbing, listeners, endpoint selection, TCP and UDP forwarding."""
