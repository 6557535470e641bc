"""The `lowres` command line: parse, call, print — no logic lives here."""
