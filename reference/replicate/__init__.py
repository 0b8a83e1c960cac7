"""``python -m reference.replicate``: the seed papers' findings replicated with the reference trainer.

One module per claim (``claim_a`` … ``claim_g``), each with ``TITLE``, ``CLAIM`` and ``run(ctx) -> dict``
(a table, figures, a verdict computed from the numbers); ``report`` assembles ``docs/replication.md``.
"""
