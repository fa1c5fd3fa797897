"""The `slidechat` console script and its subcommands."""
