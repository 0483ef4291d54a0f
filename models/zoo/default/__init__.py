"""Data folder: the embedded zoo:default model (a Hugging Face folder); an __init__ so setuptools ships it as package data."""
