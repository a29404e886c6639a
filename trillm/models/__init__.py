"""Model architectures and weight loading.

No re-exports here on purpose: `trillm.models.loader` is imported by the serving process (model resolution), which
must not load torch; `trillm.models.llama` needs torch. Import from the modules.
"""
