"""report.py's parts: reading run folders (``runs``), the comparison with published numbers (``verdict``) and the
plots (``plots``)."""
