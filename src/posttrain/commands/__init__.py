"""One module per `posttrain` verb: HELP, add_arguments(parser), run(args) -> int."""
