"""The Kubernetes driver: renders a cascade's children, runs its control loop under Kopf."""
