"""Persistence of cached answers: SQL (the truth) behind one async facade."""
