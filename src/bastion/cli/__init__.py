"""The bastion command line."""


def main() -> None:
    """Entry point."""
