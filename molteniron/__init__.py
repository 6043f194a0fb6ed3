"""MoltenIron: a pool of bare-metal nodes shared by CI jobs."""
