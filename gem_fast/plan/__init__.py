"""Predictions made before renting GPUs, from a model's shape alone (no model is built):

* :mod:`~gem_fast.plan.shapes`: :class:`~gem_fast.plan.shapes.ModelShape` and the :data:`PRESETS`;
* :mod:`~gem_fast.plan.kernel`: a kernel call's extra memory, FLOPs and traffic
  (``gem-fast-plan-kernel``);
* :mod:`~gem_fast.plan.workload`: what one rank of a run does (:class:`~gem_fast.plan.workload.Setup`);
* :mod:`~gem_fast.plan.memory`: per-rank peak memory of a training step, phase by phase
  (``gem-fast-plan-memory``).

Nothing is imported here: the console scripts parse their flags before torch loads.
"""
