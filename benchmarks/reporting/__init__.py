"""The sections of benchmarks/REPORT.md, one module per driver; `benchmarks.report` puts them together."""
