"""The "distillation in a box" demo: a programmatic teacher, SFT of a small student, evaluation."""
