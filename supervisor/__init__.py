"""clado-supervisor: keeps Clado deep research jobs from burning money."""

__version__ = "0.1.0"
