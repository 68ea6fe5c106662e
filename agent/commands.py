"""train / export / apply subcommands (filled in by the agent package)."""


def train_command_parser(subparsers) -> None:  # placeholder until the agent lands in this commit series
    pass


def export_command_parser(subparsers) -> None:
    pass


def apply_command_parser(subparsers) -> None:
    pass
