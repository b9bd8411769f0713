"""The glass: a local web viewer (`glassgpt view`) and a static HTML report (`glassgpt report`).

A generation and everything that explains it -- verbatim spans, nearest training windows, neurons --
on one page. explain.py calls the engines, server.py serves the page and a JSON API, report.py
writes the same page as one self-contained file. docs/viewer.md has the walkthrough.
"""
