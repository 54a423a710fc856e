"""One module per `dbtrimkv` subcommand, each exposing `add_parser(subparsers)`."""
