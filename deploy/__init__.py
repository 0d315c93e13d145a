"""Deployment: Dockerfile, Prometheus and Grafana config, KubeRay and Ray cluster manifests."""
