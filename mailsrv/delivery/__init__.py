"""The delivery queue: background workers, local delivery, bounces."""
