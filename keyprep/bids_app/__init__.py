"""Command line, configuration, BIDS queries, derivatives naming and reports."""
