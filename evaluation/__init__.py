"""The top layer: `make eval` (evaluate.py), `make report` (report.py), `make chat` and `make compare` (chat.py)."""
