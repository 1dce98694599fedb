"""The kubeshim daemon: CLI, configuration, wiring, health and metrics."""
