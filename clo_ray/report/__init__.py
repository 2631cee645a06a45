"""The report stage: results.parquet's contract, paper-style tables and plots."""
