"""`fastbyol bench`: the measurement commands (`bench_step`, `bench_augment`, `gpu_compile`)."""
