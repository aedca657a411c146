"""The command line: one module per command, each parsing, calling the library, rendering."""
