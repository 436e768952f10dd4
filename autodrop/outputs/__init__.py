"""Reading a finished (or running) study back, only through autodrop/run/records.py.

- ``results``: the answer as data; ``text``: as the terminal prints it (neither imports torch).
- ``page``: the offline HTML report; ``dashboard``: optuna-dashboard on the study.
- ``export``: a trial's network as plain PyTorch source (``export_user`` for users' networks).

Import from the modules themselves.
"""
