"""Evaluation and the analyses of the S2AP paper: accuracy, stability, sharpness, landscapes."""
