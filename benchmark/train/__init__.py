"""Trainers for the zoo models (``genbench train <model>``), registered in ``TRAINERS``."""
