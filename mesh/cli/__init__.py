"""The `helexa` command.

- `main`     — the dispatcher (`helexa agent|tui|status|models|load|unload|chat|key`); the console script.
- `ops`      — the operator commands against a running agent, over `helexa.mesh.client.AgentClient`.
- `__main__` — `python -m helexa.mesh.cli ...`.
"""
