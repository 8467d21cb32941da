"""Placeholder for the migrate command group (being written)."""
