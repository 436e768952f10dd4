"""How one trial trains.

- ``data`` (and its ``cache``): images decoded once into uint8 tensors, split once.
- ``normaliser``, ``device``, ``plan``, ``optim``: what makes a step fast and correct.
- ``loop``: one trial trained an epoch at a time; the trainers the scheduler drives.
- ``packed``: several trials trained as one packed network.
- ``placement``: "seed, build, place, train", the one way a trial's network is made.
- ``checkpoint``: the file a running trial resumes from.

Nothing in this room imports Optuna or knows about studies. Import from the modules themselves.
"""
