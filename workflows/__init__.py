"""Deterministic orchestration only: the enrollment and audience workflows.

Nothing here performs I/O; side effects live in `activities/`.
"""
