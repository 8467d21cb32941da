"""Placeholder for the serve command group (being written)."""
