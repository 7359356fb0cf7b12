"""Evaluation: the bundled AIME/AMC/MATH task sets (tasks), and in time grading and reports."""
