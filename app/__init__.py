"""Streamlit image-search UI."""
