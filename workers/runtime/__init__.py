"""The live and paper runtime: supervision, heartbeats, structured logs, the workers."""
