"""Mechanistic distillation: head pools, loss terms and the trainer."""
