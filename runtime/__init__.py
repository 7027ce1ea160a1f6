"""The torch-free runtime: bundle loading, preprocessing, label banks, scoring, infer, bench."""
