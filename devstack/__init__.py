"""The embedded stack: everything `make run` starts on one machine, without Docker."""
