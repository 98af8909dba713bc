"""mmats demo: the main job on the embedded database."""

import click


@click.command("demo")
def demo() -> None:
    """Start the database, migrate, import the sample data and show what is stored."""
