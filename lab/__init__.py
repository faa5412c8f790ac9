"""Notebook-facing glue: experiment runners, tables, figures and widgets over duoserve_core."""
