"""Evaluation metrics: task metrics (xmc), significance (stats), trace imitation (text), and LAS (las).

Pure functions on Python lists / numpy arrays; reading artifacts and writing tables is done by
the workflow scripts.
"""
