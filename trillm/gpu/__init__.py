"""GPU and CPU compute: reference ops, CUDA kernels, sampling, the model runner and the rank process.

No re-exports here on purpose: the serving process imports `trillm.gpu.rank` to start rank processes and must not
load torch or CuPy by doing so. Import from the modules (`trillm.gpu.runner.ModelRunner`, ...).
"""
