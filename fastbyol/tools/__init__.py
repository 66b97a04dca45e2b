"""The tools beside training: `fastbyol bench`'s measurements (`bench_step`, `bench_augment`, `gpu_compile`) and
`fastbyol plan` (`plan`: what a run will take on a given machine)."""
