"""The database layer: schema, migrations, the embedded server and connections.

Nothing here imports another MMATS package.
"""
