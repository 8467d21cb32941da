"""Placeholder for the config command group (being written)."""
