"""Placeholder for the doctor command group (being written)."""
