"""Measuring: what a file holds (inspect), one answer scored, a scored set (eval, compare),
and the tables and HTML report."""
