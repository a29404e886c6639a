"""Actors: the Trio side of the engine (sessions, batching, GPU workers) and the messages they pass."""
