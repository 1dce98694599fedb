"""Kubernetes objects, the sources that deliver them, and the ClusterState that merges them."""
