"""Integrations with other trainers; each imports its library lazily, on first use."""
