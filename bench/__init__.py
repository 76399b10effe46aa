"""The speed benchmark (python -m bench): macpo's scoring, generation and update against the naive scripts."""
