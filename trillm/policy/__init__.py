"""Policy: pure scheduling decisions — no Trio, no torch, no I/O — tested with fakes and property tests.

`scheduler.py` turns live sequences into one StepPlan per engine step; `kv_blocks.py` owns the paged KV block pool
and the prefix cache's hash matching; `session_kv.py` keeps interactive sessions' KV between turns; `sequence.py` is
the per-sequence state. Only the BatcherActor calls into this package. Import from the modules.
"""
