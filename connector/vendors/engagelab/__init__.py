"""EngageLab MA: settings.py (what its docs fix), client.py (the sans-IO contract), emulator.py (the
strict stand-in, for tests and the demo only) and README.md."""
