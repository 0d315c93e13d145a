"""Puts the parts on machines: the ``parle`` CLI, the local runtime, plots and reports."""
