"""Uploading, listing, downloading and deleting stored files."""
