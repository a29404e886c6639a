"""Actors: the Trio code of the serving process — the actors, the engine core's loop, the Engine and request streams.

Every class named `*Actor` owns a loop (or, for `SessionActor`, the turn-taking of one session). What they pass to
policy/ and gpu/ is the vocabulary of `trillm.protocol`; only the Batcher's inbox commands (`messages.py`) live here.
No re-exports: import from the modules (`trillm.actors.engine.Engine`).
"""
