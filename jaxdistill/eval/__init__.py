"""Evaluation: the bundled AIME/AMC/MATH task sets, answer extraction, grading and metrics."""
