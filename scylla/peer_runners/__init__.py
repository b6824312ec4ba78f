"""Scripts that run inside a peer engine's own virtual environment (never the project's):
they import only that engine and the standard library, read a request JSON, and append one
JSON line per finished prompt to the output file, so a crash keeps what was done."""
