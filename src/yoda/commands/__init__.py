"""One module per `yoda` subcommand; each exposes ``register(subparsers)``.

A command module parses arguments and calls the Python API; it imports heavy modules
(torch, nibabel) inside its ``run`` function so that ``yoda --help`` stays fast.
"""
