"""Actors: the Trio side of the engine (sessions, batching, GPU workers) and the messages they pass.

No re-exports here on purpose: rank processes import `trillm.actors.messages` as plain data, and re-exporting the
Engine from this `__init__` would make every such import load Trio (absent on the GPU machines) and the whole actor
stack. Import from the modules: `trillm.actors.engine.Engine`, `trillm.actors.messages.*`.
"""
