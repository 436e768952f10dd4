"""What a network is and where its drop sites are.

- ``builtin``: the registry of built-in models (one entry each).
- ``build``: build any model (built-in or the user's) with its sites, all off.
- ``user``: find and construct a user's network from a ``--model`` spec.
- ``discovery``: find candidate sites in any network (torch.fx, or module ``hooks`` as a fallback).
- ``sites``: the DropSite module and placing dropout on a network; ``masks``: cheap CPU masks.
- ``layers``: what each torch layer is, for discovery and packing; ``packed``: K networks as one.

Nothing in this room imports Optuna or knows about studies. Import from the modules themselves.
"""
