"""Pydantic types that cross the Temporal boundary.

Pure data and pure functions only (stdlib and pydantic): workflows import this
package, so nothing here may do I/O or read the clock.
"""
