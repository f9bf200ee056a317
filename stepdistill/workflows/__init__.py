"""The work behind the commands, from composed configs: a distillation run (``train``), the embedded
teachers (``teacher``) and a run's evaluation (``evaluate``); the commands and the benchmarks call them."""
