"""mmats data: import, list, gaps."""

import click


@click.group("data")
def data_group() -> None:
    """Market data: import files, list what is stored, find gaps."""
