"""The consumer pipeline as a library: raw log lines → events → drain3 templates → verdicts, once per template.

Used by `rationanomaly detect` (with the HTTP client of the live endpoint) and by the evaluate stage's
served-path sets (with the candidate behind the same classifier interface), so both run the same code:
formats (headers, the alert tag never sent), framing (line ends, long lines), records (multi-line events,
sessions), drain_rules (wildcards for values only), miner (checkpointed drain3), cache (verdicts per model
version), verdicts (the classifier interface), detector (the run and its JSON-lines output).
"""
