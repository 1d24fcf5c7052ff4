"""Side effects: delivery through channels, the send governor, records and enrollment.

Activities are classes whose dependencies (session factory, SMTP pool, HTTP clients,
Temporal client) are injected by `worker.py`, so tests build them against real local
servers.
"""
