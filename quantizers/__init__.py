"""quantizers package."""
