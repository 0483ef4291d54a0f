"""One module per CLI subcommand: ``add_parser(parser)`` and ``run(args) -> exit code``."""
