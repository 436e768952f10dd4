"""How a search runs.

- ``search``: prepare the study, then train its trials here or in worker ``processes``.
- ``scheduler``: the one loop every worker runs (admission, heartbeats, telling, re-queueing),
  with ``signals`` for clean stops and ``locking`` for the study's lock.
- ``trials``: a search's trials as the scheduler trains them; ``space``: placements asked of Optuna.
- ``study`` and ``storage``: the study and where it lives; ``records``: every stored key and the
  one reader of a stored study; ``artifacts`` and ``checkpoints``: what a search keeps beside it.
- ``confirm``: retrain the winners over seeds and test the lead.

Import from the modules themselves: ``records`` and ``space`` import no torch, so that
autodrop/outputs can read a study without it.
"""
