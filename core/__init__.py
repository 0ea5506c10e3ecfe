"""The rules every layer shares: the two error bases (errors), settings declared once (settings), where a command
runs (runtime), atomic outputs (files), safe names from the data (safe_names). Imports nothing from the project."""
