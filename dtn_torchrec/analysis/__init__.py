"""Task-specific feature-importance analysis of trained checkpoints (``dtn-analyze``).

* ``rows``: an evaluation set in memory, sliced into KJT batches, one field permutable at a time.
* ``importance``: per-task permutation importance and its divergence between tasks.
* ``gates``: DTN's mean gate weight per module and task (forward hooks).
* ``plots`` / ``report``: PNG plots, CSV and JSON tables; ``analyze``: the whole run.
"""
