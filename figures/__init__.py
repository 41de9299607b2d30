"""Figures: one function per figure, taking results and returning a matplotlib Figure."""
