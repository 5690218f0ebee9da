"""Runnable examples (``python -m examples.<name>.<script>``); not part of the installed package."""
