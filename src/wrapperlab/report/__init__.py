"""Report: figures (and, with issue 5, the HTML report and claims table)."""
