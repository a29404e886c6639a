"""Protocol: the vocabulary every layer shares, at the bottom of the import graph.

`api` is the HTTP ↔ engine vocabulary and the `EngineClient` seam, `step` the batcher ↔ rank step vocabulary, `wire`
the framing of the rank socket. These modules import only the standard library and attrs (no Trio, no torch), so the
serving process, the pure policy and the rank processes can all depend on them and on nothing of each other.
Import from the modules (`trillm.protocol.api.SamplingParams`, ...).
"""
