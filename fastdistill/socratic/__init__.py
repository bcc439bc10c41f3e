"""Socratic decomposition (Shridhar et al. 2023): teacher sub-question chains -> a question-generator student and an
answerer student, trained by ``fastdistill train`` and evaluated alternating. ``fastdistill socratic``."""
