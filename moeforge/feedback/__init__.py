"""Human feedback: the labelling web app (``app``) and its SQLite store and export (``db``)."""

from moeforge.feedback.db import export_pairs

__all__ = ["export_pairs"]
