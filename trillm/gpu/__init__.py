"""GPU and CPU compute: reference ops, CUDA kernels, the model runner and the rank process."""
