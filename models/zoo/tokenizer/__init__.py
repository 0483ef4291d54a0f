"""Data folder: the zoo tokenizer (tokenizer.json, tokenizer_config.json); an __init__ so setuptools ships it as package data."""
