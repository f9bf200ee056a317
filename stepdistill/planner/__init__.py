"""``stepdistill plan``'s memory planner: real-size stacks on the ``meta`` device (``presets``,
``stack``), their activations traced there (``activations``), the per-GPU accounting (``estimate``),
the switches that would make a job fit (``suggest``), reading a training config (``config``) and the
tables of ``docs/memory.md`` (``table``)."""
