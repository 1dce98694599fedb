"""Sources of change: a manifest folder and the Kubernetes API (list + watch)."""
