"""The batched execution engine behind every sweep (see ``docs/architecture.md``).

From the API down:

- ``plan``: what a run is made of: sweeps and their index tables, cells, and the
  ``PatchPlan`` interface every plan gives the driver.
- ``activation_plan`` / ``direct_path``: the two plans: the cells of ``get_act_patch_*`` sweeps,
  and of direct paths (a source head's write into one reader's input).
- ``driver``: the one driver of every plan: chunking options, backend choice, sharding over
  ``distributed`` ranks, ``stats``, the progress bar, the model-state guard and the gathered values.
- ``hooks_driver`` / ``native_driver``: evaluate a rank's cells chunk by chunk on each backend;
  ``hooks_backend`` (one patched ``run_with_hooks`` forward of an activation plan's chunk, through
  the batched ``setters``) and ``native/`` (a functional forward that starts each cell where its
  patch first changes the residual) do the forward passes.
- ``metric_set``: the caller's metrics, applied per cell with TransformerLens's shape rules.
- ``chunks`` and ``oom``: memory-budgeted chunks, halved and retried when one runs out of memory.
- ``backend_choice``, ``probing``: native or hooks for a plan; which hook points a plan patches.
- ``checks``, ``model_state``, ``distributed``, ``stats``: input validation, a guard that leaves
  no hook or flag changed, sharding cells across ranks, and what the last run did.
"""
