"""The `f2b` command line: thin, parses arguments, calls the library, prints."""
