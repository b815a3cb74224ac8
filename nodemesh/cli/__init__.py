"""The `nodemesh` command line, in the style of kubectl."""
