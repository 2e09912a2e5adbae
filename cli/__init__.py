"""The `lvr` command line: one thin module per subcommand."""
