"""MoltenIron: a pool of bare-metal nodes shared by CI jobs."""

__version__ = "2.0.0"  # setup.py reads it from here; every command's --version prints it
