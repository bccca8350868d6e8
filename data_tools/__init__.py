"""Command-line data tools: ``python -m data_tools {demo,verify,stats}``."""
