"""The explorer: every schedule of the pause points of two requests, PCT for more."""
