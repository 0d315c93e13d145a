"""Deployment: Dockerfile, Prometheus and Grafana config, and the compose topology as local processes."""
