# The revisions, one file each, named <number>_<slug>.py: see connector/migrations/__init__.py.
